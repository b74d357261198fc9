"""The training loop: plain PyTorch, identical with or without Ray.

``train_loop(cfg, session)`` is everything a worker does. A :class:`Session` supplies what
differs between a single process and a Ray Train worker (rank, device, DDP wrapping, reports,
checkpoints, all-reduce); :class:`LocalSession` is the no-Ray one, and
:mod:`raysrec.train.ray_train` provides the Ray Train one.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np
import torch
from torch import nn

from raysrec.data.pipeline import ITEMS_FILE
from raysrec.data.sequences import (
    Examples,
    PreparedData,
    evaluation_examples,
    held_out_items,
    iterate_batches,
    subset,
    training_examples,
    without_items,
)
from raysrec.models import losses
from raysrec.models.metrics import full_ranking_ranks, metric_sums, sampled_candidates, sampled_ranks
from raysrec.models.sequential import SequentialRecommender, build_model
from raysrec.train import checkpoint as ckpt
from raysrec.train.config import VALID_METRIC, TrainConfig


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def wrap_model(self, model: nn.Module) -> nn.Module: ...
    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray: ...
    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[Path]) -> None: ...
    def latest_checkpoint(self) -> Optional[Path]: ...
    def workers(self) -> list[dict[str, Any]]: ...


def unwrap(model: nn.Module) -> SequentialRecommender:
    return model.module if hasattr(model, "module") else model  # DDP keeps the model in .module


def autocast(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_loss(model: nn.Module, batch: dict[str, torch.Tensor], cfg: TrainConfig,
                 log_q: Optional[torch.Tensor], generator: Optional[torch.Generator],
                 excluded: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One batch's training loss (+ the auxiliary loss when the model has one and it is weighted)."""
    core = unwrap(model)
    hidden, aux = model(batch, with_aux=True)                                 # (B, L, d)
    valid = batch["target_ids"] > 0
    h, targets = hidden[valid], batch["target_ids"][valid]                    # (P, d), (P,)
    if cfg.loss == "ce":
        loss = losses.full_softmax_ce(core, h, targets, cfg.label_smoothing, excluded)
    elif cfg.loss == "sampled":
        n = core.cfg.num_items
        if log_q is None:
            negatives = torch.randint(1, n + 1, (cfg.num_negatives,), device=h.device, generator=generator)
        else:
            negatives = torch.multinomial(log_q.exp(), cfg.num_negatives, replacement=True, generator=generator)
        loss = losses.sampled_softmax(core, h, targets, negatives.to(h.device), log_q)
    else:
        loss = losses.bce_one_negative(core, h, targets, batch["negative_ids"][valid][:, 0])
    if aux is not None:
        loss = loss + cfg.aux_loss_weight * aux
    return loss


@torch.no_grad()
def evaluate(model: SequentialRecommender, examples: Examples, cfg: TrainConfig, device: torch.device,
             protocol: str = "full", rank: int = 0, world_size: int = 1, num_sampled: int = 100,
             seed: int = 0, allowed: Optional[torch.Tensor] = None) -> np.ndarray:
    """Metric sums over this worker's evaluation rows: [count, then metric_sums in key order].

    ``allowed`` (full protocol): a (N+1,) bool mask of the items that compete with the target.
    """
    model.eval()
    ks = list(cfg.metric_ks)
    keys = metric_keys(ks)
    totals = np.zeros(1 + len(keys))
    generator = torch.Generator().manual_seed(seed)
    num_items = model.cfg.num_items
    for batch in iterate_batches(examples, cfg.eval_batch_size, rank=rank, world_size=world_size, device=device,
                                 with_history=True):
        with autocast(device, cfg.bf16):
            hidden = model(batch)[:, -1]                                        # (B, d) newest position
        targets = batch["target_ids"][:, -1]
        if protocol == "full":
            ranks = full_ranking_ranks(model.score_all(hidden.float()), targets, batch["history"], allowed)
        else:
            candidates = sampled_candidates(targets, batch["history"], num_items, num_sampled, generator)
            ranks = sampled_ranks(model.score_items(hidden.float(), candidates))
        sums = metric_sums(ranks, ks)
        totals[0] += len(targets)
        totals[1:] += [sums[k] for k in keys]
    return totals


def metric_keys(ks: Iterable[int]) -> list[str]:
    return [f"{m}@{k}" for k in ks for m in ("ndcg", "hr", "mrr")]


def summarize(totals: np.ndarray, ks: Iterable[int], prefix: str) -> dict[str, float]:
    count = max(totals[0], 1.0)
    return {f"{prefix}{key}": float(v / count) for key, v in zip(metric_keys(ks), totals[1:])}


def set_seed(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_model_config(cfg: TrainConfig, data: PreparedData) -> tuple[TrainConfig, Optional[np.ndarray]]:
    """Fill the sizes the data decides (item count, text vector size); the text vectors if used."""
    model = {**cfg.model.to_dict(), "num_items": data.num_items}
    vectors = None
    if cfg.model.use_text:
        from raysrec.text.embed import text_vectors  # noqa: PLC0415

        vectors = text_vectors(data.items, data.num_items, where=data.root)
        model["text_dim"] = int(vectors.shape[1])
    return cfg.replace(model=model), vectors


def train_loop(cfg: TrainConfig, session: Session) -> dict[str, Any]:
    """Train with early stopping on valid NDCG@10; reports every epoch, checkpoints on rank 0."""
    set_seed(cfg.seed)
    data = PreparedData.load(cfg.data)
    cfg, vectors = resolve_model_config(cfg, data)
    files = data.shard_files()
    # Each worker reads its own shard files; with fewer files than workers, rows are dealt instead.
    by_file = len(files) >= session.world_size
    seqs = data.read(files[session.rank::session.world_size] if by_file else files)
    cold = held_out_items(data.num_items, cfg.cold_items, cfg.seed) if cfg.cold_items else None
    if cold is not None:
        seqs = without_items(seqs, cold)
    rank, world = (0, 1) if by_file else (session.rank, session.world_size)
    max_len = cfg.model.max_length
    train_ex = training_examples(seqs, max_len, cfg.train_windows)
    valid_ex = evaluation_examples(seqs, max_len, "valid")

    device = session.device
    model = build_model(cfg.model)
    if vectors is not None:
        model.set_text_vectors(torch.from_numpy(vectors))
    model = model.to(device)
    excluded = torch.from_numpy(cold).to(device) if cold is not None else None
    if hasattr(model, "aux_enabled"):
        model.aux_enabled = cfg.aux_loss_weight > 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    state: dict[str, Any] = {"epoch": 0, "best": -1.0, "best_epoch": -1, "bad_epochs": 0, "history": []}
    resume = session.latest_checkpoint() or (Path(cfg.resume_from) if cfg.resume_from else None)
    if resume is not None:
        core, _, saved = ckpt.load_checkpoint(resume, map_location=device)
        model.load_state_dict(core.state_dict())
        ckpt.load_optimizer_state(resume, optimizer)
        state = {k: saved[k] for k in state}
    # Where every worker runs (node, host, pid, device), kept in the checkpoint state and in
    # metrics.json; a restart after a failure appends the new placement.
    state["workers"] = session.workers()
    model = session.wrap_model(model)

    log_q = None
    if cfg.loss == "sampled" and cfg.negative_sampling == "popularity":
        pop = torch.tensor(data.item_popularity(), dtype=torch.float64) + 1.0
        pop[0] = 0.0
        log_q = (pop / pop.sum()).log().float().to(device)
    my_steps = math.ceil(len(train_ex) / world / cfg.batch_size)
    steps = int(session.all_reduce_sum(np.array([0.0] * session.rank + [my_steps] + [0.0] * (session.world_size - session.rank - 1))).max())
    scratch = Path(tempfile.mkdtemp(prefix="raysrec-ckpt-"))
    items_file = data.copy_file(ITEMS_FILE, scratch / ITEMS_FILE)
    generator = torch.Generator(device=device.type).manual_seed(cfg.seed * 7919 + session.rank)

    for epoch in range(state["epoch"], cfg.epochs):
        started = time.perf_counter()
        # Re-seeded every epoch (dropout, sampling), so a run resumed from a checkpoint continues
        # exactly as the uninterrupted run would have.
        torch.manual_seed(cfg.seed * 100_003 + epoch * 1_009 + session.rank)
        generator.manual_seed(cfg.seed * 7919 + epoch * 31 + session.rank)
        model.train()
        loss_sum, n_batches, n_examples = 0.0, 0, 0
        for batch in iterate_batches(train_ex, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch, rank=rank,
                                     world_size=world, num_steps=steps, num_items=data.num_items,
                                     num_negatives=1 if cfg.loss == "bce" else 0, device=device):
            with autocast(device, cfg.bf16):
                loss = compute_loss(model, batch, cfg, log_q, generator, excluded)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            loss_sum += float(loss.detach())
            n_batches += 1
            n_examples += int((batch["target_ids"] > 0).sum())
        train_seconds = time.perf_counter() - started
        totals = session.all_reduce_sum(
            np.concatenate([[loss_sum, n_batches, n_examples], evaluate(unwrap(model), valid_ex, cfg, device,
                                                                       rank=rank, world_size=world)]))
        metrics = {"epoch": epoch + 1, "train_loss": totals[0] / max(totals[1], 1),
                   **summarize(totals[3:], cfg.metric_ks, "valid_"),
                   "epoch_seconds": time.perf_counter() - started,
                   "examples_per_second": totals[2] / max(train_seconds, 1e-9)}
        improved = metrics[VALID_METRIC] > state["best"]
        state.update(epoch=epoch + 1, bad_epochs=0 if improved else state["bad_epochs"] + 1)
        if improved:
            state.update(best=metrics[VALID_METRIC], best_epoch=epoch + 1)
        metrics["best_" + VALID_METRIC] = state["best"]
        metrics["eta_seconds"] = (cfg.epochs - epoch - 1) * metrics["epoch_seconds"]
        state["history"].append(metrics)
        checkpoint_dir = None
        if session.rank == 0:
            checkpoint_dir = ckpt.save_checkpoint(scratch / f"epoch-{epoch + 1:04d}", unwrap(model), cfg,
                                                  {**state, "metrics": metrics}, optimizer, items_file)
        session.report(metrics, checkpoint_dir)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        if state["bad_epochs"] >= cfg.patience:
            break
    shutil.rmtree(scratch, ignore_errors=True)
    return state


class LocalSession:
    """Single process, no Ray: keeps the best checkpoint (by valid NDCG@10) in ``best_dir``."""

    rank, world_size = 0, 1

    def __init__(self, best_dir: str | Path, device: str = "cpu", last_dir: Optional[str | Path] = None,
                 resume_from: Optional[str | Path] = None) -> None:
        self.best_dir = Path(best_dir)
        self.last_dir = Path(last_dir) if last_dir else None
        self.resume_from = Path(resume_from) if resume_from else None
        self.device = torch.device(device)
        self.best = -math.inf
        self.history: list[dict[str, Any]] = []
        self.verbose = True

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float64)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[Path]) -> None:
        self.history.append(metrics)
        if self.verbose:
            print(format_epoch(metrics), flush=True)
        if checkpoint_dir is not None and self.last_dir is not None:
            if self.last_dir.exists():
                shutil.rmtree(self.last_dir)
            shutil.copytree(checkpoint_dir, self.last_dir)
        if checkpoint_dir is not None and metrics[VALID_METRIC] > self.best:
            self.best = metrics[VALID_METRIC]
            if self.best_dir.exists():
                shutil.rmtree(self.best_dir)
            shutil.copytree(checkpoint_dir, self.best_dir)

    def latest_checkpoint(self) -> Optional[Path]:
        return self.resume_from

    def workers(self) -> list[dict[str, Any]]:
        return [worker_info(0, self.device)]


def worker_info(rank: int, device: torch.device, node_id: Optional[str] = None) -> dict[str, Any]:
    """Where one training worker runs."""
    import os  # noqa: PLC0415
    import socket  # noqa: PLC0415

    return {"rank": rank, "node_id": node_id, "hostname": socket.gethostname(), "pid": os.getpid(),
            "device": str(device)}


def format_epoch(m: dict[str, Any]) -> str:
    """One progress line per epoch, with the worst-case ETA (early stopping may end sooner)."""
    line = (f"epoch {m['epoch']:>3}  loss {m['train_loss']:.4f}  valid ndcg@10 {m[VALID_METRIC]:.4f}  "
            f"hr@10 {m['valid_hr@10']:.4f}  best {m['best_' + VALID_METRIC]:.4f}  "
            f"{m['epoch_seconds']:.1f}s  {m['examples_per_second']:,.0f} ex/s")
    if "eta_seconds" in m:
        left = float(m["eta_seconds"])
        line += f"  eta <= {int(left // 60)}m{int(left % 60):02d}s"
    return line


def evaluate_checkpoint(data_dir: str | Path, model_dir: str | Path, protocol: str = "full",
                        split: str = "test", device: str = "cpu", seed: int = 0,
                        targets: str = "all", candidates: str = "all") -> dict[str, float]:
    """Re-score a checkpoint on the valid or test targets of a prepared folder.

    ``targets``: ``all``, or (for a model trained with ``cold_items``) only the rows whose target is
    a held-out ``cold`` item, or a ``warm`` one. ``candidates``: ``all`` items compete (full
    ranking), or only the held-out ``cold`` ones (the item cold-start protocol of DropoutNet and its
    successors: how well new items are ranked among the new items, e.g. for a "new arrivals" slot).
    """
    model, cfg, _ = ckpt.load_checkpoint(model_dir, map_location=device)
    data = PreparedData.load(data_dir)
    if data.num_items != model.cfg.num_items:
        from raysrec.errors import CheckpointError  # noqa: PLC0415
        raise CheckpointError(f"{model_dir}: trained on {model.cfg.num_items} items but {data_dir} has {data.num_items}")
    model.to(device)
    seqs = data.read()
    cold = held_out_items(data.num_items, cfg.cold_items, cfg.seed) if cfg.cold_items else None
    if cold is not None:
        seqs = without_items(seqs, cold)
    examples = evaluation_examples(seqs, model.cfg.max_length, split)  # type: ignore[arg-type]
    if targets != "all":
        if cold is None:
            raise ValueError(f"targets={targets!r} needs a model trained with cold_items > 0")
        is_cold = cold[examples.target_ids[:, -1]]
        examples = subset(examples, np.flatnonzero(is_cold if targets == "cold" else ~is_cold))
    allowed = None
    if candidates == "cold":
        if cold is None or targets != "cold" or protocol != "full":
            raise ValueError("candidates='cold' needs a model trained with cold_items > 0, targets='cold' and "
                             "the full protocol")
        allowed = torch.from_numpy(np.asarray(cold, bool))
    totals = evaluate(model, examples, cfg, torch.device(device), protocol=protocol, seed=seed, allowed=allowed)
    return {**summarize(totals, cfg.metric_ks, ""), "rows": int(totals[0])}

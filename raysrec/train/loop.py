"""The training loop: plain PyTorch, identical with or without Ray.

``train_loop(cfg, session)`` is everything a worker does. A :class:`Session` supplies what
differs between a single process and a Ray Train worker (rank, device, DDP wrapping, reports,
checkpoints, all-reduce); :class:`LocalSession` is the no-Ray one, and
:mod:`raysrec.train.ray_train` provides the Ray Train one.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np
import torch
from torch import nn

from raysrec import artifact
from raysrec.config import redact
from raysrec.data.examples import evaluation_examples, iterate_batches, training_examples
from raysrec.data.pipeline import ITEMS_FILE
from raysrec.data.storage import PreparedData
from raysrec.errors import ConfigError, InputError, RaysrecError
from raysrec.evaluation import check_same_items, evaluate, held_out_items, summarize, without_items
from raysrec.models import losses
from raysrec.models.sequential import SequentialRecommender, autocast, build_model, cpu_training_matmuls
from raysrec.train.config import BEST_SCORE, NOT_BEST, VALID_METRIC, TrainConfig, improves
from raysrec.train.optim import build_optimizer, sparse_item_grads
from raysrec.train.warm_start import carry_optimizer, match_items, warm_start


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def wrap_model(self, model: nn.Module) -> nn.Module: ...
    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray: ...
    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[Path]) -> None: ...
    def latest_checkpoint(self, into: Path) -> Optional[Path]:
        """The checkpoint to resume from (a restarted worker's), made local under ``into``; or ``None``."""
    def workers(self) -> list[dict[str, Any]]: ...
    def gather(self, value: Any) -> list[Any]:
        """Every worker's ``value``, in rank order, on every worker."""
    def stop_with_user_error(self, message: str) -> None:
        """End the whole run now because of a user error: once, without the retries a crash gets."""


def unwrap(model: nn.Module) -> SequentialRecommender:
    return model.module if hasattr(model, "module") else model  # DDP keeps the model in .module


def compute_loss(model: nn.Module, batch: dict[str, torch.Tensor], cfg: TrainConfig,
                 log_q: Optional[torch.Tensor], generator: Optional[torch.Generator],
                 excluded: Optional[torch.Tensor] = None, ce_kernel: str = "torch") -> torch.Tensor:
    """One batch's training loss (+ the auxiliary loss when the model has one and it is weighted);
    ``ce_kernel`` from :func:`losses.ce_kernel`.

    The model runs under bf16 autocast when ``cfg.bf16`` (on CUDA); the loss head runs with autocast off, on
    fp32 hidden states and item rows, so every logit, log-sum-exp and gradient of the loss is fp32 (the fused
    kernel casts its inputs to bf16 itself). On CPU the training loop runs the step under
    :func:`cpu_training_matmuls`, where oneDNN may multiply fp32 matrices in bf16."""
    core = unwrap(model)
    device = batch["input_ids"].device
    with autocast(device, cfg.bf16):
        out = model(batch, aux=cfg.aux_loss_weight > 0)
    valid = batch["target_ids"] > 0
    with losses.fp32(device):
        h, targets = out.hidden[valid].float(), batch["target_ids"][valid]          # (P, d), (P,)
        if cfg.loss == "ce":
            loss = losses.full_softmax_ce(core, h, targets, cfg.label_smoothing, excluded, out.id_keep,
                                          chunk_items=cfg.ce_chunk_items, kernel=ce_kernel,
                                          max_positions=cfg.batch_size * core.cfg.max_length)
        else:
            neg = losses.draw_negatives(cfg.loss, targets, core.cfg.num_items, cfg.num_negatives, generator, log_q)
            if cfg.loss == "sampled":
                loss = losses.sampled_softmax(core, h, targets, neg.ids, log_q, out.id_keep,
                                              in_batch=cfg.in_batch_negatives)
            elif cfg.loss == "gbce":
                loss = losses.gbce(core, h, targets, neg.ids, cfg.gbce_t, out.id_keep, pick=neg.pick)
            else:
                loss = losses.bce_one_negative(core, h, targets, neg.ids, out.id_keep)
        if out.aux is not None:
            loss = loss + cfg.aux_loss_weight * out.aux.float()
    return loss


def set_seed(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_model_config(cfg: TrainConfig, data: PreparedData, device_type: str = "cpu"
                         ) -> tuple[TrainConfig, Optional[np.ndarray], dict[str, np.ndarray]]:
    """Fill what the data and the device decide (item count, text vector size, event types, item and user attributes,
    whether there are real timestamps, the loss ``auto`` stands for); the text vectors and the attribute tokens
    if used.

    Without real timestamps (e.g. SASRec text files, where the line order is the time order), the time
    gaps of the long/short model would be line-ordinal differences read as seconds: they are switched off.
    """
    model = {**cfg.model.to_dict(), "num_items": data.num_items}
    loss = losses.resolve_loss(cfg.loss, data.num_items, device_type, bool(cfg.cold_items))
    if loss == "ce" and cfg.item_grads == "sparse":
        raise ConfigError(f"train.item_grads sparse needs a sampled loss, and loss {cfg.loss} is ce for "
                          f"{data.num_items:,} items")
    if not data.has_timestamps:
        model["use_time_gap"] = False
    model["type_names"] = data.event_types if cfg.model.use_types else []
    # item attributes: on when asked, or when unset (None) and the data has them; the model saves what was decided
    tables = data.item_features() if cfg.model.use_item_features is not False else {}
    if cfg.model.use_item_features and not tables:
        raise ConfigError(f"model.use_item_features: {data.root} has no item attributes (prepare --item-features)")
    model["use_item_features"] = bool(tables)
    if not tables and not cfg.model.features_on_output:
        raise ConfigError(f"model.features_on_output off: {data.root} has no item attributes for the input side "
                          "(prepare --item-features)")
    features = {name: tokens for name, (_, tokens) in tables.items()}
    model["feature_vocab"] = {name: vocab for name, (vocab, _) in tables.items()}
    model["feature_width"] = {name: int(tokens.shape[1]) for name, tokens in features.items()}
    users = data.user_features() if cfg.model.use_user_features else {}
    if cfg.model.use_user_features and not users:
        raise ConfigError(f"model.use_user_features: {data.root} has no user attributes (prepare --user-features)")
    model["user_feature_vocab"] = {name: vocab for name, (_, vocab, _) in users.items()}
    model["user_feature_kind"] = {name: kind for name, (kind, _, _) in users.items()}
    model["user_feature_width"] = {name: int(tokens.shape[1]) for name, (_, _, tokens) in users.items()}
    vectors = None
    if cfg.model.use_text:
        from raysrec.text.embed import text_vectors  # noqa: PLC0415

        vectors = text_vectors(data.items, data.num_items, where=data.root)
        model["text_dim"] = int(vectors.shape[1])
    return cfg.replace(model=model, loss=loss), vectors, features


def train_loop(cfg: TrainConfig, session: Session) -> dict[str, Any]:
    """Train with early stopping on valid NDCG@10; reports every epoch, checkpoints on rank 0."""
    # Every file this worker writes (checkpoints before Ray uploads them, a downloaded resume checkpoint)
    # lives in one scratch folder, removed however the loop ends.
    with tempfile.TemporaryDirectory(prefix="raysrec-worker-") as scratch:
        return _train(cfg, session, Path(scratch))


def _train(cfg: TrainConfig, session: Session, scratch: Path) -> dict[str, Any]:
    set_seed(cfg.seed)
    # What a worker reads before training (manifest, its shards, text vectors, a checkpoint to resume) can hold
    # a user's mistake. Workers agree on it first, so such a run ends once, in one line, and is not retried.
    error = None
    try:
        data = PreparedData.load(cfg.data)
        cfg, vectors, features = resolve_model_config(cfg, data, session.device.type)
        files = data.shard_files()
        # Each worker reads its own shard files; with fewer files than workers, rows are dealt instead.
        by_file = len(files) >= session.world_size
        seqs = data.read(files[session.rank::session.world_size] if by_file else files, cfg.target_types,
                         cfg.model.use_user_features)
        resume = session.latest_checkpoint(scratch)       # a restarted worker's, or the resumed Ray run's
        if resume is None and cfg.resume_from:
            resume = artifact.fetch(cfg.resume_from, scratch / "resume-from")[0].checkpoint
        if resume is not None:
            check_same_items(artifact.item_ids(resume), data, str(resume))
        model, warm, warm_optim = build_model(cfg.model), None, None
        if cfg.init_from and resume is None:      # a restarted worker resumes its own run instead
            folder, where = artifact.fetch(cfg.init_from, scratch / "init")
            source, _, _ = artifact.load_checkpoint(folder.checkpoint)
            warm = warm_start(model, source, artifact.item_ids(folder.checkpoint), data.item_ids(), where,
                              shrink=cfg.init_shrink, perturb=cfg.init_perturb)
            if cfg.init_optimizer == "carry":
                saved_optim = artifact.read_optimizer_state(folder.checkpoint)
                if saved_optim is None:
                    raise ConfigError(f"{where}: train.init_optimizer carry needs the checkpoint's {artifact.OPTIM_FILE}")
                warm_optim = (saved_optim, match_items(artifact.item_ids(folder.checkpoint), data.item_ids()), where)
        kernel = losses.ce_kernel(cfg.ce_kernel, session.device, cfg.label_smoothing, bool(cfg.cold_items),
                                  cfg.bf16)
    except RaysrecError as exc:
        error = str(exc)
    errors = [e for e in session.gather(error) if e]
    if errors:
        session.stop_with_user_error(errors[0])
        return {"fatal_error": errors[0]}
    cold = held_out_items(data.num_items, cfg.cold_items, cfg.seed) if cfg.cold_items else None
    if cold is not None:
        seqs = without_items(seqs, cold)
    rank, world = (0, 1) if by_file else (session.rank, session.world_size)
    max_len = cfg.model.max_length
    train_ex = training_examples(seqs, max_len, cfg.train_windows)
    valid_ex = evaluation_examples(seqs, max_len, "valid").sample(
        cfg.eval_max_users, cfg.seed, session.rank if by_file else 0, session.world_size if by_file else 1)

    device = session.device
    if vectors is not None:
        model.set_text_vectors(torch.from_numpy(vectors))
    if features:
        model.set_item_features(features)
    model = model.to(device)
    excluded = torch.from_numpy(cold).to(device) if cold is not None else None
    sparse = sparse_item_grads(cfg.item_grads, cfg.loss, cfg.weight_decay, device.type == "cuda") \
        and not cfg.grad_clip
    optimizer = build_optimizer(model, model.item_emb, cfg.lr, cfg.weight_decay, sparse)
    state: dict[str, Any] = {"epoch": 0, "best": -1.0, "best_epoch": -1, "bad_epochs": 0, "history": []}
    if resume is not None:
        core, _, saved = artifact.load_checkpoint(resume, map_location=device)
        model.load_state_dict(core.state_dict())
        artifact.load_optimizer_state(resume, optimizer)
        state = {k: saved[k] for k in state}
    if warm_optim is not None:
        carry_optimizer(optimizer, unwrap(model), *warm_optim)
    # Where every worker runs (node, host, pid, device), kept in the checkpoint state and in
    # metrics.json; a restart after a failure appends the new placement.
    state["workers"] = session.workers()
    state["item_grads"] = "sparse" if sparse else "dense"
    if warm is not None:
        state["init_from"] = {"model": redact(cfg.init_from), **warm, "shrink": cfg.init_shrink,
                              "perturb": cfg.init_perturb, "optimizer": cfg.init_optimizer}
        if session.rank == 0:
            print(f"warm start from {redact(cfg.init_from)}: {warm['known_items']:,} items keep their learned rows, "
                  f"{warm['new_items']:,} new, {warm['dropped_items']:,} no longer in the data", flush=True)
    model = session.wrap_model(model)

    log_q = None
    if cfg.loss == "sampled" and cfg.negative_sampling == "popularity":
        pop = torch.tensor(data.item_popularity(), dtype=torch.float64) + 1.0
        pop[0] = 0.0
        log_q = (pop / pop.sum()).log().float().to(device)
    my_steps = math.ceil(len(train_ex) / world / cfg.batch_size)
    steps = int(session.all_reduce_sum(np.array([0.0] * session.rank + [my_steps] + [0.0] * (session.world_size - session.rank - 1))).max())
    items_file = data.copy_file(ITEMS_FILE, scratch / ITEMS_FILE)
    generator = torch.Generator(device=device.type).manual_seed(cfg.seed * 7919 + session.rank)

    for epoch in range(state["epoch"], cfg.epochs):
        started = time.perf_counter()
        # Re-seeded every epoch (dropout, sampling), so a run resumed from a checkpoint continues
        # exactly as the uninterrupted run would have.
        torch.manual_seed(cfg.seed * 100_003 + epoch * 1_009 + session.rank)
        generator.manual_seed(cfg.seed * 7919 + epoch * 31 + session.rank)
        model.train()
        # Summed on the device: reading a GPU scalar each step would make the host wait for every step.
        loss_sum = torch.zeros((), device=device)
        n_examples = torch.zeros((), dtype=torch.long, device=device)
        n_batches = 0
        with cpu_training_matmuls(device, cfg.bf16):
            for batch in iterate_batches(train_ex, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                                         rank=rank, world_size=world, num_steps=steps, device=device,
                                         group_by_length=cfg.group_by_length):
                loss = compute_loss(model, batch, cfg, log_q, generator, excluded, kernel)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                loss_sum += loss.detach().float()
                n_batches += 1
                n_examples += (batch["target_ids"] > 0).sum()
        loss_sum, n_examples = float(loss_sum), int(n_examples)     # waits for the epoch's last step
        train_seconds = time.perf_counter() - started
        valid_sums = evaluate(unwrap(model), valid_ex, ks=cfg.metric_ks, batch_size=cfg.eval_batch_size, device=device,
                              bf16=cfg.bf16, rank=rank, world_size=world, chunk_items=cfg.eval_chunk_items)
        totals = session.all_reduce_sum(np.concatenate([[loss_sum, n_batches, n_examples], valid_sums]))
        metrics = {"epoch": epoch + 1, "train_loss": totals[0] / max(totals[1], 1),
                   **summarize(totals[3:], cfg.metric_ks, "valid_"),
                   "epoch_seconds": time.perf_counter() - started,
                   "examples_per_second": totals[2] / max(train_seconds, 1e-9)}
        improved = improves(metrics[VALID_METRIC], state["best"])
        state.update(epoch=epoch + 1, bad_epochs=0 if improved else state["bad_epochs"] + 1)
        if improved:
            state.update(best=metrics[VALID_METRIC], best_epoch=epoch + 1)
        metrics["best_" + VALID_METRIC] = state["best"]
        metrics[BEST_SCORE] = metrics[VALID_METRIC] if improved else NOT_BEST
        metrics["best_epoch"] = state["best_epoch"]
        metrics["eta_seconds"] = (cfg.epochs - epoch - 1) * metrics["epoch_seconds"]
        state["history"].append(metrics)
        checkpoint_dir = None
        if session.rank == 0:
            checkpoint_dir = artifact.save_checkpoint(scratch / f"epoch-{epoch + 1:04d}", unwrap(model), cfg,
                                                      {**state, "metrics": metrics}, optimizer, items_file)
        session.report(metrics, checkpoint_dir)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        if state["bad_epochs"] >= cfg.patience:
            break
    return state


class LocalSession:
    """Single process, no Ray: keeps the loop's best checkpoint in ``best_dir`` (and the last in ``last_dir``)."""

    rank, world_size = 0, 1

    def __init__(self, best_dir: str | Path, device: str = "cpu", last_dir: Optional[str | Path] = None,
                 resume_from: Optional[str | Path] = None) -> None:
        self.best_dir = Path(best_dir)
        self.last_dir = Path(last_dir) if last_dir else None
        self.resume_from = Path(resume_from) if resume_from else None
        self.device = torch.device(device)
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
        if checkpoint_dir is None:
            return
        targets = [self.last_dir] if self.last_dir is not None else []
        if metrics["best_epoch"] == metrics["epoch"]:      # the loop decided this epoch is the best so far
            targets.append(self.best_dir)
        for target in targets:
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(checkpoint_dir, target)

    def latest_checkpoint(self, into: Path) -> Optional[Path]:
        return self.resume_from

    def gather(self, value: Any) -> list[Any]:
        return [value]

    def stop_with_user_error(self, message: str) -> None:
        raise InputError(message)

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

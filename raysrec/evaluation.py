"""Evaluation: ranks with a stated tie rule, the full / sampled / cold-start protocols, summaries.

Everything that scores a model on held-out targets goes through this module: the per-epoch
validation of the training loop, the final valid/test figures of train and tune, ``raysrec
evaluate`` and the benchmarks.

**Ranks.** The rank of a target is the number of competing items whose score is *greater than or
equal to* the target's (0-based). Ties count against the target: a model that gives every item
the same score ranks each target last, never first. This is the pessimistic rule (RecBole's
``"full"`` tie breaking is the same idea); it matters where ties are real: untrained rows, cold
items with identical text, or a saturated score.

**Protocols.**

* ``full``: every item competes; the user's history is masked (the target never is), padding
  (index 0) never competes. ``allowed`` may restrict the competitors (e.g. to new items).
* ``sampled`` (the SASRec paper's): the target against ``num_sampled`` items drawn uniformly from
  those the user never touched.
* cold start (DropoutNet and its successors): a seeded share of the items is held out of
  training (:func:`held_out_items`, :func:`without_items`); the test rows whose target is one of
  them are scored against the whole catalogue, or among the held-out items only.

**Metrics**, with ``r`` the 0-based rank and ``K`` the cut-off, summed over rows (so workers can
all-reduce the sums) and divided by the row count in :func:`summarize`:

* ``HR@K  = 1[r < K]``
* ``NDCG@K = 1[r < K] / log2(r + 2)`` (one relevant item: the ideal DCG is 1)
* ``MRR@K = 1[r < K] / (r + 1)``

**Samples.** Full ranking costs users x items: scoring 200k users over a million items is minutes per split on
CPU. The final figures of a run (``metrics.json``) are therefore taken on a fixed, seeded sample of
``train.final_eval_max_users`` users when there are more (0: every user), and each comes with the half-width
of its 95 % confidence interval (:func:`confidence`: normal approximation over the sampled users, with the
finite-population correction), so a sampled figure says how far it can be from the every-user one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch

from raysrec import artifact
from raysrec.data.examples import Examples, evaluation_examples, iterate_batches, subset
from raysrec.data.storage import PreparedData, SequenceSet
from raysrec.errors import CheckpointError, ConfigError
from raysrec.models.sequential import SequentialRecommender, autocast

Protocol = Literal["full", "sampled"]


# ---------------------------------------------------------------- ranks and metrics (pure tensors)
def full_ranking_ranks(scores: torch.Tensor, targets: torch.Tensor, history: Optional[torch.Tensor],
                       allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """0-based rank of each target, ties against it; ``scores`` (B, N+1), ``targets`` (B,), ``history`` (B, H)
    0-padded. ``allowed`` (N+1,) bool restricts the competitors (e.g. to new items); the target always competes.
    """
    scores = scores.float().clone()
    target_score = scores.gather(1, targets[:, None])                          # (B, 1)
    if allowed is not None:
        scores.masked_fill_(~allowed.to(scores.device), float("-inf"))
    if history is not None:
        scores.scatter_(1, history, float("-inf"))
    scores[:, 0] = float("-inf")
    # The target's own column is taken out of the count; every other item scoring >= it ranks above it.
    scores.scatter_(1, targets[:, None], float("nan"))
    return (scores >= target_score).sum(1)


def full_ranking_ranks_chunked(hidden: torch.Tensor, table: torch.Tensor, targets: torch.Tensor,
                               history: Optional[torch.Tensor], allowed: Optional[torch.Tensor] = None,
                               chunk_items: int = 65536) -> torch.Tensor:
    """:func:`full_ranking_ranks` of ``hidden @ table.T`` without the (B, N+1) score matrix: the items are
    scored ``chunk_items`` at a time, so memory is O(B x chunk). hidden (B, d), table (N+1, d).

    The tie rule needs equal items to get equal scores. An fp32 matmul does not promise that: BLAS kernels for
    other widths (the last chunk's, a chunk of 100 columns) and for the edge columns of one matmul round
    differently, and so did the element-wise product the target's score came from (with all item vectors
    equal, 110 of 256 targets ranked below N-1, some at 0). So scores are accumulated in fp64 and rounded to
    fp32: two fp64 sums of the same products differ by a few fp64 ulps and round to the same fp32 value (about
    1.5x the fp32 time on CPU). And the target's score is read from the matmul that scores its competitors:
    rows are taken in groups by the chunk their target falls in, that chunk is scored first, then the other
    chunks of the same rows; every row and chunk is still scored once.
    """
    hidden = hidden.double()
    ranks = torch.zeros(len(targets), dtype=torch.long, device=hidden.device)
    starts = list(range(0, table.shape[0], chunk_items))
    target_chunk = torch.div(targets, chunk_items, rounding_mode="floor")
    for home in torch.unique(target_chunk).tolist():
        rows = torch.nonzero(target_chunk == home).squeeze(1)
        h, t = hidden[rows], targets[rows]
        hist = history[rows] if history is not None else None
        target_score = None
        for start in [starts[home]] + [s for s in starts if s != starts[home]]:
            scores = (h @ table[start:start + chunk_items].double().T).float()    # (b, c), see above
            width = scores.shape[1]
            if target_score is None:                                             # the target's own chunk
                target_score = scores.gather(1, (t - start)[:, None])            # (b, 1)
            competes = torch.ones_like(scores, dtype=torch.bool)
            if allowed is not None:
                competes &= allowed[start:start + width].to(scores.device)
            if start == 0:
                competes[:, 0] = False                                            # padding
            if hist is not None:
                local = hist - start
                inside = (hist > 0) & (local >= 0) & (local < width)
                r, c = torch.nonzero(inside, as_tuple=True)
                competes[r, local[r, c]] = False
            if start == starts[home]:                                            # the target is no competitor
                competes[torch.arange(len(t), device=t.device), t - start] = False
            ranks[rows] += ((scores >= target_score) & competes).sum(1)
    return ranks


def sampled_candidates(targets: torch.Tensor, history: Optional[torch.Tensor], num_items: int, num_negatives: int,
                       generator: Optional[torch.Generator] = None, max_cells: int = 1 << 24) -> torch.Tensor:
    """(B, 1 + n) candidates: the target first, then n distinct items the user never touched, uniformly.

    Up to ``max_cells`` (B x catalogue) a seen-mask is drawn from in one call; above it, each row draws by
    rejection, so memory does not grow with the catalogue.
    """
    if len(targets) * (num_items + 1) > max_cells:
        return _sampled_by_rejection(targets, history, num_items, num_negatives, generator)
    seen = torch.zeros(len(targets), num_items + 1, dtype=torch.bool, device=targets.device)
    if history is not None:
        seen.scatter_(1, history, True)
    seen[:, 0] = True
    seen.scatter_(1, targets[:, None], True)
    weights = (~seen).float()
    n = min(num_negatives, int(weights.sum(1).min().item()))
    negatives = torch.multinomial(weights.cpu(), n, replacement=False, generator=generator).to(targets.device)
    return torch.cat([targets[:, None], negatives], dim=1)


def _sampled_by_rejection(targets: torch.Tensor, history: Optional[torch.Tensor], num_items: int, num_negatives: int,
                          generator: Optional[torch.Generator]) -> torch.Tensor:
    rows = []
    for r, target in enumerate(targets.tolist()):
        seen = {0, target, *(history[r].tolist() if history is not None else [])}
        wanted = min(num_negatives, num_items + 1 - len(seen))
        picked: dict[int, None] = {}                      # insertion-ordered set
        while len(picked) < wanted:
            for item in torch.randint(1, num_items + 1, (2 * (wanted - len(picked)),), generator=generator).tolist():
                if item not in seen and item not in picked and len(picked) < wanted:
                    picked[item] = None
        rows.append([target, *picked])
    width = min(len(row) for row in rows)
    return torch.tensor([row[:width] for row in rows], dtype=torch.long, device=targets.device)


def sampled_ranks(candidate_scores: torch.Tensor) -> torch.Tensor:
    """0-based rank of column 0 (the target) among the candidates, ties against it."""
    return (candidate_scores[:, 1:].float() >= candidate_scores[:, :1].float()).sum(1)


def metric_keys(ks: Iterable[int]) -> list[str]:
    return [f"{m}@{k}" for k in ks for m in ("ndcg", "hr", "mrr")]


def metric_values(ranks: torch.Tensor, ks: Iterable[int]) -> dict[str, torch.Tensor]:
    """Each row's NDCG@K, HR@K and MRR@K (formulas in the module docstring), in :func:`metric_keys` order."""
    out: dict[str, torch.Tensor] = {}
    ranks = ranks.double()
    for k in ks:
        hit = ranks < k
        out[f"ndcg@{k}"] = hit / torch.log2(ranks + 2.0)
        out[f"hr@{k}"] = hit.double()
        out[f"mrr@{k}"] = hit / (ranks + 1.0)
    return out


def metric_sums(ranks: torch.Tensor, ks: Iterable[int]) -> dict[str, float]:
    """Sums (not means) of :func:`metric_values` over the rows."""
    return {key: float(v.sum()) for key, v in metric_values(ranks, ks).items()}


def summarize(totals: np.ndarray, ks: Iterable[int], prefix: str = "") -> dict[str, float]:
    """``[count, sums in metric_keys order, ...]`` -> means, keys prefixed (``valid_ndcg@10``)."""
    count = max(totals[0], 1.0)
    return {f"{prefix}{key}": float(v / count) for key, v in zip(metric_keys(ks), totals[1:])}


def confidence(totals: np.ndarray, ks: Iterable[int], population: int, z: float = 1.96) -> dict[str, float]:
    """Half-widths of the confidence intervals (95 % at the default ``z``) of the means of
    ``[count, sums..., sums of squares...]`` (:func:`evaluate`'s totals) over ``count`` rows drawn without
    replacement from ``population``: ``z * sd / sqrt(n) * sqrt((N - n) / (N - 1))``. Zero when every row was
    scored (the figure is then exact for these users, not an estimate)."""
    keys = metric_keys(ks)
    n = float(totals[0])
    sums, squares = totals[1:1 + len(keys)], totals[1 + len(keys):1 + 2 * len(keys)]
    if n < 2 or population <= n:
        return {key: 0.0 for key in keys}
    variance = np.maximum(squares / n - (sums / n) ** 2, 0.0) * n / (n - 1)
    correction = (population - n) / (population - 1)
    return {key: float(z * np.sqrt(v / n * correction)) for key, v in zip(keys, variance)}


# ---------------------------------------------------------------- the cold-start protocol
def held_out_items(num_items: int, share: float, seed: int) -> np.ndarray:
    """(num_items + 1,) bool: a seeded ``share`` of the items, held out of training (cold-start protocol)."""
    mask = np.zeros(num_items + 1, bool)
    count = int(round(share * num_items))
    if count:
        mask[1 + np.random.default_rng([seed, 17]).choice(num_items, count, replace=False)] = True
    return mask


def without_items(seqs: SequenceSet, drop: np.ndarray) -> SequenceSet:
    """``seqs`` with the items marked in ``drop`` removed from every history, the held-out valid and
    test targets kept: as if those items had not existed before the split."""
    keep = ~drop[seqs.items]
    pos = seqs.positions()
    for at in (pos.valid_at, pos.test_at):
        has = at >= 0
        keep[seqs.offsets[:-1][has] + at[has]] = True
    counts = np.add.reduceat(keep.astype(np.int64), seqs.offsets[:-1]) if len(seqs) else np.zeros(0, np.int64)
    counts[seqs.lengths == 0] = 0
    return SequenceSet(seqs.user_index.copy(), np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                       seqs.items[keep], seqs.times[keep], seqs.split,
                       seqs.types[keep] if seqs.types is not None else None, seqs.user_tokens)


# ---------------------------------------------------------------- a model over examples
@torch.no_grad()
def iterate_ranks(model: SequentialRecommender, examples: Examples, *, batch_size: int, device: torch.device,
                  bf16: bool = False, protocol: Protocol = "full", rank: int = 0, world_size: int = 1,
                  num_sampled: int = 100, seed: int = 0, allowed: Optional[torch.Tensor] = None,
                  chunk_items: int = 65536) -> Iterator[torch.Tensor]:
    """The 0-based rank of each row's target, one tensor per batch of this worker's share of ``examples`` (in
    their order), on the device. Full ranking scores the catalogue ``chunk_items`` at a time: no (batch x
    catalogue) matrix is held."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    for batch in iterate_batches(examples, batch_size, rank=rank, world_size=world_size, device=device,
                                 with_history=True):
        with autocast(device, bf16):
            hidden = model(batch).user                                          # (B, d) newest position
        targets = batch["target_ids"][:, -1]
        if protocol == "full":
            yield full_ranking_ranks_chunked(hidden, model.item_rows(), targets, batch["history"], allowed,
                                             chunk_items)
        else:
            candidates = sampled_candidates(targets, batch["history"], model.cfg.num_items, num_sampled, generator)
            yield sampled_ranks(model.score_items(hidden.float(), candidates))


def evaluate(model: SequentialRecommender, examples: Examples, *, ks: Iterable[int], **options: Any) -> np.ndarray:
    """Metric sums over this worker's share of ``examples``: ``[count, sums in metric_keys(ks) order, sums of
    squares in the same order]`` (the squares give :func:`confidence`; :func:`summarize` reads the sums).
    ``options`` are :func:`iterate_ranks`'s."""
    ks = list(ks)
    keys = metric_keys(ks)
    totals = np.zeros(1 + 2 * len(keys))
    for ranks in iterate_ranks(model, examples, **options):
        values = metric_values(ranks, ks)
        stacked = torch.stack([values[k] for k in keys])                      # (metrics, B), on the device
        totals[0] += len(ranks)
        totals[1:] += torch.cat([stacked.sum(1), (stacked * stacked).sum(1)]).cpu().numpy()   # one transfer
    return totals


def check_same_items(checkpoint_items: np.ndarray, data: PreparedData, where: str) -> None:
    """The checkpoint's item index (original ids in index order) must be the data's, id for id."""
    data_items = data.item_ids()
    if len(checkpoint_items) != len(data_items) or not np.array_equal(
            checkpoint_items.astype(str), data_items.astype(str)):
        differ = next((i for i, (a, b) in enumerate(zip(checkpoint_items, data_items)) if str(a) != str(b)),
                      min(len(checkpoint_items), len(data_items)))
        raise CheckpointError(f"{where}: the model's item index ({len(checkpoint_items)} items) is not the one of "
                              f"{data.root} ({len(data_items)} items; first difference at index {differ + 1}): "
                              "evaluate on the prepared folder the model was trained on")


class CheckpointEvaluator:
    """A saved model and the prepared folder it was trained on, loaded once (checkpoint verified, item index
    compared, shards read), then scored on any split, protocol or cold-start subset."""

    def __init__(self, data_dir: str | Path, model_dir: str | Path, device: str = "cpu") -> None:
        folder = artifact.resolve(model_dir).checkpoint
        self.model, self.cfg, _ = artifact.load_checkpoint(folder, map_location=device)
        data = PreparedData.load(data_dir)
        check_same_items(artifact.item_ids(folder), data, str(model_dir))
        self.model.to(device)
        self.device = torch.device(device)
        # the targets the model was trained for, and its users' attributes if it reads them
        self.seqs = data.read(target_types=self.cfg.target_types, user_features=self.model.cfg.use_user_features)
        self.cold = held_out_items(data.num_items, self.cfg.cold_items, self.cfg.seed) if self.cfg.cold_items else None
        if self.cold is not None:
            self.seqs = without_items(self.seqs, self.cold)

    def score(self, split: Literal["valid", "test"] = "test", protocol: Protocol = "full", seed: int = 0,
              targets: Literal["all", "cold", "warm"] = "all", candidates: Literal["all", "cold"] = "all",
              max_users: Optional[int] = None) -> dict[str, float]:
        """See :func:`evaluate_checkpoint`. ``max_users`` bounds the users scored (a fixed, seeded sample; unset:
        the model's ``final_eval_max_users``, the bound of its ``metrics.json``; 0: every user); when fewer users
        than there are get scored, the figures carry ``users_total`` and the half-widths of their 95 %
        confidence intervals (``ci95_ndcg@10``, ...)."""
        cfg, cold = self.cfg, self.cold
        if max_users is not None and max_users < 0:
            raise ConfigError(f"max_users must be >= 0 (0: every user), got {max_users}")
        if targets != "all" and cold is None:
            raise ConfigError(f"targets={targets!r} needs a model trained with cold_items > 0")
        if candidates == "cold" and (targets != "cold" or protocol != "full"):
            raise ConfigError("candidates='cold' needs targets='cold' and the full protocol")
        examples = evaluation_examples(self.seqs, self.model.cfg.max_length, split)
        if cold is not None and targets != "all":
            is_cold = cold[examples.targets()]
            examples = subset(examples, np.flatnonzero(is_cold if targets == "cold" else ~is_cold))
        population = len(examples)
        examples = examples.sample(cfg.final_eval_max_users if max_users is None else max_users, cfg.seed)
        allowed = torch.from_numpy(cold) if candidates == "cold" and cold is not None else None
        totals = evaluate(self.model, examples, ks=cfg.metric_ks, batch_size=cfg.eval_batch_size, device=self.device,
                          bf16=cfg.bf16, protocol=protocol, seed=seed, allowed=allowed,
                          chunk_items=cfg.eval_chunk_items)
        scores = {**summarize(totals, cfg.metric_ks), "rows": int(totals[0])}
        if totals[0] < population:
            scores["users_total"] = population
            scores.update({f"ci95_{k}": v for k, v in confidence(totals, cfg.metric_ks, population).items()})
        return scores


def evaluate_checkpoint(data_dir: str | Path, model_dir: str | Path, protocol: Protocol = "full",
                        split: Literal["valid", "test"] = "test", device: str = "cpu", seed: int = 0,
                        targets: Literal["all", "cold", "warm"] = "all",
                        candidates: Literal["all", "cold"] = "all", max_users: Optional[int] = None) -> dict[str, float]:
    """Score a saved model on the valid or test targets of the prepared folder it was trained on.

    ``targets``: ``all``, or (for a model trained with ``cold_items``) only the rows whose target is
    a held-out ``cold`` item, or a ``warm`` one. ``candidates``: ``all`` items compete, or only the
    held-out ``cold`` ones (how well new items are ranked among the new items, e.g. for a "new
    arrivals" slot). ``max_users``: see :meth:`CheckpointEvaluator.score`.
    """
    return CheckpointEvaluator(data_dir, model_dir, device).score(split, protocol, seed, targets, candidates,
                                                                  max_users)


def final_scores(checkpoint: str | Path, data: str, device: str = "cpu") -> dict[str, Any]:
    """The figures a model folder carries: valid and test metrics and, for the cold-start protocol, ``cold``.
    The checkpoint and the data are loaded once for all of them."""
    evaluator = CheckpointEvaluator(data, checkpoint, device)
    cold = None
    if evaluator.cold is not None:
        cold = {"test_cold": evaluator.score(targets="cold"), "test_warm": evaluator.score(targets="warm"),
                "test_cold_among_cold": evaluator.score(targets="cold", candidates="cold")}
    return {"valid": evaluator.score(split="valid"),
            "test": evaluator.score(split="test"), "cold": cold}

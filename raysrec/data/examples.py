"""Per-user sequences -> padded next-item examples and batches (training and evaluation).

Batches are left-padded (index 0), so position -1 is always the most recent item, as in SASRec.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Literal, Optional

import numpy as np
import torch

from raysrec.data.storage import SequenceSet

Split = Literal["train", "valid", "test"]


@dataclasses.dataclass
class Examples:
    """Padded next-item examples: ``input_ids[b, t]`` is followed by ``target_ids[b, t]``.

    For training every position has a target; for evaluation only the last one does (earlier
    targets are 0). ``history_*`` hold each row's full history (CSR) for masking seen items.
    """

    input_ids: np.ndarray      # (N, L) int64, 0 = padding (left)
    target_ids: np.ndarray     # (N, L) int64, 0 = no target
    input_times: np.ndarray    # (N, L) float64
    target_times: np.ndarray   # (N, L) float64
    user_index: np.ndarray     # (N,) int32
    history_offsets: Optional[np.ndarray] = None
    history_items: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.input_ids)


def subset(examples: Examples, rows: np.ndarray) -> Examples:
    """The examples at ``rows`` (histories included)."""
    history_offsets = history_items = None
    if examples.history_offsets is not None:
        starts, ends = examples.history_offsets[rows], examples.history_offsets[rows + 1]
        history_items = np.concatenate([examples.history_items[a:b] for a, b in zip(starts, ends)]) \
            if len(rows) else np.zeros(0, examples.history_items.dtype)
        history_offsets = np.concatenate([[0], np.cumsum(ends - starts)])
    return Examples(examples.input_ids[rows], examples.target_ids[rows], examples.input_times[rows],
                    examples.target_times[rows], examples.user_index[rows], history_offsets, history_items)


def _left_pad(rows: list[np.ndarray], length: int, dtype) -> np.ndarray:
    out = np.zeros((len(rows), length), dtype)
    for r, values in enumerate(rows):
        if len(values):
            out[r, length - len(values):] = values
    return out


def training_examples(seqs: SequenceSet, max_length: int, windows: Literal["last", "all"] = "all") -> Examples:
    """Training rows from each user's training events (``seq[:-2]`` under leave-one-out, the events
    before the validation cut under a global time split).

    ``windows='last'`` keeps the newest ``max_length`` positions per user (the SASRec paper);
    ``'all'`` also cuts older history into further non-overlapping windows so every training
    target is used once per epoch.
    """
    train_end = seqs.positions().train_end
    inputs, targets, in_t, tg_t, users = [], [], [], [], []
    for u in range(len(seqs)):
        lo = seqs.offsets[u]
        hi = lo + train_end[u]    # train part = [lo, hi)
        n_targets = hi - lo - 1
        end = hi
        while n_targets > 0:
            take = min(max_length, n_targets)
            inputs.append(seqs.items[end - take - 1:end - 1])
            targets.append(seqs.items[end - take:end])
            in_t.append(seqs.times[end - take - 1:end - 1])
            tg_t.append(seqs.times[end - take:end])
            users.append(seqs.user_index[u])
            end -= take
            n_targets -= take
            if windows == "last":
                break
    return Examples(_left_pad(inputs, max_length, np.int64), _left_pad(targets, max_length, np.int64),
                    _left_pad(in_t, max_length, np.float64), _left_pad(tg_t, max_length, np.float64),
                    np.asarray(users, np.int32))


def evaluation_examples(seqs: SequenceSet, max_length: int, split: Split) -> Examples:
    """One row per user with a ``split`` target: the history before the held-out item, the item as the
    last target; the seen-item mask is that history.

    Leave-one-out: ``valid`` has history ``seq[:-2]`` and target ``seq[-2]``; ``test`` has history
    ``seq[:-1]`` (the valid item included, as in SASRec) and target ``seq[-1]``. Global time: the
    user's first event in the period, after everything before it.
    """
    at = seqs.positions().target(split)
    users = np.flatnonzero(at >= 0)
    n = len(users)
    input_ids = np.zeros((n, max_length), np.int64)
    input_times = np.zeros((n, max_length), np.float64)
    target_ids = np.zeros((n, max_length), np.int64)
    target_times = np.zeros((n, max_length), np.float64)
    hist_lengths = at[users].astype(np.int64)
    history = np.zeros(int(hist_lengths.sum()), seqs.items.dtype)
    h = 0
    for r, u in enumerate(users):
        lo = seqs.offsets[u]
        target = lo + at[u]
        start = max(lo, target - max_length)
        k = target - start
        input_ids[r, max_length - k:] = seqs.items[start:target]
        input_times[r, max_length - k:] = seqs.times[start:target]
        target_ids[r, -1] = seqs.items[target]
        target_times[r, -1] = seqs.times[target]
        history[h:h + at[u]] = seqs.items[lo:target]
        h += at[u]
    return Examples(input_ids, target_ids, input_times, target_times, seqs.user_index[users].copy(),
                    np.concatenate([[0], np.cumsum(hist_lengths)]), history)


def sample_negatives(target_ids: torch.Tensor, num_items: int, num_negatives: int,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Uniform negatives in 1..num_items, shape (*target.shape, num_negatives), never equal to the target."""
    shape = (*target_ids.shape, num_negatives)
    neg = torch.randint(1, num_items + 1, shape, generator=generator, device=target_ids.device)
    clash = neg == target_ids.unsqueeze(-1)
    if clash.any():  # shift clashes to the next item (stays uniform over the other items)
        neg = torch.where(clash, neg % num_items + 1, neg)
    return neg


def iterate_batches(examples: Examples, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                    rank: int = 0, world_size: int = 1, num_steps: Optional[int] = None,
                    num_items: int = 0, num_negatives: int = 0, device: str | torch.device = "cpu",
                    with_history: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches for worker ``rank`` of ``world_size``.

    Rows are shuffled with (seed, epoch) and dealt round-robin to workers. ``num_steps`` makes
    every worker take the same number of steps (DDP needs that): short shards wrap around.
    """
    n = len(examples)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    mine = order[rank::world_size]
    steps = num_steps if num_steps is not None else -(-len(mine) // batch_size)
    if len(mine) == 0:
        return
    generator = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + epoch * 101 + rank)
    for step in range(steps):
        idx = mine[np.arange(step * batch_size, (step + 1) * batch_size) % len(mine)] if num_steps is not None \
            else mine[step * batch_size:(step + 1) * batch_size]
        batch = {
            "input_ids": torch.from_numpy(examples.input_ids[idx]),
            "target_ids": torch.from_numpy(examples.target_ids[idx]),
            "input_times": torch.from_numpy(examples.input_times[idx]),
            "target_times": torch.from_numpy(examples.target_times[idx]),
        }
        batch["padding_mask"] = batch["input_ids"] != 0
        if num_negatives:
            batch["negative_ids"] = sample_negatives(batch["target_ids"], num_items, num_negatives, generator)
        if with_history:
            batch["history"] = history_matrix(examples, idx)
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def history_matrix(examples: Examples, idx: np.ndarray) -> torch.Tensor:
    """(B, H) right-padded matrix of each row's full history, for masking already-seen items."""
    offsets, items = examples.history_offsets, examples.history_items
    lengths = offsets[idx + 1] - offsets[idx]
    out = np.zeros((len(idx), max(1, int(lengths.max()) if len(idx) else 1)), np.int64)
    for r, u in enumerate(idx):
        out[r, :lengths[r]] = items[offsets[u]:offsets[u + 1]]
    return torch.from_numpy(out)

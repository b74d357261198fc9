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
    """Next-item rows over a :class:`SequenceSet`, cut from its CSR arrays only when a batch is built.

    A row is a window of one user's sequence: the items ``[stop - count - 1, stop - 1)`` (absolute
    positions in ``seqs.items``) are followed by ``[stop - count, stop)``. A row costs 20 bytes whatever
    ``max_length`` is, so a worker's memory grows with its events, not with its windows (a padded
    (N, L) matrix of ids and times costs 32 x L bytes a row: 1.6 KB at L = 50).

    Training rows (``last_only=False``) have a target at every position. Evaluation rows
    (``last_only=True``) have one, the newest, and carry their full history ``[user start, target)``
    for masking seen items. Batches are left-padded (index 0), so position -1 is the newest item.
    """

    seqs: SequenceSet
    max_length: int
    stop: np.ndarray           # (N,) int64: one past the row's newest target
    count: np.ndarray          # (N,) int32: positions in the row (targets, or history shown, for evaluation)
    owner: np.ndarray          # (N,) int32: local user of the row
    last_only: bool = False

    def __len__(self) -> int:
        return len(self.stop)

    def subset(self, rows: np.ndarray) -> Examples:
        return dataclasses.replace(self, stop=self.stop[rows], count=self.count[rows], owner=self.owner[rows])

    def sample(self, max_rows: Optional[int], seed: int, rank: int = 0, parts: int = 1) -> Examples:
        """A fixed, seeded sample of ``max_rows`` rows in all (``parts`` workers holding different rows take
        their share each), in their order; all of them when ``max_rows`` is unset or not smaller."""
        share = -(-max_rows // parts) if max_rows else None
        if share is None or len(self) <= share:
            return self
        return self.subset(np.sort(np.random.default_rng([seed, 29, rank]).choice(len(self), share, replace=False)))

    @property
    def user_index(self) -> np.ndarray:
        return self.seqs.user_index[self.owner]

    def targets(self) -> np.ndarray:
        """(N,) the newest target of every row (an evaluation row's only one)."""
        return self.seqs.items[self.stop - 1].astype(np.int64)

    def batch(self, idx: np.ndarray, with_history: bool = False) -> dict[str, np.ndarray]:
        """Rows ``idx`` as left-padded (B, L) arrays; ``history`` (B, H), right-padded, if asked."""
        length = self.max_length
        stop, count = self.stop[idx], self.count[idx].astype(np.int64)
        col = np.arange(length)
        shown = col >= length - count[:, None]                                  # (B, L) non-padding
        at = np.where(shown, stop[:, None] - length + col, 0)                    # absolute target positions
        items, times = self.seqs.items, self.seqs.times
        out = {"input_ids": np.where(shown, items[np.maximum(at - 1, 0)], 0).astype(np.int64),
               "input_times": np.where(shown, times[np.maximum(at - 1, 0)], 0.0)}
        if self.last_only:
            out["target_ids"] = np.zeros((len(idx), length), np.int64)
            out["target_times"] = np.zeros((len(idx), length), np.float64)
            out["target_ids"][:, -1], out["target_times"][:, -1] = items[stop - 1], times[stop - 1]
        else:
            out["target_ids"] = np.where(shown, items[at], 0).astype(np.int64)
            out["target_times"] = np.where(shown, times[at], 0.0)
        if with_history:
            out["history"] = self.history(idx)
        return out

    def history(self, idx: np.ndarray) -> np.ndarray:
        """(B, H) right-padded: each row's whole history before its newest target (seen-item masking)."""
        start = self.seqs.offsets[self.owner[idx]]
        lengths = self.stop[idx] - 1 - start
        width = max(1, int(lengths.max()) if len(idx) else 1)
        col = np.arange(width)
        inside = col < lengths[:, None]
        return np.where(inside, self.seqs.items[np.where(inside, start[:, None] + col, 0)], 0).astype(np.int64)

    # The whole set as padded matrices: for tests and small sets (a real epoch goes through ``batch``).
    @property
    def input_ids(self) -> np.ndarray:
        return self.batch(np.arange(len(self)))["input_ids"]

    @property
    def target_ids(self) -> np.ndarray:
        return self.batch(np.arange(len(self)))["target_ids"]

    @property
    def input_times(self) -> np.ndarray:
        return self.batch(np.arange(len(self)))["input_times"]

    @property
    def target_times(self) -> np.ndarray:
        return self.batch(np.arange(len(self)))["target_times"]


def subset(examples: Examples, rows: np.ndarray) -> Examples:
    """The examples at ``rows``."""
    return examples.subset(rows)


def training_examples(seqs: SequenceSet, max_length: int, windows: Literal["last", "all"] = "all") -> Examples:
    """Training rows from each user's training events (``seq[:-2]`` under leave-one-out, the events
    before the validation cut under a global time split).

    ``windows='last'`` keeps the newest ``max_length`` positions per user (the SASRec paper);
    ``'all'`` also cuts older history into further non-overlapping windows, newest first, so every
    training target is used once per epoch. Vectorised: no Python loop over users or windows.
    """
    n_targets = np.maximum(seqs.positions().train_end.astype(np.int64) - 1, 0)     # per user
    per_user = -(-n_targets // max_length) if windows == "all" else (n_targets > 0).astype(np.int64)
    owner = np.repeat(np.arange(len(seqs), dtype=np.int32), per_user)
    k = np.arange(len(owner)) - np.repeat(np.cumsum(per_user) - per_user, per_user)  # 0 = newest window
    stop = seqs.offsets[:-1][owner] + n_targets[owner] + 1 - k * max_length
    count = np.minimum(max_length, n_targets[owner] - k * max_length).astype(np.int32)
    return Examples(seqs, max_length, stop.astype(np.int64), count, owner)


def evaluation_examples(seqs: SequenceSet, max_length: int, split: Split) -> Examples:
    """One row per user with a ``split`` target: the history before the held-out item, the item as the
    last target; the seen-item mask is that history.

    Leave-one-out: ``valid`` has history ``seq[:-2]`` and target ``seq[-2]``; ``test`` has history
    ``seq[:-1]`` (the valid item included, as in SASRec) and target ``seq[-1]``. Global time: the
    user's first event in the period, after everything before it.
    """
    at = seqs.positions().target(split)
    owner = np.flatnonzero(at >= 0).astype(np.int32)
    stop = seqs.offsets[:-1][owner] + at[owner] + 1
    count = np.minimum(max_length, at[owner]).astype(np.int32)
    return Examples(seqs, max_length, stop.astype(np.int64), count, owner, last_only=True)


def sample_negatives(target_ids: torch.Tensor, num_items: int, num_negatives: int,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Negatives drawn uniformly from the items other than the target (each with probability 1/(N-1)), shape
    (*target.shape, num_negatives). A draw from 1..N-1 skips over the target: values at or above it move up one.
    (Padding positions, target 0, draw from 2..N.)"""
    shape = (*target_ids.shape, num_negatives)
    neg = torch.randint(1, max(num_items, 2), shape, generator=generator, device=target_ids.device)
    return neg + (neg >= target_ids.unsqueeze(-1)).long()


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
        batch = {k: torch.from_numpy(v) for k, v in examples.batch(idx, with_history).items()}
        batch["padding_mask"] = batch["input_ids"] != 0
        if num_negatives:
            batch["negative_ids"] = sample_negatives(batch["target_ids"], num_items, num_negatives, generator)
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def history_matrix(examples: Examples, idx: np.ndarray) -> torch.Tensor:
    """(B, H) right-padded matrix of each row's full history, for masking already-seen items."""
    return torch.from_numpy(examples.history(idx))

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
from raysrec.models.inputs import model_input, to_tensors, window

Split = Literal["train", "valid", "test"]


def sample_rows(count: int, max_rows: Optional[int], seed: int, rank: int = 0, parts: int = 1) -> Optional[np.ndarray]:
    """The sorted row indices of :meth:`Examples.sample` among ``count`` rows (``None``: every row)."""
    share = -(-max_rows // parts) if max_rows else None
    if share is None or count <= share:
        return None
    return np.sort(np.random.default_rng([seed, 29, rank]).choice(count, share, replace=False))


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
        rows = sample_rows(len(self), max_rows, seed, rank, parts)
        return self if rows is None else self.subset(rows)

    @property
    def user_index(self) -> np.ndarray:
        return self.seqs.user_index[self.owner]

    def targets(self) -> np.ndarray:
        """(N,) the newest target of every row (an evaluation row's only one)."""
        return self.seqs.items[self.stop - 1].astype(np.int64)

    def batch(self, idx: np.ndarray, with_history: bool = False, trim: bool = True) -> dict[str, np.ndarray]:
        """Rows ``idx``: the model input of :func:`raysrec.models.inputs.model_input` (left-padded (B, W)), the
        targets, and ``history`` (B, H), right-padded, if asked.

        W is the longest row of the batch (``trim``), else ``max_length``. Positions are counted from the right
        (the newest item is always column -1, with the last position embedding), padding is masked in attention
        and has no target, so a trimmed batch gives the model's outputs and the loss of the padded one, without
        the work on padding (tests/data/test_trimmed_batches.py).
        """
        stop, count = self.stop[idx], self.count[idx].astype(np.int64)
        last = self.seqs.items[stop - 1].astype(np.int64)          # each row's newest target
        out = model_input(self.seqs.events(), stop - 1, count, self.seqs.times[stop - 1],
                          None if trim else self.max_length, self.seqs.users_of(self.owner[idx]))
        length = out["input_ids"].shape[1]
        out["target_ids"] = np.zeros((len(idx), length), np.int64)
        out["target_ids"][:, -1] = last
        if not self.last_only:      # a position's target is the next input (rows are contiguous, left-padded)
            following = out["input_ids"][:, 1:]
            out["target_ids"][:, :-1] = np.where(out["padding_mask"][:, :-1], following, 0)
            eligible = self.seqs.target_flags()
            if eligible is not None:    # only events of the target types are targets; the input keeps them all
                at, shown = window(stop, count, length)
                out["target_ids"] *= shown & eligible[at]
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

    # The whole set as (N, max_length) padded matrices: for tests and small sets (an epoch goes through ``batch``).
    @property
    def input_ids(self) -> np.ndarray:
        return self.batch(np.arange(len(self)), trim=False)["input_ids"]

    @property
    def target_ids(self) -> np.ndarray:
        return self.batch(np.arange(len(self)), trim=False)["target_ids"]

    @property
    def input_times(self) -> np.ndarray:
        return self.batch(np.arange(len(self)), trim=False)["input_times"]

    @property
    def target_times(self) -> np.ndarray:
        return self.batch(np.arange(len(self)), trim=False)["target_times"]


def subset(examples: Examples, rows: np.ndarray) -> Examples:
    """The examples at ``rows``."""
    return examples.subset(rows)


def training_examples(seqs: SequenceSet, max_length: int, windows: Literal["last", "all"] = "all") -> Examples:
    """Training rows from each user's training events (``seq[:-2]`` under leave-one-out, the events
    before the validation cut under a global time split).

    ``windows='last'`` keeps the newest ``max_length`` positions per user (the SASRec paper);
    ``'all'`` also cuts older history into further non-overlapping windows, newest first, so every
    training target is used once per epoch. Vectorised: no Python loop over users or windows. With target types
    (``split.target_types``) only events of those types are targets, and windows holding none are left out.
    """
    n_targets = np.maximum(seqs.positions().train_end.astype(np.int64) - 1, 0)     # per user
    per_user = -(-n_targets // max_length) if windows == "all" else (n_targets > 0).astype(np.int64)
    owner = np.repeat(np.arange(len(seqs), dtype=np.int32), per_user)
    k = np.arange(len(owner)) - np.repeat(np.cumsum(per_user) - per_user, per_user)  # 0 = newest window
    stop = seqs.offsets[:-1][owner] + n_targets[owner] + 1 - k * max_length
    count = np.minimum(max_length, n_targets[owner] - k * max_length).astype(np.int32)
    eligible = seqs.target_flags()
    if eligible is not None:        # target types: rows without a single target of those types train nothing
        seen = np.concatenate([[0], np.cumsum(eligible, dtype=np.int64)])
        keep = seen[stop] - seen[stop - count] > 0
        stop, count, owner = stop[keep], count[keep], owner[keep]
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


def length_grouped(rows: np.ndarray, lengths: np.ndarray, batch_size: int, window: int,
                   rng: np.random.Generator) -> list[np.ndarray]:
    """``rows`` (already shuffled) cut into batches of similar lengths: each run of ``window`` batches' rows is
    sorted by length and cut into batches, and the batches are shuffled. Which rows meet in a batch is then
    random among rows of about the same length in the same window, and the order of batches is random; a
    padded batch costs the longest row's work, so short rows no longer pay for a long neighbour's."""
    span = max(1, window) * batch_size
    batches = []
    for start in range(0, len(rows), span):
        chunk = rows[start:start + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def iterate_batches(examples: Examples, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                    rank: int = 0, world_size: int = 1, num_steps: Optional[int] = None,
                    device: str | torch.device = "cpu",
                    with_history: bool = False, group_by_length: int = 0,
                    trim: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Left-padded batches for worker ``rank`` of ``world_size``, each trimmed to its longest row (``trim``).

    Rows are shuffled with (seed, epoch) and dealt round-robin to workers; with ``group_by_length`` > 0 each
    worker's rows are then grouped into batches of similar lengths within windows of that many batches
    (:func:`length_grouped`). ``num_steps`` makes every worker take the same number of steps (DDP needs that):
    a short share starts over from its first batch.
    """
    n = len(examples)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    mine = order[rank::world_size]
    if len(mine) == 0:
        return
    if shuffle and group_by_length > 0:
        batches = length_grouped(mine, examples.count, batch_size, group_by_length,
                                 np.random.default_rng([seed, epoch, rank, 1]))
    else:
        batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    steps = num_steps if num_steps is not None else len(batches)
    for step in range(steps):
        yield to_tensors(examples.batch(batches[step % len(batches)], with_history, trim), device)


def history_matrix(examples: Examples, idx: np.ndarray) -> torch.Tensor:
    """(B, H) right-padded matrix of each row's full history, for masking already-seen items."""
    return torch.from_numpy(examples.history(idx))

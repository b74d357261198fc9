"""Padded next-item examples and the per-worker batch iterator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysrec.data.examples import evaluation_examples, iterate_batches, training_examples
from raysrec.data.split import LEAVE_ONE_OUT, SplitSpec
from raysrec.data.storage import SequenceSet
from raysrec.models.losses import other_items


def seqs():
    return SequenceSet.from_lists([[1, 2, 3, 4, 5, 6, 7], [8, 9, 1, 2]])


def test_training_rows_hold_out_the_last_two_items_and_left_pad():
    ex = training_examples(seqs(), max_length=3, windows="all")
    # user 0: train part 1..5 -> targets 2..5 -> windows [3,4,5] then [2]; user 1: train 8,9 -> target 9
    assert ex.input_ids.tolist() == [[2, 3, 4], [0, 0, 1], [0, 0, 8]]
    assert ex.target_ids.tolist() == [[3, 4, 5], [0, 0, 2], [0, 0, 9]]
    last = training_examples(seqs(), max_length=3, windows="last")
    assert len(last) == 2 and last.target_ids[0].tolist() == [3, 4, 5]


def test_evaluation_rows_and_histories():
    valid = evaluation_examples(seqs(), max_length=4, split="valid")
    assert valid.input_ids.tolist() == [[2, 3, 4, 5], [0, 0, 8, 9]]
    assert valid.target_ids[:, -1].tolist() == [6, 1]
    test = evaluation_examples(seqs(), max_length=4, split="test")
    assert test.input_ids.tolist() == [[3, 4, 5, 6], [0, 8, 9, 1]]
    assert test.target_ids[:, -1].tolist() == [7, 2]
    # history = everything before the target, not only the model's window
    assert test.history(np.array([0]))[0].tolist() == [1, 2, 3, 4, 5, 6]


def test_workers_get_disjoint_rows_and_the_same_number_of_steps():
    ex = training_examples(SequenceSet.from_lists([[i, i + 1, i + 2, i + 3] for i in range(1, 12)]), 2)
    seen = []
    for rank in range(3):
        batches = list(iterate_batches(ex, 2, shuffle=True, seed=1, rank=rank, world_size=3, num_steps=2))
        assert len(batches) == 2
        seen.append({tuple(r) for b in batches for r in b["input_ids"].tolist()})
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2])


def test_negatives_never_hit_the_target():
    target = torch.randint(1, 4, (64, 10))
    neg = other_items(target, num_items=3, k=5, generator=torch.Generator().manual_seed(0))
    assert neg.shape == (64, 10, 5)
    assert not (neg == target.unsqueeze(-1)).any() and neg.min() >= 1 and neg.max() <= 3
    assert np.unique(neg.numpy()).tolist() == [1, 2, 3]


def _reference_rows(seqs, max_length, windows, split=None):
    """The padded matrices built the straightforward way (a Python loop per user and window), which the
    batches cut from the CSR arrays must equal."""
    pos = seqs.positions()
    rows = []
    for u in range(len(seqs)):
        lo = seqs.offsets[u]
        if split is None:
            end, left = lo + pos.train_end[u], pos.train_end[u] - 1
            while left > 0:
                take = min(max_length, left)
                rows.append((seqs.items[end - take - 1:end - 1], seqs.items[end - take:end],
                             seqs.times[end - take - 1:end - 1], None))
                end, left = end - take, left - take
                if windows == "last":
                    break
        else:
            at = pos.target(split)[u]
            if at < 0:
                continue
            t = lo + at
            start = max(lo, t - max_length)
            target = np.zeros(t - start, np.int64)
            target = np.append(target[1:], seqs.items[t]) if len(target) else np.array([seqs.items[t]])
            rows.append((seqs.items[start:t], target, seqs.times[start:t], seqs.items[lo:t]))
    return rows


def _left(values, length):
    out = np.zeros(length, np.asarray(values).dtype)
    if len(values):
        out[length - len(values):] = values
    return out


@pytest.mark.parametrize("split", [None, "valid", "test"])
@pytest.mark.parametrize("protocol", ["leave_one_out", "global_time"])
def test_batches_cut_from_the_csr_arrays_equal_the_padded_rows(split, protocol):
    rng = np.random.default_rng(3)
    lengths = rng.integers(3, 40, 60)
    seq_list = [rng.integers(1, 50, n).tolist() for n in lengths]
    time_list = [np.sort(rng.uniform(0, 1000, n)).tolist() for n in lengths]
    spec = SplitSpec("global_time", 400.0, 700.0) if protocol == "global_time" else LEAVE_ONE_OUT
    s = SequenceSet.from_lists(seq_list, time_list, split=spec)
    for windows in (["all", "last"] if split is None else ["all"]):
        examples = (training_examples(s, 7, windows) if split is None else evaluation_examples(s, 7, split))
        reference = _reference_rows(s, 7, windows, split)
        assert len(examples) == len(reference) > 0
        idx = rng.permutation(len(examples))[:25]
        batch = examples.batch(idx, with_history=split is not None)
        for r, i in enumerate(idx):
            inputs, targets, times, history = reference[i]
            assert batch["input_ids"][r].tolist() == _left(inputs, 7).tolist()
            assert batch["target_ids"][r].tolist() == _left(targets, 7).tolist()
            assert np.array_equal(batch["input_times"][r], _left(np.asarray(times, np.float64), 7))
            if history is not None:
                assert batch["history"][r][:len(history)].tolist() == list(history)
                assert not batch["history"][r][len(history):].any()


def test_metrics_can_be_scored_on_a_fixed_seeded_sample_of_users():
    rows = evaluation_examples(SequenceSet.from_lists([[1, 2, 3, u % 7 + 1] for u in range(100)]), 5, "valid")
    picked = rows.sample(10, 3, 0, 1)
    assert len(picked) == 10 and np.array_equal(picked.owner, np.sort(picked.owner))
    assert np.array_equal(picked.owner, rows.sample(10, 3, 0, 1).owner)     # fixed
    assert not np.array_equal(picked.owner, rows.sample(10, 4, 0, 1).owner)
    assert len(rows.sample(10, 3, 1, 2)) == 5                               # a worker's share
    assert rows.sample(None, 3, 0, 1) is rows and rows.sample(500, 3, 0, 1) is rows


def test_bce_negatives_are_uniform_over_the_other_items():
    """Each item other than the target is drawn with probability 1/(N-1). The clash shift sent a clashing draw to
    target + 1, which then came up at 2/N."""
    num_items, target = 10, 5
    targets = torch.full((9000,), target)
    neg = other_items(targets, num_items, 10, torch.Generator().manual_seed(0))
    counts = torch.bincount(neg.flatten(), minlength=num_items + 1)
    assert counts[0] == 0 and counts[target] == 0
    others = counts[[i for i in range(1, num_items + 1) if i != target]].double()
    assert (others - 10_000).abs().max() < 400, others            # 90,000 draws over 9 items; sd ~ 94

"""Padded next-item examples and the per-worker batch iterator."""

from __future__ import annotations

import numpy as np
import torch

from raysrec.data.examples import evaluation_examples, iterate_batches, sample_negatives, training_examples
from raysrec.data.storage import SequenceSet


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
    assert test.history_items[test.history_offsets[0]:test.history_offsets[1]].tolist() == [1, 2, 3, 4, 5, 6]


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
    neg = sample_negatives(target, num_items=3, num_negatives=5, generator=torch.Generator().manual_seed(0))
    assert neg.shape == (64, 10, 5)
    assert not (neg == target.unsqueeze(-1)).any() and neg.min() >= 1 and neg.max() <= 3
    assert np.unique(neg.numpy()).tolist() == [1, 2, 3]

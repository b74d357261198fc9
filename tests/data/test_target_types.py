"""Target types (train.target_types, e.g. next-buy): only events of the chosen types are targets, in training and
in the held-out splits, while the model's input keeps every event."""

from __future__ import annotations

import numpy as np
import pytest

from raysrec.data.examples import evaluation_examples, training_examples
from raysrec.data.split import SplitSpec
from raysrec.data.storage import SequenceSet

VIEW, BUY = 1, 2


def _seqs(types: list[list[int]], split: SplitSpec) -> SequenceSet:
    lengths = [len(t) for t in types]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    return SequenceSet(np.arange(len(types), dtype=np.int32), offsets, np.arange(1, n + 1, dtype=np.int32),
                       np.arange(n, dtype=np.float64), split, np.concatenate([np.asarray(t) for t in types]))


USERS = [[VIEW, BUY, VIEW, VIEW, BUY, VIEW, BUY, VIEW],   # buys at 1, 4, 6; a view after the last buy
         [BUY, BUY],                                      # two buys, but nothing before the first: not evaluated
         [VIEW, VIEW, BUY, VIEW]]                         # one buy: not evaluated, trains on everything


def test_leave_one_out_holds_out_the_last_two_targets_of_the_chosen_types():
    pos = _seqs(USERS, SplitSpec(target_types=(BUY,))).positions()
    assert pos.test_at.tolist() == [6, -1, -1] and pos.valid_at.tolist() == [4, -1, -1]
    assert pos.train_end.tolist() == [4, 2, 4]
    # without target types, the plain leave-one-out split
    plain = _seqs(USERS, SplitSpec()).positions()
    assert plain.test_at.tolist() == [7, -1, 3] and plain.valid_at.tolist() == [6, -1, 2]


def test_global_time_takes_the_first_target_of_a_chosen_type_in_each_period():
    # user 0's events at times 0..7: valid period [2.5, 5.5) holds its buy at 4, the test period its buy at 6
    pos = _seqs(USERS, SplitSpec("global_time", 2.5, 5.5, target_types=(BUY,))).positions()
    assert pos.valid_at.tolist()[0] == 4 and pos.test_at.tolist()[0] == 6 and pos.train_end.tolist()[0] == 3


def test_training_and_evaluation_rows_target_only_the_chosen_types_and_read_every_event():
    seqs = _seqs(USERS, SplitSpec(target_types=(BUY,)))
    train = training_examples(seqs, max_length=5)
    batch = train.batch(np.arange(len(train)), trim=False)
    targets = batch["target_ids"][batch["target_ids"] > 0]
    assert len(targets) and (seqs.types[targets - 1] == BUY).all()       # item i is event i - 1 here
    shown = batch["input_ids"][batch["padding_mask"]]
    assert (seqs.types[shown - 1] == VIEW).any()                         # the views stay in the input
    # every buy before a user's valid target (and all of an unevaluated user's) is a training target, once
    # (items 1-8 are user 0's events, 9-10 user 1's, 11-14 user 2's): user 0's buy at 1 (its valid buy is at 4),
    # user 1's second buy (its first has no history), user 2's only buy
    assert sorted(targets.tolist()) == [2, 10, 13]
    test = evaluation_examples(seqs, 5, "test")
    assert test.targets().tolist() == [7] and test.history(np.arange(1)).tolist() == [[1, 2, 3, 4, 5, 6]]
    valid = evaluation_examples(seqs, 5, "valid")
    assert valid.targets().tolist() == [5]


def test_rows_without_a_target_of_the_chosen_types_are_left_out():
    seqs = _seqs([[VIEW] * 12 + [BUY, VIEW, BUY, VIEW, BUY]], SplitSpec(target_types=(BUY,)))
    # training targets: events 1..11 are all views, then the valid buy at 14 ends training at position 14
    train = training_examples(seqs, max_length=4)
    batch = train.batch(np.arange(len(train)), trim=False)
    assert (batch["target_ids"] > 0).sum(1).min() >= 1                  # no row without a target
    assert sorted(batch["target_ids"][batch["target_ids"] > 0].tolist()) == [13]


def test_target_types_need_types_in_the_data():
    seqs = SequenceSet.from_lists([[1, 2, 3, 4]], split=SplitSpec(target_types=(BUY,)))
    with pytest.raises(Exception, match="has no event types"):
        seqs.positions()

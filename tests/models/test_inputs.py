"""The one input function: its layout, and every path (training, evaluation, serving) building the same input
for the same history through it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysrec.data.examples import evaluation_examples, training_examples
from raysrec.data.storage import SequenceSet
from raysrec.models.inputs import Events, model_input
from raysrec.models.sequential import ModelConfig, build_model
from raysrec.serving.recommender import Recommender


def test_rows_are_left_padded_and_each_position_predicts_at_the_next_time():
    events, end = Events.from_histories([[5, 6, 7], [9]], [[10.0, 20.0, 30.0], None], [[1, 2, 1], [3]])
    out = model_input(events, end, np.array([3, 1]), now=np.array([45.0, 0.0]))
    assert out["input_ids"].tolist() == [[5, 6, 7], [0, 0, 9]]
    assert out["input_times"].tolist() == [[10, 20, 30], [0, 0, 0]]
    assert out["target_times"].tolist() == [[20, 30, 45], [0, 0, 0]]      # no times: every gap unknown
    assert out["input_types"].tolist() == [[1, 2, 1], [0, 0, 3]]
    assert out["padding_mask"].tolist() == [[True] * 3, [False, False, True]]
    wide = model_input(events, end, np.array([2, 1]), now=np.array([45.0, 0.0]), length=4)
    assert wide["input_ids"].tolist() == [[0, 0, 6, 7], [0, 0, 0, 9]]    # the newest `count`, padded to 4


def _seqs(with_types: bool) -> SequenceSet:
    rng = np.random.default_rng(3)
    lists = [list(rng.integers(1, 31, size=n)) for n in (4, 9, 14, 6)]
    times = [list(np.cumsum(rng.integers(1, 5000, size=len(s))) + 1e9) for s in lists]
    seqs = SequenceSet.from_lists(lists, times)
    if with_types:
        seqs.types = rng.integers(1, 4, size=len(seqs.items))
    return seqs


def test_a_training_row_is_its_history_shifted_by_one():
    seqs = _seqs(with_types=True)
    batch = training_examples(seqs, max_length=8).batch(np.arange(4))
    real = batch["padding_mask"]
    both = real[:, :-1] & real[:, 1:]
    # a position's target is the next input, and the time it predicts at is that target's time
    assert (batch["target_ids"][:, :-1][both] == batch["input_ids"][:, 1:][both]).all()
    assert (batch["target_times"][:, :-1][both] == batch["input_times"][:, 1:][both]).all()
    assert (batch["target_ids"][~real] == 0).all() and (batch["target_ids"][real] > 0).all()
    assert (batch["input_types"][real] > 0).all() and (batch["input_types"][~real] == 0).all()


@pytest.mark.parametrize("name", ["sasrec", "longshort"])
def test_serving_builds_the_input_evaluation_builds(name):
    """The same history, given to the endpoint's Recommender with the target's time as ``now``, is laid out
    exactly as the evaluation row of that target, and gets the same user vector."""
    seqs = _seqs(with_types=False)
    examples = evaluation_examples(seqs, 8, "test")
    evaluated = examples.batch(np.arange(len(examples)))
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, num_items=30, hidden_dim=16, num_heads=2, max_length=8)).eval()
    rec = Recommender(model, np.arange(1, 31), None, np.ones(30), {})
    histories, times, nows = [], [], []
    for row in range(len(examples)):
        stop, count = int(examples.stop[row]), int(examples.count[row])
        histories.append(seqs.items[stop - 1 - count:stop - 1].tolist())
        times.append(seqs.times[stop - 1 - count:stop - 1].tolist())
        nows.append(float(seqs.times[stop - 1]))
    served = rec._batch(histories, times, nows)
    for key in ("input_ids", "input_times", "target_times", "padding_mask"):
        np.testing.assert_array_equal(served[key].numpy(), evaluated[key], err_msg=key)
    with torch.no_grad():
        as_served = model(served).user
        as_evaluated = model({k: torch.from_numpy(v) for k, v in evaluated.items()}).user
    torch.testing.assert_close(as_served, as_evaluated)

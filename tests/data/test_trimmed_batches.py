"""Batches trimmed to their longest row: the model's outputs at every real position and the loss equal those of
the batch padded to max_length, for sasrec and longshort (time gaps included), in training and evaluation
layouts; and the length-grouped order deals every row once per epoch, in batches of similar lengths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysrec.data.examples import evaluation_examples, iterate_batches, length_grouped, training_examples
from raysrec.data.storage import SequenceSet
from raysrec.models.inputs import to_tensors
from raysrec.models.sequential import ModelConfig, build_model
from raysrec.train.config import TrainConfig
from raysrec.train.loop import compute_loss

NUM_ITEMS, MAX_LEN = 40, 20


def _seqs() -> SequenceSet:
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(1, NUM_ITEMS + 1, size=n)) for n in rng.integers(3, 9, size=30)]   # short users
    seqs += [list(rng.integers(1, NUM_ITEMS + 1, size=33))]                                     # one long one
    times = [list(np.cumsum(rng.exponential(3600.0, size=len(s))) + 1e9) for s in seqs]
    return SequenceSet.from_lists(seqs, times)


def _model(name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, num_items=NUM_ITEMS, hidden_dim=16, num_heads=2, num_layers=2,
                                    max_length=MAX_LEN, short_window=4))
    if name == "longshort":
        with torch.no_grad():
            model.gap_emb.weight.normal_(0, 2.0)          # gaps matter, so a wrong gap would show
    return model.eval()


def _tensors(examples, idx, trim):
    return to_tensors(examples.batch(idx, with_history=True, trim=trim))


@pytest.mark.parametrize("name", ["sasrec", "longshort"])
@pytest.mark.parametrize("loss", ["ce", "sampled", "gbce"])
def test_a_trimmed_training_batch_gives_the_padded_outputs_and_loss(name, loss):
    model, seqs = _model(name), _seqs()
    examples = training_examples(seqs, MAX_LEN)
    short = np.flatnonzero(examples.count < 8)[:16]
    trimmed, padded = _tensors(examples, short, True), _tensors(examples, short, False)
    width = trimmed["input_ids"].shape[1]
    assert width == int(examples.count[short].max()) < MAX_LEN == padded["input_ids"].shape[1]
    with torch.no_grad():
        h_trim, h_pad = model(trimmed).hidden, model(padded).hidden[:, -width:]
    real = trimmed["input_ids"] != 0
    torch.testing.assert_close(h_trim[real], h_pad[real], rtol=1e-5, atol=1e-5)
    cfg = TrainConfig(loss=loss, num_negatives=8, model=model.cfg)
    losses = [compute_loss(model, b, cfg, None, torch.Generator().manual_seed(1)) for b in (trimmed, padded)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sasrec", "longshort"])
def test_a_trimmed_evaluation_batch_scores_the_same_user_vectors(name):
    model, seqs = _model(name), _seqs()
    examples = evaluation_examples(seqs, MAX_LEN, "test")
    idx = np.arange(len(examples) - 1)                              # every short user, not the long one
    trimmed, padded = _tensors(examples, idx, True), _tensors(examples, idx, False)
    assert trimmed["input_ids"].shape[1] < MAX_LEN
    with torch.no_grad():
        torch.testing.assert_close(model(trimmed).user, model(padded).user, rtol=1e-5, atol=1e-5)
    assert torch.equal(trimmed["history"], padded["history"])


def test_length_grouped_batches_deal_every_row_once_with_similar_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 51, size=5000)
    rows = rng.permutation(5000)
    batches = length_grouped(rows, lengths, 128, 8, np.random.default_rng(1))
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(5000))
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    plain = np.mean([np.ptp(lengths[rows[i:i + 128]]) for i in range(0, 5000, 128)])
    assert spread < 0.25 * plain, (spread, plain)             # padding work goes with the spread
    again = length_grouped(rng.permutation(5000), lengths, 128, 8, np.random.default_rng(2))
    assert [b.tolist() for b in again] != [b.tolist() for b in batches]   # another epoch, other batches


def test_an_epoch_with_length_groups_trains_every_target_once():
    seqs = _seqs()
    examples = training_examples(seqs, MAX_LEN)
    seen = []
    for batch in iterate_batches(examples, 8, shuffle=True, seed=3, epoch=1, group_by_length=2):
        seen.append(int((batch["target_ids"] > 0).sum()))
    assert sum(seen) == int(examples.count.sum())

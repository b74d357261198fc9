"""Model math without Ray: causality, windows, padding, tied embeddings, losses and metrics."""

from __future__ import annotations

import pytest
import torch

from raysrec.evaluation import full_ranking_ranks, metric_sums, sampled_candidates
from raysrec.models import losses
from raysrec.models.layers import causal_mask
from raysrec.models.sequential import ModelConfig, build_model


def batch(ids, times=None):
    ids = torch.tensor(ids)
    out = {"input_ids": ids}
    if times is not None:
        out["input_times"] = torch.tensor(times, dtype=torch.float64)
        out["target_times"] = out["input_times"] + 60.0
    return out


@pytest.mark.parametrize("name", ["sasrec", "longshort"])
@pytest.mark.parametrize("norm_first", [True, False])
def test_outputs_never_depend_on_future_items(name, norm_first):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, num_items=50, max_length=8, norm_first=norm_first, dropout=0.0)).eval()
    a = batch([[0, 0, 3, 4, 5, 6, 7, 8]], [[0, 0, 1, 2, 3, 4, 5, 6]])
    b = batch([[0, 0, 3, 4, 5, 9, 9, 9]], [[0, 0, 1, 2, 3, 4, 5, 6]])
    ha, hb = model(a).hidden, model(b).hidden
    assert torch.allclose(ha[:, :5], hb[:, :5], atol=1e-5)
    assert not torch.allclose(ha[:, 5:], hb[:, 5:], atol=1e-5)


def test_short_window_mask_sees_only_recent_items():
    mask = causal_mask(torch.ones(1, 6, dtype=torch.bool), window=2)[0, 0]
    assert mask[5].tolist() == [False, False, False, False, True, True]
    padded = causal_mask(torch.tensor([[False, False, True, True]]))[0, 0]
    assert padded[0].tolist() == [True, False, False, False]  # a padding row still attends to itself
    assert padded[3].tolist() == [False, False, True, True]


def test_longshort_gate_uses_time_gap():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="longshort", num_items=30, max_length=6, dropout=0.0)).eval()
    near = batch([[1, 2, 3, 4, 5, 6]], [[0, 1, 2, 3, 4, 5]])
    far = dict(near, target_times=near["input_times"] + 10 ** 7)
    assert not torch.allclose(model(near).user, model(far).user)
    assert model.gap_buckets(near)[0, -1] != model.gap_buckets(far)[0, -1]


def test_item_table_is_shared_with_the_output_layer():
    model = build_model(ModelConfig(num_items=20, max_length=4))
    assert model.item_rows().data_ptr() == model.item_emb.weight.data_ptr()
    assert torch.isinf(model.score_all(torch.randn(3, 64))[:, 0]).all()


def test_losses_are_finite_and_prefer_the_target():
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_items=10, max_length=4, hidden_dim=8, num_heads=2))
    targets = torch.tensor([3, 4])
    good = model.item_emb(targets).detach() * 10
    bad = -good
    for fn in (lambda h: losses.full_softmax_ce(model, h, targets),
               lambda h: losses.sampled_softmax(model, h, targets, torch.tensor([1, 2, 3, 5])),
               lambda h: losses.bce_one_negative(model, h, targets, torch.tensor([1, 2]))):
        assert torch.isfinite(fn(good)) and fn(good) < fn(bad)


def test_full_ranking_masks_history_but_never_the_target():
    scores = torch.tensor([[0.0, 5.0, 4.0, 3.0, 2.0]])
    # target 3 scores third; items 1 and 2 are in the history and masked; the target is too but stays
    ranks = full_ranking_ranks(scores, torch.tensor([3]), torch.tensor([[1, 2, 3]]))
    assert ranks.tolist() == [0]
    assert full_ranking_ranks(scores, torch.tensor([3]), None).tolist() == [2]
    # candidates restricted to items 2..4 (e.g. new items): only item 2 is above; the target competes even
    # when the mask leaves it out
    allowed = torch.tensor([False, False, True, True, True])
    assert full_ranking_ranks(scores, torch.tensor([3]), None, allowed).tolist() == [1]
    assert full_ranking_ranks(scores, torch.tensor([1]), None, allowed).tolist() == [0]
    sums = metric_sums(torch.tensor([0, 1, 30]), [10])
    assert sums["hr@10"] == 2 and sums["ndcg@10"] == pytest.approx(1 + 1 / torch.log2(torch.tensor(3.0)).item())
    assert sums["mrr@10"] == pytest.approx(1.5)


def test_sampled_candidates_avoid_everything_the_user_touched():
    cands = sampled_candidates(torch.tensor([5]), torch.tensor([[1, 2, 3]]), num_items=200, num_negatives=100,
                               generator=torch.Generator().manual_seed(0))
    assert cands[0, 0] == 5 and cands.shape == (1, 101)
    assert not set(cands[0, 1:].tolist()) & {0, 1, 2, 3, 5}
    assert len(set(cands[0, 1:].tolist())) == 100

"""Evaluation by hand: the tie rule, hand-computed metrics, and refusing a model on data it was not trained on."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from raysrec import artifact
from raysrec.data.examples import evaluation_examples
from raysrec.data.storage import PreparedData, SequenceSet
from raysrec.errors import CheckpointError
from raysrec.evaluation import (
    check_same_items,
    confidence,
    evaluate,
    evaluate_checkpoint,
    full_ranking_ranks,
    metric_keys,
    metric_sums,
    metric_values,
    sampled_ranks,
    summarize,
)
from raysrec.models.sequential import ModelConfig, build_model
from raysrec.train.config import TrainConfig


def test_ties_count_against_the_target():
    scores = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.5],      # target 1 ties with items 2 and 3
                           [0.0, 2.0, 1.0, 1.0, 1.0]])     # target 1 strictly best
    ranks = full_ranking_ranks(scores, torch.tensor([1, 1]), history=None)
    assert ranks.tolist() == [2, 0]
    # history masking never masks the target and padding never competes
    ranks = full_ranking_ranks(scores, torch.tensor([1, 1]), history=torch.tensor([[2, 1], [0, 0]]))
    assert ranks.tolist() == [1, 0]
    assert sampled_ranks(torch.tensor([[1.0, 1.0, 0.0, 1.0], [2.0, 1.0, 1.0, 1.0]])).tolist() == [2, 0]


def test_metrics_by_hand():
    sums = metric_sums(torch.tensor([0, 1, 3, 12]), [10])
    assert sums["hr@10"] == 3
    assert sums["ndcg@10"] == pytest.approx(1 + 1 / math.log2(3) + 1 / math.log2(5))
    assert sums["mrr@10"] == pytest.approx(1 + 1 / 2 + 1 / 4)
    means = summarize(np.array([4.0, sums["ndcg@10"], sums["hr@10"], sums["mrr@10"]]), [10], "valid_")
    assert means["valid_hr@10"] == 0.75


def _totals(ranks: torch.Tensor, ks: list[int]) -> np.ndarray:
    values = metric_values(ranks, ks)
    keys = metric_keys(ks)
    return np.array([len(ranks)] + [float(values[k].sum()) for k in keys] + [float((values[k] ** 2).sum()) for k in keys])


def test_the_confidence_interval_of_a_sample_covers_the_every_user_figure_95_times_in_100():
    """Samples of 400 users out of 5,000 (ranks drawn like a weak model's): the 95 % interval around each
    sample's NDCG@10 and HR@10 holds the all-users figure in about 95 % of 1,000 seeded samples, and is zero
    when every user is scored."""
    rng = np.random.default_rng(0)
    population = torch.from_numpy(rng.geometric(0.03, 5_000) - 1)          # 0-based ranks, mean ~32
    exact = summarize(_totals(population, [10]), [10])
    covered = {"ndcg@10": 0, "hr@10": 0}
    for seed in range(1_000):
        sample = population[np.random.default_rng(seed).choice(5_000, 400, replace=False)]
        totals = _totals(sample, [10])
        means, half = summarize(totals, [10]), confidence(totals, [10], population=5_000)
        for key in covered:
            covered[key] += abs(means[key] - exact[key]) <= half[key]
    assert all(0.93 <= c / 1_000 <= 0.97 for c in covered.values()), covered
    assert set(confidence(_totals(population, [10]), [10], population=5_000).values()) == {0.0}


def _model(num_items: int, **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(num_items=num_items, hidden_dim=8, num_heads=1, num_layers=1, max_length=5, short_window=3, **kw))


def test_a_model_that_scores_every_item_alike_ranks_every_target_last():
    """Hand-computed: all scores equal, so each target ranks behind every other allowed item."""
    model = _model(20)
    with torch.no_grad():
        model.item_emb.weight.zero_()
    seqs = SequenceSet.from_lists([[1, 2, 3, 4], [5, 6, 7, 8, 9, 10]])
    examples = evaluation_examples(seqs, 5, "test")
    totals = evaluate(model, examples, ks=[10, 20], batch_size=8, device=torch.device("cpu"))
    # user 0: history {1,2,3} masked -> 20 - 3 - 1 = 16 items ahead; user 1: history of 5 -> 14 ahead
    assert totals[0] == 2
    metrics = summarize(totals, [10, 20])
    assert metrics["hr@10"] == 0.0
    assert metrics["hr@20"] == 1.0
    assert metrics["ndcg@20"] == pytest.approx((1 / math.log2(18) + 1 / math.log2(16)) / 2)


def _prepared(folder, item_ids, has_timestamps=True):
    folder.mkdir(parents=True)
    n = len(item_ids)
    pd.DataFrame({"item_index": np.arange(1, n + 1, dtype=np.int32), "item_id": item_ids,
                  "count": np.ones(n, np.int64)}).to_parquet(folder / "items.parquet", index=False)
    (folder / "manifest.json").write_text(json.dumps({"num_items": n, "has_timestamps": has_timestamps,
                                                      "shards": []}))
    return PreparedData.load(folder)


def test_a_model_is_refused_on_data_with_another_item_index(tmp_path):
    trained = _prepared(tmp_path / "trained", np.arange(100, 110))
    other = _prepared(tmp_path / "other", np.arange(200, 210))          # same count, other items
    model = _model(10)
    artifact.save_checkpoint(tmp_path / "ckpt", model, TrainConfig(model=model.cfg), {"epoch": 1},
                             items_file=tmp_path / "trained" / "items.parquet")
    check_same_items(artifact.item_ids(tmp_path / "ckpt"), trained, "ckpt")      # its own data: fine
    with pytest.raises(CheckpointError, match="item index .* first difference at index 1"):
        evaluate_checkpoint(tmp_path / "other", tmp_path / "ckpt")
    assert other.num_items == model.cfg.num_items


def test_time_gaps_are_off_for_data_without_real_timestamps(tmp_path):
    from raysrec.train.loop import resolve_model_config

    cfg = TrainConfig(model=ModelConfig(name="longshort"))
    with_time, _, _ = resolve_model_config(cfg, _prepared(tmp_path / "a", np.arange(1, 6), has_timestamps=True))
    ordinal, _, _ = resolve_model_config(cfg, _prepared(tmp_path / "b", np.arange(1, 6), has_timestamps=False))
    assert with_time.model.use_time_gap and not ordinal.model.use_time_gap
    assert ordinal.model.num_items == 5


@pytest.mark.parametrize("gap_dropout", [0.0, 0.5])
def test_gap_dropout_trains_the_unknown_gap_row(gap_dropout):
    """Serving without timestamps reads gap row 0; only gap dropout ever trains it."""
    model = _model(30, name="longshort", gap_dropout=gap_dropout)
    model.train()
    before = model.gap_emb.weight[0].clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.randint(1, 31, (16, 5))
    times = torch.arange(5, dtype=torch.float64).repeat(16, 1) * 1000 + 1
    batch = {"input_ids": ids, "input_times": times, "target_times": times + 500}
    for _ in range(3):
        loss = model(batch).hidden.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = not torch.equal(before, model.gap_emb.weight[0])
    assert changed == (gap_dropout > 0)


@pytest.mark.parametrize("chunk", [1, 3, 7, 21, 1000])
def test_chunked_ranks_equal_the_full_matrix_ranks_ties_included(chunk):
    from raysrec.evaluation import full_ranking_ranks_chunked

    g = torch.Generator().manual_seed(chunk)
    hidden = torch.randint(-2, 3, (12, 4), generator=g).float()          # small integers: many exact ties
    table = torch.randint(-2, 3, (21, 4), generator=g).float()
    targets = torch.randint(1, 21, (12,), generator=g)
    history = torch.randint(0, 21, (12, 5), generator=g)
    allowed = torch.rand(21, generator=g) > 0.2
    for mask in (None, allowed):
        expected = full_ranking_ranks(hidden @ table.T, targets, history, mask)
        assert torch.equal(full_ranking_ranks_chunked(hidden, table, targets, history, mask, chunk), expected)


def test_sampled_candidates_by_rejection_are_distinct_and_never_seen():
    from raysrec.evaluation import sampled_candidates

    targets = torch.tensor([5, 9, 40])
    history = torch.tensor([[1, 2, 3, 0], [9, 8, 7, 6], [11, 12, 0, 0]])
    exact = sampled_candidates(targets, history, 60, 20, torch.Generator().manual_seed(0))
    drawn = sampled_candidates(targets, history, 60, 20, torch.Generator().manual_seed(0), max_cells=10)
    for candidates in (exact, drawn):
        assert candidates.shape == (3, 21) and torch.equal(candidates[:, 0], targets)
        for row, seen in zip(candidates.tolist(), history.tolist()):
            negatives = row[1:]
            assert len(set(negatives)) == 20 and not set(negatives) & {0, row[0], *seen}


@pytest.mark.parametrize("chunk", [65536, 300, 7])
def test_equal_items_rank_the_target_last_in_the_chunked_ranks(chunk):
    """All item vectors equal: every competitor ties with the target, so the pessimistic rule ranks every target
    last (N - 1). The target's score used to come from an element-wise product and sum while competitors came
    from a matmul; their last bits differed and 110 of 256 rows ranked lower, some at 0."""
    from raysrec.evaluation import full_ranking_ranks_chunked

    g = torch.Generator().manual_seed(0)
    num_items, dim = 1000, 64
    hidden = torch.randn(256, dim, generator=g)
    table = torch.randn(1, dim, generator=g).repeat(num_items + 1, 1)
    targets = torch.randint(1, num_items + 1, (256,), generator=g)
    ranks = full_ranking_ranks_chunked(hidden, table, targets, None, None, chunk)
    assert torch.equal(ranks, torch.full_like(ranks, num_items - 1))

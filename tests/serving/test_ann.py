"""Approximate top-k (FAISS HNSW) for big catalogues: close to exact, exclusions honoured, recall reported."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysrec.models.sequential import ModelConfig, build_model
from raysrec.serving.recommender import Query, Recommender

pytest.importorskip("faiss")   # the ann extra; part of dev, so CI runs these

N = 4000


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(num_items=N, hidden_dim=32, num_heads=2, num_layers=1, max_length=20))


def _rec(model, **kw) -> Recommender:
    counts = np.arange(N, 0, -1, dtype=np.int64)
    return Recommender(model, np.arange(100, 100 + N), None, counts, {"version": "m@x"}, **kw)


def test_hnsw_answers_match_exact_top_k_and_report_their_recall(model):
    exact, ann = _rec(model, retrieval="exact"), _rec(model, retrieval="hnsw")
    assert exact.metadata["retrieval"] == {"method": "exact"}
    info = ann.metadata["retrieval"]
    assert info["method"] == "hnsw" and info["probe_queries"] == 512 and info["recall@10"] >= 0.9, info
    rng = np.random.default_rng(1)
    queries = [Query(history=[int(x) for x in rng.integers(100, 100 + N, 8)], k=10) for _ in range(64)]
    got, want = ann.run(queries), exact.run(queries)
    overlap = np.mean([len({i["item_id"] for i in g.items} & {i["item_id"] for i in w.items}) / 10
                       for g, w in zip(got, want)])
    assert overlap >= 0.9, overlap
    for q, g in zip(queries, got):
        ids = [i["item_id"] for i in g.items]
        assert len(ids) == 10 and not set(ids) & set(q.history)          # seen items excluded
        scores = [i["score"] for i in g.items]
        assert scores == sorted(scores, reverse=True)


def test_a_row_the_graph_cannot_fill_is_answered_exactly(model):
    ann, exact = _rec(model, retrieval="hnsw"), _rec(model, retrieval="exact")
    history = list(range(100, 100 + 3990))          # all but 10 items seen: k=10 needs every one of them
    q = Query(history=history, k=10)
    got, want = ann.run([q])[0], exact.run([q])[0]
    assert [i["item_id"] for i in got.items] == [i["item_id"] for i in want.items]


def test_auto_switches_at_the_catalogue_size(model):
    assert _rec(model, retrieval="auto", ann_min_items=N + 1).ann is None
    assert _rec(model, retrieval="auto", ann_min_items=N).ann is not None


def test_one_long_history_does_not_widen_every_rows_search(model):
    """The search width is k plus at most ANN_MAX_OVERFETCH excluded items per row: a user with 3,000 seen items
    made all 64 rows of the micro-batch search 3,010 wide. That user's row comes back short and is answered
    exactly; the others stay approximate and right."""
    from raysrec.serving.recommender import ANN_MAX_OVERFETCH

    ann, exact = _rec(model, retrieval="hnsw"), _rec(model, retrieval="exact")
    widths = []
    search = ann.ann.search
    ann.ann.search = lambda queries, fetch: widths.append(fetch) or search(queries, fetch)   # records the width
    rng = np.random.default_rng(2)
    heavy = Query(history=list(range(100, 3100)), k=10)
    queries = [heavy] + [Query(history=[int(x) for x in rng.integers(100, 100 + N, 8)], k=10) for _ in range(63)]
    got, want = ann.run(queries), exact.run(queries)
    assert widths == [10 + ANN_MAX_OVERFETCH]
    assert [i["item_id"] for i in got[0].items] == [i["item_id"] for i in want[0].items]
    assert not {i["item_id"] for i in got[0].items} & set(heavy.history)

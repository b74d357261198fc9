"""Served rankings equal evaluated ones: sasrec and longshort, with and without timestamps (no Ray needed)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from raysrec import artifact
from raysrec.data.examples import evaluation_examples, iterate_batches
from raysrec.data.storage import SequenceSet
from raysrec.models.sequential import ModelConfig, build_model
from raysrec.serving.recommender import Query, Recommender
from raysrec.train.config import TrainConfig

NUM_ITEMS = 60


def _saved_model(tmp_path, name: str, use_time_gap: bool):
    torch.manual_seed(1)
    cfg = ModelConfig(name=name, num_items=NUM_ITEMS, hidden_dim=16, num_heads=2, num_layers=1, max_length=8,
                      short_window=3, use_time_gap=use_time_gap)
    model = build_model(cfg)
    with torch.no_grad():
        if name == "longshort":   # make the time gap matter, so a wrong gap changes the ranking
            model.gap_emb.weight.normal_(0, 3.0)
    items = pd.DataFrame({"item_index": np.arange(1, NUM_ITEMS + 1, dtype=np.int32),
                          "item_id": [f"it{i}" for i in range(1, NUM_ITEMS + 1)],
                          "count": np.arange(NUM_ITEMS, 0, -1, dtype=np.int64)})
    items.to_parquet(tmp_path / "items.parquet", index=False)
    artifact.save_checkpoint(tmp_path / "model" / "checkpoint", model, TrainConfig(model=cfg), {"epoch": 1},
                             items_file=tmp_path / "items.parquet")
    return model.eval(), tmp_path / "model"


def _histories(timed: bool) -> SequenceSet:
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(1, NUM_ITEMS + 1, size=n)) for n in rng.integers(3, 14, size=25)]
    times = [list(np.cumsum(rng.exponential(3600 * 24, size=len(s))) + 1e9) for s in seqs] if timed else None
    return SequenceSet.from_lists(seqs, times)


@pytest.mark.parametrize("name,timed", [("sasrec", True), ("longshort", True), ("longshort", False)])
def test_served_top_k_equals_the_evaluated_ranking(tmp_path, name, timed):
    model, folder = _saved_model(tmp_path, name, use_time_gap=timed)
    seqs = _histories(timed)
    examples = evaluation_examples(seqs, model.cfg.max_length, "test")
    batch = next(iterate_batches(examples, len(examples), with_history=True))
    with torch.no_grad():
        scores = model.score_all(model(batch).user)                      # what evaluation ranks
    scores.scatter_(1, batch["history"], float("-inf"))                 # its full-ranking mask (target aside)
    rec = Recommender.load(folder)
    k = 10
    queries = []
    for u in range(len(seqs)):
        full = seqs.sequence(u)
        history = [f"it{i}" for i in full[:-1]]
        stamps = seqs.times[seqs.offsets[u]:seqs.offsets[u + 1]]
        queries.append(Query(history=history, k=k, timestamps=list(stamps[:-1]) if timed else None,
                             now=float(stamps[-1]) if timed else None))
    answers = rec.run(queries)
    for u, answer in enumerate(answers):
        expected = [f"it{i}" for i in torch.topk(scores[u], k).indices.tolist()]
        assert [item["item_id"] for item in answer.items] == expected, u
        assert answer.fallback is None


def test_the_probe_runs_the_model_not_the_popularity_fallback(tmp_path):
    _, folder = _saved_model(tmp_path, "longshort", use_time_gap=True)
    answer = Recommender.load(folder).probe()
    assert answer.fallback is None and len(answer.items) == 1 and answer.items[0]["score"] is not None


def test_top_k_in_item_chunks_equals_one_matrix(tmp_path):
    _, folder = _saved_model(tmp_path, "sasrec", use_time_gap=True)
    whole, chunked = Recommender.load(folder), Recommender.load(folder)
    chunked.chunk_items = 7                                              # 61 rows: 9 chunks
    seqs = _histories(timed=False)
    queries = [Query(history=[f"it{i}" for i in seqs.sequence(u)], k=15, exclude=["it1", "it30"])
               for u in range(len(seqs))]
    for a, b in zip(whole.run(queries), chunked.run(queries)):
        assert [i["item_id"] for i in a.items] == [i["item_id"] for i in b.items]
        assert [i["score"] for i in a.items] == pytest.approx([i["score"] for i in b.items])


def test_a_request_without_now_is_scored_at_its_newest_event(tmp_path):
    """longshort with timestamps and no ``now``: the gaps run to the newest history event, not to today's clock
    (a 2009 history met gaps of 17 years, buckets training never filled)."""
    model, folder = _saved_model(tmp_path, "longshort", use_time_gap=True)
    rec = Recommender.load(folder)
    history = [f"it{i}" for i in (3, 9, 27, 14, 5)]
    stamps = [1.2e9 + 3600.0 * i for i in range(5)]
    plain = rec.run([Query(history=history, k=10, timestamps=stamps)])[0].items
    at_last = rec.run([Query(history=history, k=10, timestamps=stamps, now=stamps[-1])])[0].items
    today = rec.run([Query(history=history, k=10, timestamps=stamps, now=1.8e9)])[0].items
    assert plain == at_last
    assert [i["item_id"] for i in plain] != [i["item_id"] for i in today]     # the gap matters for this model

"""The Serve endpoint over real HTTP on 127.0.0.1: shapes, ids, exclusion, fallbacks, bad input, offline parity."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
import torch
import yaml

from raysrec import artifact as ckpt
from raysrec.data.examples import evaluation_examples, iterate_batches
from raysrec.data.storage import PreparedData
from raysrec.evaluation import full_ranking_ranks

pytestmark = pytest.mark.usefixtures("endpoint")


@pytest.fixture(scope="module")
def catalogue(trained_model):
    items = pq.read_table(trained_model / "checkpoint" / "items.parquet").to_pandas().sort_values("item_index")
    return items


@pytest.fixture(scope="module")
def test_users(synth_prepared, catalogue):
    """(history ids, history times, target id, target time) per user, in original ids."""
    seqs = PreparedData.load(synth_prepared).read()
    ids = catalogue["item_id"].to_numpy()
    rows = []
    for u in range(len(seqs)):
        lo, hi = seqs.offsets[u], seqs.offsets[u + 1]
        items, times = seqs.items[lo:hi], seqs.times[lo:hi]
        rows.append(([int(ids[i - 1]) for i in items[:-1]], [float(t) for t in times[:-1]],
                     int(ids[items[-1] - 1]), float(times[-1])))
    return rows


def post(url, path, payload, **kw):
    return requests.post(f"{url}{path}", json=payload, timeout=30, **kw)


def test_recommend_shapes_ids_and_titles(endpoint, test_users, catalogue):
    history = test_users[0][0]
    r = post(endpoint, "/recommend", {"history": history, "k": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"items", "unknown_items", "model"} and body["unknown_items"] == []
    assert len(body["items"]) == 7
    known = dict(zip(catalogue["item_id"], catalogue["title"]))
    for item in body["items"]:
        assert isinstance(item["item_id"], int) and item["item_id"] in known      # ints stay ints
        assert item["title"] == known[item["item_id"]]
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert body["model"].startswith("model@")  # the training output folder, then the weights digest


def test_seen_items_and_explicit_exclusions_are_left_out(endpoint, test_users):
    history = test_users[1][0]
    open_ = post(endpoint, "/recommend", {"history": history, "k": 50, "exclude_seen": False}).json()
    shut = post(endpoint, "/recommend", {"history": history, "k": 50}).json()
    assert not {i["item_id"] for i in shut["items"]} & set(history)
    assert {i["item_id"] for i in open_["items"]} & set(history), "without exclusion the history shows up"
    banned = [i["item_id"] for i in shut["items"][:3]]
    again = post(endpoint, "/recommend", {"history": history, "k": 50, "exclude": banned}).json()
    assert not {i["item_id"] for i in again["items"]} & set(banned)


def test_unknown_ids_are_skipped_and_reported(endpoint, test_users):
    history = test_users[2][0]
    clean = post(endpoint, "/recommend", {"history": history, "k": 10}).json()
    noisy = post(endpoint, "/recommend", {"history": [987654321, *history, "not-an-item"], "k": 10}).json()
    assert noisy["unknown_items"] == [987654321, "not-an-item"]
    assert [i["item_id"] for i in noisy["items"]] == [i["item_id"] for i in clean["items"]]


def test_empty_or_unknown_history_falls_back_to_popularity(endpoint, catalogue):
    popular = catalogue.sort_values("count", ascending=False, kind="stable")["item_id"].tolist()[:5]
    for history in ([], [123456789]):
        body = post(endpoint, "/recommend", {"history": history, "k": 5}).json()
        assert body["fallback"] == "popularity"
        assert [i["item_id"] for i in body["items"]] == popular


def test_score_keeps_candidate_order_and_marks_unknowns(endpoint, test_users):
    history = test_users[3][0]
    top = post(endpoint, "/recommend", {"history": history, "k": 3}).json()["items"]
    candidates = [top[2]["item_id"], 55555555, top[0]["item_id"]]
    body = post(endpoint, "/score", {"history": history, "candidates": candidates}).json()
    assert body["scores"][1] is None and body["unknown_items"] == []
    assert body["scores"][0] == pytest.approx(top[2]["score"], abs=1e-4)
    assert body["scores"][2] == pytest.approx(top[0]["score"], abs=1e-4)


def test_health_check_runs_the_model(endpoint):
    body = requests.get(f"{endpoint}/healthz", timeout=30).json()
    top = post(endpoint, "/recommend", {"history": [], "k": 1}).json()["items"][0]["item_id"]   # most popular
    # the probe is a forward pass on the most popular item, not the popularity fallback
    assert body["status"] == "ok" and body["model"] and body["probe"] is not None
    answer = post(endpoint, "/recommend", {"history": [top], "k": 1, "exclude_seen": False}).json()
    assert answer["fallback"] is None and answer["items"][0]["item_id"] == body["probe"]


def test_model_metadata(endpoint, trained_model):
    body = requests.get(f"{endpoint}/model", timeout=10).json()
    metrics = json.loads((trained_model / "metrics.json").read_text())
    assert body["model"] == "sasrec" and body["num_items"] == 200 and body["max_length"] == 20
    assert body["metrics"]["test"]["ndcg@10"] == pytest.approx(metrics["test"]["ndcg@10"])
    assert body["batching"] == {"enabled": True, "max_batch_size": 16, "batch_wait_timeout_s": 0.01}


BAD_REQUESTS = [
    ("/recommend", b"{not json", 422, "JSON"),
    ("/recommend", b'{"history": [1], "k": 0}', 422, "k"),
    ("/recommend", b'{"history": [1], "k": 100000}', 422, "k"),
    ("/recommend", b'{"history": "1,2,3"}', 422, "history"),
    ("/recommend", b'{"history": [1.5]}', 422, "history"),
    ("/recommend", b'{"history": [1], "colour": "red"}', 422, "colour"),
    ("/recommend", b'{"history": [1, 2], "timestamps": [1.0]}', 422, "timestamps"),
    ("/recommend", b'{"history": [1], "timestamps": [NaN]}', 422, "timestamps"),
    ("/recommend", b'{"history": [1], "now": Infinity}', 422, "now"),
    ("/recommend", b"[1, 2, 3]", 422, "body"),
    ("/score", b'{"history": [1]}', 422, "candidates"),
    ("/score", b'{"history": [1], "candidates": []}', 422, "candidates"),
    ("/recommend", json.dumps({"history": list(range(20_000))}).encode(), 413, "limit"),
    ("/recommend", json.dumps({"history": list(range(100_000))}).encode(), 413, "limit"),
    ("/recommend", b"", 422, "body"),
    ("/recommend", b"\xff\xfe\x00\x01 garbage", 422, "JSON"),
    ("/recommend", b'{"history": [1], "k": "ten"}', 422, "k"),
    ("/recommend", b'{"history": [1], "k": -3}', 422, "k"),
    ("/recommend", b'{"history": [1], "k": "10"}', 422, "k"),          # strict like the ids: no coercion
    ("/recommend", b'{"history": [1], "k": true}', 422, "k"),
    ("/recommend", b'{"history": [1], "k": 10.0}', 422, "k"),
    ("/recommend", b'{"history": [1], "exclude_seen": "true"}', 422, "exclude_seen"),
    ("/recommend", b'{"history": [1], "exclude": 5}', 422, "exclude"),
    ("/recommend", b'{"history": [1], "exclude_seen": "maybe"}', 422, "exclude_seen"),
    ("/recommend", b'{"history": [1e400]}', 422, "history"),
    ("/recommend", b'{"history": [{"id": 1}]}', 422, "history"),
    ("/score", b'{"history": [1], "candidates": [1, null]}', 422, "candidates"),
    ("/score", b'{"history": [1], "candidates": [1], "now": "yesterday"}', 422, "now"),
    ("/score", b'{"candidates": [1], "history": [1], "timestamps": [-Infinity]}', 422, "timestamps"),
]


@pytest.mark.parametrize("path,body,status,mentions", BAD_REQUESTS)
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(endpoint, path, body, status, mentions):
    r = requests.post(f"{endpoint}{path}", data=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    assert mentions.lower() in r.json()["error"].lower()
    assert post(endpoint, "/recommend", {"history": [], "k": 1}).status_code == 200


def test_served_rankings_equal_offline_evaluation(endpoint, trained_model, synth_prepared, test_users):
    """Concurrent requests (so batches mix users) give the offline model's scores, top-k and hits."""
    model, cfg, _ = ckpt.load_checkpoint(trained_model / "checkpoint")
    data = PreparedData.load(synth_prepared)
    examples = evaluation_examples(data.read(), model.cfg.max_length, "test")
    n = 48
    batch = next(iterate_batches(examples, n, with_history=True))
    with torch.no_grad():
        offline = model.score_all(model(batch).user)                            # (n, N+1)
    ranks = full_ranking_ranks(offline, batch["target_ids"][:, -1], batch["history"])
    masked = offline.clone().scatter_(1, batch["history"], float("-inf"))
    offline_top = masked.topk(10, dim=1).indices
    ids = pq.read_table(trained_model / "checkpoint" / "items.parquet").to_pandas().sort_values("item_index")["item_id"].to_numpy()

    def ask(u):
        history, times, _, target_time = test_users[u]
        rec = post(endpoint, "/recommend", {"history": history, "timestamps": times, "now": target_time, "k": 10})
        score = post(endpoint, "/score", {"history": history, "candidates": ids.tolist()})
        return rec.json(), score.json()

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(n)))
    for u, (rec, score) in enumerate(answers):
        served_top = [i["item_id"] for i in rec["items"]]
        assert served_top == [int(ids[i - 1]) for i in offline_top[u].tolist()], f"user {u}"
        np.testing.assert_allclose(score["scores"], offline[u, 1:].numpy(), rtol=1e-4, atol=1e-4)
        target = test_users[u][2]
        if target not in test_users[u][0]:      # offline never masks the target; serving masks seen items
            assert (target in served_top) == bool(ranks[u] < 10)


def test_serve_config_yaml_is_a_valid_serve_and_raysrec_config(trained_model):
    from ray.serve.schema import ServeDeploySchema

    from raysrec.serving.config import ServeConfig

    text = (Path(__file__).resolve().parents[2] / "serve" / "config.yaml").read_text()
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text)) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(yaml.safe_load(text))
    (app,) = schema.applications
    assert app.import_path == "raysrec.serving.app:build_app"      # importable from an installed package
    import importlib

    module, _, name = app.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    cfg = ServeConfig.from_dict({**app.args, "model_dir": str(trained_model)})
    deployment = app.deployments[0]
    assert deployment.max_ongoing_requests >= deployment.user_config["max_batch_size"]
    assert cfg.host == "127.0.0.1" and schema.http_options.host == "127.0.0.1"

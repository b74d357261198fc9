"""Event types and item attributes from the log to the answer: a model trained on a log with a type column and an
item attribute reads each event's type, in the history form of /recommend (``types``) and from the live store
(/events keeps each event's type), and ranks with its attribute-fused item table, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import numpy as np
import pytest
import requests

from raysrec.data.pipeline import PrepareConfig, prepare
from raysrec.data.sources import SourceConfig
from raysrec.models.config import ModelConfig
from raysrec.train.config import TrainConfig
from raysrec.train.run import fit

from .conftest import wait_healthy

TINY = ModelConfig(hidden_dim=32, num_heads=2, num_layers=1, max_length=20)


@pytest.fixture(scope="module")
def typed_model(ray_local, tmp_path_factory):
    """A shop-like log where the type decides what comes next: after viewing item i a user views i + 1, after
    buying it they buy an accessory i + 50."""
    rng = np.random.default_rng(0)
    lines = ["user,item,event,time,shelf"]
    for user in range(300):
        item, t = int(rng.integers(1, 50)), 1_600_000_000 + user
        for step in range(12):
            kind = "buy" if rng.random() < 0.3 else "view"
            lines.append(f"u{user},{item},{kind},{t + 60 * step},s{item % 10}")
            item = item + 50 if kind == "buy" and item <= 50 else (item % 50) + 1
    root = tmp_path_factory.mktemp("typed")
    (root / "log.csv").write_text("\n".join(lines) + "\n")
    prepare(PrepareConfig(source=SourceConfig(path=str(root / "log.csv"), user_col="user", item_col="item",
                                              time_col="time", type_col="event"), output=str(root / "prepared"),
                          item_features=["shelf"]))
    fit(TrainConfig(data=str(root / "prepared"), output=str(root / "model"),
                    model=TINY.replace(use_types=True, use_item_features=True), epochs=8), use_ray=False)
    return root / "model"


@pytest.fixture(scope="module")
def typed_endpoint(typed_model, serve_port, tmp_path_factory):
    from ray import serve

    from raysrec.online.events import StoreConfig
    from raysrec.serving.app import run
    from raysrec.serving.config import ServeConfig

    state = tmp_path_factory.mktemp("typed-state")
    cfg = ServeConfig(model_dir=str(typed_model), port=serve_port, app_name="test-types",
                      store=StoreConfig(url=f"sqlite:///{state}/events.db"))
    run(cfg)
    url = f"http://127.0.0.1:{serve_port}"
    wait_healthy(url)
    yield url
    serve.delete(cfg.app_name)


def recommend(url, body):
    r = requests.post(f"{url}/recommend", json={"k": 5, "exclude_seen": False, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


# Before the endpoint's tests: the endpoint holds a CPU until the module ends, and the batch job's read tasks need one.
def test_batch_recommend_reads_each_users_types(typed_model, tmp_path):
    """`raysrec recommend --data` passes each user's stored types (and a histories file its `types` column): the
    answers are the typed Recommender's, not the untyped ones."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raysrec.data.storage import PreparedData
    from raysrec.serving.batch import OUTPUT_DIR, RecommendConfig, recommend
    from raysrec.serving.recommender import Query, Recommender

    prepared = typed_model.parent / "prepared"
    recommend(RecommendConfig(model=str(typed_model), data=str(prepared), output=str(tmp_path / "recs"), k=5,
                              exclude_seen=False, now=1.7e9, num_actors=1, cpus_per_actor=0.5))
    recs = pq.read_table(tmp_path / "recs" / OUTPUT_DIR).to_pandas().set_index("user_id")
    data = PreparedData.load(prepared)
    shards = pq.read_table(prepared / "sequences").to_pandas().sample(30, random_state=0)
    ids, names = data.item_ids(), data.event_types
    rec = Recommender.load(typed_model)

    def answer(row, typed: bool) -> list:
        query = Query(history=[ids[i - 1] for i in row["sequence"]], timestamps=list(row["timestamps"]), now=1.7e9,
                      types=[names[t - 1] for t in row["types"]] if typed else None, k=5, exclude_seen=False)
        return [item["item_id"] for item in rec.run([query])[0].items]

    typed = {row["user_id"]: answer(row, True) for _, row in shards.iterrows()}
    assert all(list(recs.loc[user, "item_ids"]) == items for user, items in typed.items())
    assert any(answer(row, False) != typed[row["user_id"]] for _, row in shards.iterrows())
    # a histories file with a types column (names), as an export from another system would have it
    first = shards.iloc[0]
    pq.write_table(pa.table({"user_id": ["x"], "history": [[int(ids[i - 1]) for i in first["sequence"]]],
                             "timestamps": [list(first["timestamps"])],
                             "types": [[names[t - 1] for t in first["types"]]]}), tmp_path / "histories.parquet")
    recommend(RecommendConfig(model=str(typed_model), histories=str(tmp_path / "histories.parquet"),
                              output=str(tmp_path / "file-recs"), k=5, exclude_seen=False, now=1.7e9,
                              num_actors=1, cpus_per_actor=0.5))
    from_file = pq.read_table(tmp_path / "file-recs" / OUTPUT_DIR).to_pandas()
    assert list(from_file["item_ids"][0]) == typed[first["user_id"]]


def test_the_model_reads_types_from_the_request_and_from_the_store(typed_model, typed_endpoint):
    info = requests.get(f"{typed_endpoint}/model", timeout=30).json()
    assert info["config"]["model"]["type_names"] == ["buy", "view"]
    assert info["config"]["model"]["feature_vocab"] == {"shelf": [f"s{i}" for i in range(10)]}
    history, times = [3, 4, 5], [1.0, 2.0, 3.0]
    viewed = recommend(typed_endpoint, {"history": history, "timestamps": times, "types": ["view"] * 3})
    bought = recommend(typed_endpoint, {"history": history, "timestamps": times, "types": ["view", "view", "buy"]})
    untyped = recommend(typed_endpoint, {"history": history, "timestamps": times})
    assert viewed["items"] != bought["items"] and untyped["items"] not in (viewed["items"], bought["items"])
    # what the log taught: after a view of 5 comes 6, after a buy of 5 its accessory 55
    lead = {}
    for name, kinds in (("viewed", ["view"] * 3), ("bought", ["view", "view", "buy"])):
        r = requests.post(f"{typed_endpoint}/score", json={"history": history, "timestamps": times, "types": kinds,
                                                          "candidates": [55, 6]}, timeout=60)
        accessory, next_item = r.json()["scores"]
        lead[name] = accessory - next_item
    assert lead["bought"] > lead["viewed"] + 1.0, lead
    # a type the model never saw counts as no type
    odd = recommend(typed_endpoint, {"history": history, "timestamps": times, "types": ["share"] * 3})
    assert odd["items"] == untyped["items"]

    events = [{"event_id": f"t-{n}", "user_id": "shopper", "item_id": item, "type": kind, "timestamp": t}
              for n, (item, kind, t) in enumerate(zip(history, ["view", "view", "buy"], times))]
    assert requests.post(f"{typed_endpoint}/events", json={"events": events}, timeout=60).json()["accepted"] == 3
    by_user = recommend(typed_endpoint, {"user_id": "shopper"})
    assert by_user["items"] == bought["items"]


def test_types_must_match_the_history(typed_endpoint):
    r = requests.post(f"{typed_endpoint}/recommend", json={"history": [3, 4], "types": ["view"]}, timeout=60)
    assert r.status_code == 422 and "types has 1 entries but history has 2" in r.text
    # user attributes the model was not trained with are refused, not ignored
    r = requests.post(f"{typed_endpoint}/recommend", json={"history": [3], "user_features": {"age": 30}}, timeout=60)
    assert r.status_code == 422 and "body.user_features.age: this model reads no such user attribute" in r.text
    r = requests.post(f"{typed_endpoint}/score", json={"history": [3], "candidates": [4], "user_features": {"a": [1]}},
                      timeout=60)
    assert r.status_code == 422 and "user_features" in r.text


def test_events_ingest_replays_each_rows_type(typed_model, typed_endpoint):
    from raysrec.online.replay import ReplayConfig, replay

    log = typed_model.parent / "log.csv"
    source = SourceConfig(path=str(log), user_col="user", item_col="item", time_col="time", type_col="event")
    counts = replay(ReplayConfig(source=source, url=typed_endpoint))
    rows = [line.split(",") for line in log.read_text().splitlines()[1:]]
    assert counts["accepted"] == len(rows)
    for user in ("u0", "u1", "u2"):
        stored = requests.get(f"{typed_endpoint}/users/{user}/history", timeout=30).json()["events"]
        assert [(e["item_id"], e["type"]) for e in stored] == [(int(r[1]), r[2]) for r in rows if r[0] == user]


def test_served_item_table_is_the_attribute_fused_one(typed_model):
    """The endpoint's item vectors are the model's fused table (ID + attribute), read from the checkpoint alone."""
    import torch

    from raysrec.serving.recommender import Recommender

    rec = Recommender.load(typed_model)
    with torch.no_grad():
        fused = rec.model.item_rows()
    assert torch.equal(rec.item_vectors, fused.float())
    assert not torch.allclose(fused[1:], rec.model.item_emb.weight[1:])            # the attribute part is there
    assert rec.model.feature_tokens_0[1:].gt(0).all()                              # every item has its shelf


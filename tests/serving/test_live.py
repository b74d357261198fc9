"""The live service over real HTTP on 127.0.0.1: POST /events into a real SQLite file, /recommend by user_id,
a user's history, forgetting a user, hostile input, and the scheduled flush into the Parquet event log."""

from __future__ import annotations

import json
import time
import uuid

import pandas as pd
import pytest
import requests

from raysrec.online.log import read_log

pytestmark = pytest.mark.usefixtures("endpoint")


def post(url, path, body):
    return requests.post(f"{url}{path}", json=body, timeout=60)


@pytest.fixture(scope="module")
def catalogue(trained_model):
    items = pd.read_parquet(trained_model / "checkpoint" / "items.parquet")
    return items["item_id"].tolist()


def new_user() -> str:
    return f"u-{uuid.uuid4().hex[:10]}"


def test_events_then_recommend_by_user_id_equals_the_history_form(endpoint, catalogue):
    user = new_user()
    items = [catalogue[i] for i in (5, 17, 3, 40)]
    events = [{"event_id": f"{user}-{n}", "user_id": user, "item_id": item, "type": "click", "timestamp": 1000.0 + n}
              for n, item in enumerate(items)]
    r = post(endpoint, "/events", {"events": events + [{"event_id": f"{user}-new", "user_id": user,
                                                        "item_id": "brand-new-item", "timestamp": 999.0}]})
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 5, "duplicates": 0, "unknown_items": ["brand-new-item"]}

    history = requests.get(f"{endpoint}/users/{user}/history", timeout=30).json()
    assert history["user_id"] == user
    assert [e["item_id"] for e in history["events"]] == ["brand-new-item", *items]       # (timestamp, arrival) order
    assert history["events"][1] == {"event_id": f"{user}-0", "item_id": items[0], "type": "click",
                                    "timestamp": 1000.0}

    by_user = post(endpoint, "/recommend", {"user_id": user, "k": 10, "now": 2000.0}).json()
    by_history = post(endpoint, "/recommend", {"history": ["brand-new-item", *items], "k": 10, "now": 2000.0,
                                               "timestamps": [999.0, 1000.0, 1001.0, 1002.0, 1003.0]}).json()
    assert by_user["form"] == "user_id" and by_user["history_events"] == 5 and by_history["form"] == "history"
    assert by_user["items"] == by_history["items"] and by_user["unknown_items"] == ["brand-new-item"]
    assert not {i["item_id"] for i in by_user["items"]} & set(items)                    # exclude_seen

    # the next event changes the answer at once (read-your-writes)
    later = {"event_id": f"{user}-later", "user_id": user, "item_id": catalogue[60], "timestamp": 1500.0}
    assert post(endpoint, "/events", {"events": [later]}).json()["accepted"] == 1
    after = post(endpoint, "/recommend", {"user_id": user, "k": 10, "now": 2000.0}).json()
    assert after["history_events"] == 6 and after["items"] != by_user["items"]
    assert catalogue[60] not in {i["item_id"] for i in after["items"]}


def test_retries_are_idempotent_and_a_changed_payload_is_409(endpoint, catalogue):
    user = new_user()
    batch = [{"event_id": f"{user}-{n}", "user_id": user, "item_id": catalogue[n]} for n in range(3)]
    assert post(endpoint, "/events", {"events": batch}).json()["accepted"] == 3
    retry = post(endpoint, "/events", {"events": batch}).json()          # no timestamps: the server's clock moved
    assert (retry["accepted"], retry["duplicates"]) == (0, 3)
    changed = post(endpoint, "/events", {"events": [{"event_id": f"{user}-9", "user_id": user, "item_id": catalogue[9]},
                                                    {**batch[1], "item_id": catalogue[7]}]})
    assert changed.status_code == 409 and "events.1.event_id" in changed.json()["error"]
    stored = requests.get(f"{endpoint}/users/{user}/history", timeout=30).json()["events"]
    assert [e["event_id"] for e in stored] == [f"{user}-{n}" for n in range(3)]       # nothing of the 409 batch


def test_unknown_user_gets_the_empty_history_answer_marked(endpoint):
    body = post(endpoint, "/recommend", {"user_id": new_user(), "k": 5}).json()
    empty = post(endpoint, "/recommend", {"history": [], "k": 5}).json()
    assert body["history_events"] == 0 and body["fallback"] == "popularity" and body["items"] == empty["items"]
    assert requests.get(f"{endpoint}/users/nobody-{uuid.uuid4().hex}/history", timeout=30).json()["events"] == []


def test_forget_a_user(endpoint, catalogue):
    user = new_user()
    post(endpoint, "/events", {"events": [{"event_id": f"{user}-0", "user_id": user, "item_id": catalogue[1]}]})
    r = requests.delete(f"{endpoint}/users/{user}", timeout=30)
    assert r.status_code == 200 and r.json()["deleted"] == 1 and "event log" in r.json()["remains"]
    assert requests.get(f"{endpoint}/users/{user}/history", timeout=30).json()["events"] == []


HOSTILE = [
    ("not json", "invalid JSON"),
    ('{"events": {"a": 1}}', "expected {\"events\""),
    ('{"events": [], "extra": 1}', "body.extra"),
    ('{"events": [{"event_id": "e", "user_id": 1, "item_id": 2, "timestamp": NaN}]}', "invalid JSON"),
    ('{"events": [{"event_id": "e", "user_id": 1, "item_id": 2, "timestamp": -5}]}', "events.0.timestamp"),
    ('{"events": [{"event_id": "e", "user_id": 1, "item_id": 2, "timestamp": 4e12}]}', "events.0.timestamp"),
    ('{"events": [{"event_id": "e", "user_id": "' + "u" * 10_000 + '", "item_id": 2}]}', "events.0.user_id"),
    ('{"events": [{"event_id": "e", "user_id": "a\\u0000b", "item_id": 2}]}', "events.0.user_id"),
    ('{"events": [{"event_id": "e", "user_id": 1, "item_id": [2]}]}', "events.0.item_id"),
    ('{"events": [{"event_id": "e", "user_id": 1, "item_id": 2, "type": "purchase"}]}', "events.0.type"),
    ('{"events": [{"event_id": 7, "user_id": 1, "item_id": 2}]}', "events.0.event_id"),
    ('{"events": [' + ",".join([f'{{"event_id": "e{i}", "user_id": 1, "item_id": 2}}' for i in range(1001)]) + "]}",
     "at most 1000 events"),
]


@pytest.mark.parametrize("body,mentions", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_events_get_a_4xx_naming_the_field_and_nothing_is_written(endpoint, body, mentions):
    before = requests.get(f"{endpoint}/users/1/history", timeout=30).json()["events"]
    r = requests.post(f"{endpoint}/events", data=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 422 and mentions in r.json()["error"], (r.status_code, r.text[:300])
    assert requests.get(f"{endpoint}/users/1/history", timeout=30).json()["events"] == before
    assert requests.get(f"{endpoint}/healthz", timeout=30).status_code == 200


def test_oversized_body_and_mixed_forms_are_refused(endpoint):
    big = {"events": [{"event_id": f"e{i}", "user_id": 1, "item_id": "x" * 200} for i in range(400)]}
    assert post(endpoint, "/events", big).status_code == 413                  # the endpoint's 64 KiB body limit
    both = post(endpoint, "/recommend", {"user_id": 1, "history": [1, 2]})
    assert both.status_code == 422 and "not both" in both.json()["error"]


def test_a_flooding_user_is_capped_in_the_hot_state_and_the_log_keeps_everything(endpoint, trained_model,
                                                                                 catalogue, tmp_path_factory):
    user = new_user()
    events = [{"event_id": f"{user}-{n}", "user_id": user, "item_id": catalogue[n % 50], "timestamp": 5000.0 + n}
              for n in range(100)]
    for start in range(0, 100, 25):
        assert post(endpoint, "/events", {"events": events[start:start + 25]}).json()["accepted"] == 25
    stored = requests.get(f"{endpoint}/users/{user}/history", timeout=30).json()["events"]
    assert [e["event_id"] for e in stored] == [f"{user}-{n}" for n in range(70, 100)]      # max_history 30
    store = requests.get(f"{endpoint}/model", timeout=30).json()["store"]
    deadline = time.time() + 60                        # the replica flushes the event log every second
    while time.time() < deadline:
        log = read_log(store["event_log"]).to_pandas()
        mine = log[log["user_id"] == user]
        if len(mine) == 100:
            break
        time.sleep(0.5)
    assert mine["event_id"].tolist() == [f"{user}-{n}" for n in range(100)]
    assert not log["event_id"].duplicated().any()


def test_the_same_contract_with_a_redis_store(ray_local, trained_model, serve_port, redis_server, catalogue):
    """The endpoint on a real redis-server: events, the user_id form equal to the history form, 409, history."""
    from ray import serve

    from raysrec.online.events import StoreConfig
    from raysrec.serving.app import run
    from raysrec.serving.config import ServeConfig
    from tests.serving.conftest import wait_healthy

    cfg = ServeConfig(model_dir=str(trained_model), port=serve_port, app_name="live-redis", route_prefix="/redis",
                      store=StoreConfig(url=redis_server.url, key_prefix=f"http{uuid.uuid4().hex[:6]}"))
    run(cfg)
    url = f"http://127.0.0.1:{serve_port}/redis"
    try:
        wait_healthy(url)
        assert requests.get(f"{url}/model", timeout=30).json()["store"]["kind"] == "RedisStore"
        user, items = new_user(), [catalogue[i] for i in (4, 9, 2)]
        events = [{"event_id": f"{user}-{n}", "user_id": user, "item_id": item, "timestamp": 10.0 + n}
                  for n, item in enumerate(items)]
        assert post(url, "/events", {"events": events}).json() == {"accepted": 3, "duplicates": 0, "unknown_items": []}
        assert post(url, "/events", {"events": events[:1]}).json()["duplicates"] == 1
        assert post(url, "/events", {"events": [{**events[0], "item_id": catalogue[5]}]}).status_code == 409
        by_user = post(url, "/recommend", {"user_id": user, "k": 10, "now": 20.0}).json()
        by_history = post(url, "/recommend", {"history": items, "timestamps": [10.0, 11.0, 12.0], "k": 10,
                                              "now": 20.0}).json()
        assert by_user["items"] == by_history["items"] and by_user["history_events"] == 3
        assert [e["item_id"] for e in requests.get(f"{url}/users/{user}/history", timeout=30).json()["events"]] == items
        assert requests.delete(f"{url}/users/{user}", timeout=30).json()["deleted"] == 3
    finally:
        serve.delete(cfg.app_name)


def test_events_ingest_replays_a_log_in_time_order_once(endpoint, catalogue, tmp_path, capsys):
    from raysrec.cli import main

    log = tmp_path / "later.csv"
    rows = [("replayer", catalogue[i], 3000 - i) for i in range(10)]          # written newest first
    log.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    assert main(["events", "ingest", str(log), "--url", endpoint, "--batch-size", "4"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert (first["events"], first["accepted"], first["duplicates"]) == (10, 10, 0)
    assert main(["events", "ingest", str(log), "--url", endpoint]) == 0            # again: nothing stored twice
    assert json.loads(capsys.readouterr().out)["duplicates"] == 10
    stored = requests.get(f"{endpoint}/users/replayer/history", timeout=30).json()["events"]
    assert [e["item_id"] for e in stored] == [catalogue[i] for i in reversed(range(10))]   # in time order
    other = log.with_name("other.csv")
    other.write_text(log.read_text().replace("replayer,", "buyer,"))
    assert main(["events", "ingest", str(other), "--url", endpoint, "--type", "buy", "--limit", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["accepted"] == 3                             # the 3 oldest only
    bought = requests.get(f"{endpoint}/users/buyer/history", timeout=30).json()["events"]
    assert [(e["item_id"], e["type"]) for e in bought] == [(catalogue[i], "buy") for i in (9, 8, 7)]
    assert main(["events", "ingest", str(log), "--url", "http://127.0.0.1:9"]) == 2       # no server: at once
    assert "no server answers at http://127.0.0.1:9" in capsys.readouterr().err

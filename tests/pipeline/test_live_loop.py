"""The feedback loop on a live system: serve v1, post events that include new items, run the nightly pipeline
(export the live events, prepare the base log plus the event log, warm start, recommend, deploy). The deployed
v2 knows the new items, every user's state survived the swap, and no request failed meanwhile."""

from __future__ import annotations

import json
import threading

import pandas as pd
import pytest
import requests

from raysrec.pipeline import PipelineConfig, run_pipeline

# two CPUs in all: a replica (half a CPU, two during the rolling swap) and one training worker fit beside each other
SMALL = {"epochs": 1, "cpus_per_worker": 1, "model": {"hidden_dim": 16, "num_heads": 1, "num_layers": 1,
                                                      "max_length": 20}}
NEW_ITEMS = [9001, 9002, 9003, 9004, 9005]


@pytest.mark.slow
def test_nightly_pipeline_learns_the_live_events_and_swaps_without_losing_state(ray_local, serve_port, tmp_path):
    from ray import serve

    store = {"url": f"sqlite:///{tmp_path}/state/events.db", "event_log": str(tmp_path / "event-log"),
             "flush_interval_s": 1.0}
    live = {"port": serve_port, "app_name": "live-loop", "route_prefix": "/live", "access_log": False,
            "num_cpus": 0.5}
    quiet = {"log": lambda *a, **k: None}
    first = run_pipeline(PipelineConfig.from_dict({
        "output": str(tmp_path / "night1"), "train": SMALL, "serve": live, "store": store,
        "synth": {"num_users": 150, "num_items": 90, "num_events": 5000, "num_categories": 6, "seed": 1}}), **quiet)
    url = first["endpoint"]
    v1 = requests.get(f"{url}/model", timeout=30).json()
    try:
        users = ["1", "2", "3", "viewer-a", "viewer-b"]
        events = [{"event_id": f"live-{u}-{n}", "user_id": u, "item_id": NEW_ITEMS[n % 5] if n % 2 else 1 + n,
                   "type": "click"} for u in users for n in range(12)]
        posted = requests.post(f"{url}/events", json={"events": events}, timeout=60).json()
        assert posted["accepted"] == 60 and sorted(posted["unknown_items"]) == NEW_ITEMS
        before = {u: requests.get(f"{url}/users/{u}/history", timeout=30).json() for u in users}

        failures, answered, stop = [], [0], threading.Event()

        def traffic() -> None:
            with requests.Session() as s:
                while not stop.is_set():
                    for u in users:
                        r = s.post(f"{url}/recommend", json={"user_id": u, "k": 5}, timeout=60)
                        answered[0] += 1
                        if r.status_code != 200:
                            failures.append((r.status_code, r.text[:200]))

        client = threading.Thread(target=traffic)
        client.start()
        try:
            second = run_pipeline(PipelineConfig.from_dict({
                "output": str(tmp_path / "night2"), "serve": live, "store": store,
                "prepare": {"source": {"path": str(tmp_path / "night1" / "raw")}},
                "train": {**SMALL, "init_from": str(tmp_path / "night1" / "best")}, "recommend": {"k": 5, "cpus_per_actor": 0.5}}), **quiet)
        finally:
            stop.set()
            client.join(timeout=120)
        assert second["live_events"]["last_seq"] == 60
        warm = json.loads((tmp_path / "night2" / "best" / "checkpoint" / "state.json").read_text())["init_from"]
        assert warm["model"] == str(tmp_path / "night1" / "best")            # warm-started from last night
        assert warm["known_items"] + warm["new_items"] == second["data"]["num_items"] and warm["new_items"] == 5
        recs = pd.read_parquet(tmp_path / "night2" / "recommendations" / "recommendations")
        assert second["recommend"]["rows"] == len(recs) == second["data"]["num_users"]   # everyone's top-5
        assert recs["item_ids"].map(len).eq(5).all()
        assert not failures and answered[0] > 0, failures[:3]

        v2 = requests.get(f"{url}/model", timeout=30).json()
        assert v2["version"] != v1["version"] and v2["num_items"] == v1["num_items"] + len(NEW_ITEMS)
        scored = requests.post(f"{url}/score", json={"history": [1, 9001], "candidates": NEW_ITEMS}, timeout=30).json()
        assert scored["unknown_items"] == [] and all(s is not None for s in scored["scores"])
        for u in users:
            assert requests.get(f"{url}/users/{u}/history", timeout=30).json() == before[u]     # state survived
            answer = requests.post(f"{url}/recommend", json={"user_id": u, "k": 5}, timeout=30).json()
            assert answer["unknown_items"] == [] and answer["history_events"] == 12
    finally:
        serve.delete("live-loop")

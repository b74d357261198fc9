"""The live service under a real fault: a Serve replica SIGKILLed while a client streams events and retries its
failures with the same event ids. Afterwards the store holds every event exactly once."""

from __future__ import annotations

import os
import signal
import threading
import time

import pandas as pd
import pytest
import requests

from tests.serving.conftest import wait_healthy


def _replica_pids(app: str) -> list[int]:
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address,
                         filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    return [a.pid for a in actors if a.class_name == f"ServeReplica:{app}:recommender"]


@pytest.mark.slow
def test_a_replica_killed_mid_ingest_loses_and_repeats_nothing(ray_local, trained_model, serve_port, tmp_path):
    from ray import serve

    from raysrec.online.events import StoreConfig
    from raysrec.online.store import open_store
    from raysrec.serving.app import run
    from raysrec.serving.config import ServeConfig

    store = StoreConfig(url=f"sqlite:///{tmp_path}/events.db")
    cfg = ServeConfig(model_dir=str(trained_model), port=serve_port, app_name="live-faults", route_prefix="/faults",
                      num_replicas=2, num_cpus=0.5, access_log=False, store=store)
    run(cfg)
    url = f"http://127.0.0.1:{serve_port}/faults"
    wait_healthy(url)
    items = pd.read_parquet(trained_model / "checkpoint" / "items.parquet")["item_id"].tolist()
    batches, size, clients = 150, 20, 4            # four concurrent clients: requests in flight on both replicas
    acknowledged: list[int] = []
    failures: list[str] = []

    def stream(client: int) -> None:
        session = requests.Session()
        for b in range(client, batches, clients):
            body = {"events": [{"event_id": f"k{b}-{i}", "user_id": f"viewer{i % 13}", "item_id": items[(b + i) % 50],
                                "type": "view", "timestamp": 1000.0 + b} for i in range(size)]}
            deadline = time.time() + 120
            while True:                                  # the client's contract: retry with the same ids
                try:
                    r = session.post(f"{url}/events", json=body, timeout=30)
                    if r.status_code == 200:
                        acknowledged.append(b)
                        break
                    failures.append(str(r.status_code))
                except requests.RequestException as exc:
                    failures.append(type(exc).__name__)
                    session = requests.Session()
                if time.time() > deadline:
                    return
                time.sleep(0.05)

    threads = [threading.Thread(target=stream, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    while len(acknowledged) < 30:
        time.sleep(0.01)
    pids = _replica_pids("live-faults")
    assert len(pids) == 2, pids
    os.kill(pids[0], signal.SIGKILL)
    killed_at = len(acknowledged)
    for t in threads:
        t.join(timeout=300)
    try:
        assert sorted(acknowledged) == list(range(batches)), f"not every batch was acknowledged ({len(acknowledged)})"
        assert killed_at < batches, "the replica died after the stream had ended"
        with open_store(store) as db:
            stored = db.events_after(0, 1_000_000)
        ids = [e.event_id for e in stored]
        assert len(ids) == len(set(ids)) == batches * size     # every event once: none lost, none twice
        r = requests.post(f"{url}/recommend", json={"user_id": "viewer0", "k": 5}, timeout=30).json()
        assert r["history_events"] == 200               # 300 stored events of viewer0, the newest 200 read
    finally:
        serve.delete(cfg.app_name)
    print(f"replica {pids[0]} killed after {killed_at} of {batches} batches; client saw {len(failures)} failures "
          f"({sorted(set(failures))}), retried with the same ids")

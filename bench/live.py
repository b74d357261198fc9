"""Benchmark: the live service (#26), one run, on one local Ray. Prints tables and writes JSON.

1. **ingest**: events/s through ``POST /events`` into SQLite and into Redis (a real redis-server with
   ``appendfsync always``), in batches of 1 and 100, ``--ingest-clients`` concurrent clients; beside it the store
   alone (``append`` in a loop, no HTTP), its ceiling.
2. **recommend**: ``/recommend {"user_id"}`` against the ``history`` form sending the same stored events, on the
   same model, replica and cores: QPS and p50/p99 at each ``--concurrency`` (closed loop, ``bench/loadgen.py``).
3. **freshness**: from an event's 200 to the first ``/recommend`` answer that reflects it, p50/p99.
4. **replay**: what live state buys. Train on the events before a global time cut; back-fill every user's
   pre-cut events through ``/events``; replay the events after the cut in time order: before each one ask that
   user's top-10 by ``user_id``, then post it. HR@10 / NDCG@10 of that live answer against the same model with
   histories frozen at the cut (the ``history`` form with the pre-cut events). ML-100K and the Taobao sample.

    python bench/live.py [--sections ingest recommend freshness replay] [--epochs 15] [--seconds 10]
                         [--replay-events 6000] [--json bench/results/live.json]

The load generator and the ingest clients share the machine's cores with the server (say so with the figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))


def build(name: str, source: Path, root: Path, epochs: int) -> tuple[Path, Path, float]:
    """Prepare (global time split) and train SASRec in this process; returns (prepared, model, cut)."""
    from raysrec.data.pipeline import PrepareConfig, prepare
    from raysrec.data.sources import SourceConfig
    from raysrec.data.split import SplitConfig
    from raysrec.train.config import TrainConfig
    from raysrec.train.run import fit

    prepared, model = root / f"{name}-prepared", root / f"{name}-model"
    manifest = prepare(PrepareConfig(source=SourceConfig(path=str(source)), output=str(prepared), overwrite=True,
                                     split=SplitConfig(protocol="global_time")))
    fit(TrainConfig(data=str(prepared), output=str(model), epochs=epochs, patience=3), use_ray=False)
    return prepared, model, float(manifest["splits"]["valid_from"])


def taobao_csv(root: Path) -> Path:
    """The Taobao sample has no header (prepare reads headerless CSV once #27 lands): user,item,timestamp."""
    raw = pd.read_csv(SHARED / "taobao-sample" / "UserBehavior.csv", header=None,
                      names=["user_id", "item_id", "category_id", "behavior", "timestamp"])
    broken = raw["timestamp"].isna()          # the sample's last line is cut off before its timestamp
    print(f"taobao: {len(raw):,} rows, {int(broken.sum())} without a timestamp left out", flush=True)
    out = root / "taobao.csv"
    raw.loc[~broken, ["user_id", "item_id", "timestamp"]].astype("int64").to_csv(out, index=False)
    return out


def log_events(source: Path) -> pd.DataFrame:
    """The log in time order, as prepare reads it (user, item, timestamp, ord)."""
    from raysrec.data.sources import SourceConfig
    from raysrec.online.replay import ReplayConfig, read_events

    table, _, as_ints = read_events(ReplayConfig(source=SourceConfig(path=str(source))))
    frame = table.select(["user", "item", "timestamp", "ord"]).to_pandas()
    for column in as_ints:
        frame[column] = frame[column].astype(np.int64)
    return frame


def deploy(model: Path, store_url: str, port: int, app: str) -> str:
    from raysrec.online.events import StoreConfig
    from raysrec.serving.app import run
    from raysrec.serving.config import ServeConfig
    from tests.serving.conftest import wait_healthy

    cfg = ServeConfig(model_dir=str(model), port=port, app_name=app, route_prefix=f"/{app}", access_log=False,
                      store=StoreConfig(url=store_url))
    run(cfg)
    url = f"http://127.0.0.1:{port}/{app}"
    wait_healthy(url)
    return url


def post_all(url: str, events: pd.DataFrame, batch: int = 1000, prefix: str = "e") -> None:
    from raysrec.online.replay import Client

    client = Client(url)
    try:
        for start in range(0, len(events), batch):
            part = events.iloc[start:start + batch]
            body = {"events": [{"event_id": f"{prefix}{o}", "user_id": u, "item_id": i, "timestamp": t}
                               for u, i, t, o in zip(part["user"].tolist(), part["item"].tolist(),
                                                     part["timestamp"].tolist(), part["ord"].tolist())]}
            status, answer, _ = client.post("/events", body)
            assert status == 200, answer
    finally:
        client.close()


# ------------------------------------------------------------------------------------------ 1. ingest
async def ingest_load(url: str, batch: int, clients: int, seconds: float, items: list[Any]) -> dict[str, Any]:
    import aiohttp

    sent, latencies, failed = [0], [], [0]
    deadline = time.perf_counter() + seconds
    tag = f"{batch}-{time.time_ns()}"

    async def client(session, c: int) -> None:
        n = 0
        while time.perf_counter() < deadline:
            body = {"events": [{"event_id": f"{tag}-{c}-{n}-{j}", "user_id": f"load{c}-{n % 500}",
                                "item_id": items[(n + j) % len(items)]} for j in range(batch)]}
            n += 1
            started = time.perf_counter()
            async with session.post(f"{url}/events", json=body) as r:
                await r.read()
                if r.status == 200:
                    sent[0] += batch
                    latencies.append(time.perf_counter() - started)
                else:
                    failed[0] += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session, c) for c in range(clients)))
        wall = time.perf_counter() - started
    lat = np.asarray(latencies) * 1000
    return {"events_per_second": sent[0] / wall, "requests_per_second": len(latencies) / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)), "failed": failed[0]}


def store_alone(store_url: str, batch: int, seconds: float, prefix: str) -> float:
    from raysrec.online.events import Event, StoreConfig
    from raysrec.online.store import open_store

    n = 0
    with open_store(StoreConfig(url=store_url, key_prefix=prefix)) as store:
        deadline = time.perf_counter() + seconds
        started = time.perf_counter()
        while time.perf_counter() < deadline:
            store.append([Event(f"alone-{batch}-{n}-{j}", f"u{n % 500}", j, "view", 1e9, True) for j in range(batch)],
                         arrival=time.time())
            n += 1
        return n * batch / (time.perf_counter() - started)


# ------------------------------------------------------------------------------------------ 4. replay
def replay_value(url: str, events: pd.DataFrame, cut: float, known: set, limit: int, exclude_seen: bool,
                 prefix: str) -> dict[str, Any]:
    """Live (user_id form, then post the event) against frozen (history at the cut), on the events after it."""
    from raysrec.online.replay import Client

    before, after = events[events["timestamp"] < cut], events[events["timestamp"] >= cut].iloc[:limit]
    frozen_history = {u: g for u, g in before.groupby("user")}
    client = Client(url)
    frozen_top: dict[Any, list] = {}
    hits = {"live": [], "frozen": []}
    evaluated = 0
    try:
        for u, i, t, o in zip(after["user"].tolist(), after["item"].tolist(), after["timestamp"].tolist(),
                              after["ord"].tolist()):
            if i in known:
                evaluated += 1
                _, live, _ = client.post("/recommend", {"user_id": u, "k": 10, "now": t, "exclude_seen": exclude_seen})
                if u not in frozen_top:
                    g = frozen_history.get(u)
                    body = {"history": g["item"].tolist() if g is not None else [],
                            "timestamps": g["timestamp"].tolist() if g is not None else [], "now": cut, "k": 10,
                            "exclude_seen": exclude_seen}
                    frozen_top[u] = [x["item_id"] for x in client.post("/recommend", body)[1]["items"]]
                for name, top in (("live", [x["item_id"] for x in live["items"]]), ("frozen", frozen_top[u])):
                    rank = top.index(i) if i in top else None
                    hits[name].append(0.0 if rank is None else 1.0 / math.log2(rank + 2))
            status, answer, _ = client.post("/events", {"events": [{"event_id": f"{prefix}{o}", "user_id": u,
                                                                    "item_id": i, "timestamp": t}]})
            assert status == 200, answer
    finally:
        client.close()
    out = {"replayed": len(after), "evaluated": evaluated}
    for name, values in hits.items():
        arr = np.asarray(values)
        out[name] = {"hr@10": float((arr > 0).mean()), "ndcg@10": float(arr.mean())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["ingest", "recommend", "freshness", "replay"],
                        choices=["ingest", "recommend", "freshness", "replay"])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=10.0, help="per load measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--ingest-clients", type=int, default=16)
    parser.add_argument("--replay-events", type=int, default=6000, help="events replayed after the cut, per dataset")
    parser.add_argument("--json", default=str(HERE / "results" / "live.json"))
    args = parser.parse_args()

    import loadgen
    import ray
    from ray import serve

    from raysrec.online.store import open_store  # noqa: F401  (fail early without the extras)
    from tests.conftest import RedisServer

    results: dict[str, Any] = {"args": vars(args)}
    root = Path(tempfile.mkdtemp(prefix="raysrec-live-bench-"))
    redis = RedisServer(root / "redis")
    (root / "redis").mkdir()
    redis.start()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8765})
    try:
        t = time.time()
        ml_source = SHARED / "ml-100k"
        ml_prepared, ml_model, ml_cut = build("ml100k", ml_source, root, args.epochs)
        print(f"ML-100K model trained before {time.strftime('%Y-%m-%d', time.gmtime(ml_cut))} in {time.time() - t:.0f} s",
              flush=True)
        items = pd.read_parquet(ml_model / "checkpoint" / "items.parquet")["item_id"].tolist()
        ml_events = log_events(ml_source)
        stores = {"sqlite": f"sqlite:///{root}/state/events.db", "redis": redis.url}

        if "ingest" in args.sections:
            rows = []
            for kind, store_url in stores.items():
                url = deploy(ml_model, store_url, 8765, f"ingest-{kind}")
                for batch in (1, 100):
                    load = asyncio.run(ingest_load(url, batch, args.ingest_clients, args.seconds, items))
                    alone = store_alone(store_url, batch, args.seconds / 2, f"alone{time.time_ns()}")
                    rows.append({"store": kind, "batch": batch, **load, "store_alone_events_per_second": alone})
                    print(f"ingest {kind:6s} batch {batch:3d}: {load['events_per_second']:8.0f} events/s via HTTP "
                          f"(p50 {load['p50_ms']:.1f} ms, p99 {load['p99_ms']:.1f} ms, {load['failed']} failed); "
                          f"store alone {alone:8.0f} events/s", flush=True)
                serve.delete(f"ingest-{kind}")
            results["ingest"] = rows

        url = deploy(ml_model, f"sqlite:///{root}/live/events.db", 8765, "live")
        cut_events = ml_events[ml_events["timestamp"] < ml_cut]
        post_all(url, cut_events)                                   # back-fill: every user's pre-cut events
        if "recommend" in args.sections:
            users = sorted(cut_events["user"].unique().tolist())
            by_user = [{"user_id": u, "k": 10} for u in users]
            recent = cut_events.groupby("user").tail(200)
            by_history = [{"history": g["item"].tolist(), "timestamps": g["timestamp"].tolist(), "k": 10}
                          for _, g in recent.groupby("user")]
            loadgen.run(url, by_user, 4, 300, 5)                      # warm-up
            rows = []
            for c in args.concurrency:
                for form, bodies in (("history", by_history), ("user_id", by_user)):
                    r = loadgen.run(url, bodies, c, 100_000, args.seconds)
                    rows.append({"form": form, **r})
                    print(f"recommend {form:8s} c={c:3d}: {r['qps']:7.1f} QPS, p50 {r['p50']:6.1f} ms, p99 "
                          f"{r['p99']:6.1f} ms, failed {r['failed']}", flush=True)
            results["recommend"] = rows

        if "freshness" in args.sections:
            from raysrec.online.replay import Client

            client = Client(url)
            gaps, first_read = [], 0
            for n in range(300):                        # a new user per sample: reflected = one stored event
                user = f"fresh-{time.time_ns()}-{n}"
                status, _, _ = client.post("/events", {"events": [{"event_id": f"fresh-{user}", "user_id": user,
                                                                   "item_id": items[n % len(items)]}]})
                assert status == 200
                acked = time.perf_counter()
                reads = 0
                while True:
                    reads += 1
                    if client.post("/recommend", {"user_id": user, "k": 10})[1]["history_events"] == 1:
                        break
                gaps.append((time.perf_counter() - acked) * 1000)
                first_read += reads == 1
            client.close()
            results["freshness"] = {"samples": len(gaps), "p50_ms": float(np.percentile(gaps, 50)),
                                    "p99_ms": float(np.percentile(gaps, 99)), "reflected_by_the_first_read":
                                    first_read / len(gaps)}
            print(f"freshness: p50 {results['freshness']['p50_ms']:.1f} ms, p99 {results['freshness']['p99_ms']:.1f} ms"
                  f", reflected by the first read {first_read}/{len(gaps)}", flush=True)
        serve.delete("live")

        if "replay" in args.sections:
            rows = {}
            tb_source = taobao_csv(root)
            datasets = [("ml-100k", ml_source, ml_model, ml_cut, ml_events),
                        ("taobao", tb_source, *build("taobao", tb_source, root, args.epochs)[1:], None)]
            for name, source, model, cut, events in datasets:
                events = log_events(source) if events is None else events
                known = set(pd.read_parquet(model / "checkpoint" / "items.parquet")["item_id"].tolist())
                for exclude_seen in ((True,) if name == "ml-100k" else (True, False)):
                    app = f"replay-{name}-{int(exclude_seen)}"
                    url = deploy(model, f"sqlite:///{root}/{app}/events.db", 8765, app)
                    post_all(url, events[events["timestamp"] < cut])
                    r = replay_value(url, events, cut, known, args.replay_events, exclude_seen, "r")
                    serve.delete(app)
                    rows[f"{name}{'' if exclude_seen else ' (repeats allowed)'}"] = r
                    print(f"replay {name} exclude_seen={exclude_seen}: {r['evaluated']} of {r['replayed']} events "
                          f"scored; live HR@10 {r['live']['hr@10']:.4f} NDCG@10 {r['live']['ndcg@10']:.4f}; frozen "
                          f"HR@10 {r['frozen']['hr@10']:.4f} NDCG@10 {r['frozen']['ndcg@10']:.4f}", flush=True)
            results["replay"] = rows
    finally:
        serve.shutdown()
        ray.shutdown()
        redis.kill()
        shutil.rmtree(root, ignore_errors=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

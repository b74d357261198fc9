"""Benchmark: QPS and latency of the Serve endpoint, batched vs unbatched, at several concurrencies.

One run: builds a checkpoint with a catalogue of ``--items`` (default 20,000) items (default
SASRec architecture; the weights are freshly initialised because latency does not depend on
their values), deploys it on a local Ray Serve on 127.0.0.1, and for each mode (``@serve.batch``
on, then off: the same deployment with ``batching: false``) and each concurrency runs a
closed-loop load generator *in its own process* (`bench/loadgen.py`, aiohttp; C clients each send a request, wait
for the answer, send the next). Every level is bounded by ``--requests`` and ``--seconds``.

    python bench/serve_load.py [--items 20000] [--concurrency 1 16 64] [--requests 3000] [--seconds 30]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np


# ------------------------------------------------------------------ setup
def make_checkpoint(folder: Path, num_items: int) -> Path:
    import pandas as pd  # noqa: PLC0415

    from raysrec.artifact import save_checkpoint  # noqa: PLC0415
    from raysrec.models.sequential import ModelConfig, build_model  # noqa: PLC0415
    from raysrec.train.config import TrainConfig  # noqa: PLC0415

    rng = np.random.default_rng(0)
    items = pd.DataFrame({"item_index": np.arange(1, num_items + 1, dtype=np.int32),
                          "item_id": np.arange(100_001, 100_001 + num_items, dtype=np.int64),
                          "count": rng.zipf(1.5, num_items).astype(np.int64),
                          "title": [f"item {i}" for i in range(num_items)], "categories": "bench"})
    folder.mkdir(parents=True, exist_ok=True)
    items.to_parquet(folder / "items.parquet", index=False)
    cfg = TrainConfig(model=ModelConfig(num_items=num_items))
    model = build_model(cfg.model)
    save_checkpoint(folder / "checkpoint", model, cfg, {"epoch": 0, "best": None}, items_file=folder / "items.parquet")
    return folder / "checkpoint"


def replica_url() -> str:
    """The direct-ingress HTTP port of the (single) replica: the first answering port of Serve's range."""
    import urllib.request  # noqa: PLC0415

    low = int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "30000"))
    for port in range(low, low + 50):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
                if response.status == 200:
                    return f"http://127.0.0.1:{port}"
        except OSError:
            continue
    raise RuntimeError("no replica answers on a direct-ingress port")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--requests", type=int, default=3000, help="per level")
    parser.add_argument("--seconds", type=float, default=30.0, help="per level")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.002)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--direct-ingress", action="store_true",
                        help="Serve's direct ingress: the replica serves HTTP itself (no proxy hop); the load "
                             "goes to the replica's own port")
    args = parser.parse_args()
    if args.direct_ingress:  # read by Serve when it starts, in this process and the Ray processes it spawns
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"

    import loadgen  # noqa: PLC0415  (bench/loadgen.py, same folder)
    import ray  # noqa: PLC0415
    from ray import serve  # noqa: PLC0415

    from raysrec.serving.app import run
    from raysrec.serving.config import ServeConfig  # noqa: PLC0415

    work = Path(tempfile.mkdtemp(prefix="raysrec-bench-serve-"))
    model_dir = make_checkpoint(work, args.items)
    ids = list(range(100_001, 100_001 + args.items))
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    url = f"http://127.0.0.1:{args.port}"
    results = {}
    for mode in ("batched", "unbatched"):
        cfg = ServeConfig(model_dir=str(model_dir), port=args.port, batching=mode == "batched",
                          max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s,
                          access_log=False, app_name="bench")
        run(cfg)
        if args.direct_ingress:
            url = replica_url()
        loadgen.run(url, ids, 4, 200, 10)                              # warm-up
        for c in args.concurrency:
            results[(mode, c)] = r = loadgen.run(url, ids, c, args.requests, args.seconds)
            print(f"{mode:>9}  c={c:<3} {r['qps']:8.1f} qps  p50 {r['p50']:6.1f} ms  p95 {r['p95']:6.1f} ms  "
                  f"p99 {r['p99']:6.1f} ms  ok {r['ok']}  failed {r['failed']}", flush=True)
        if mode == "batched":   # the same replica's floor: GET /healthz runs the HTTP and Serve path, no model
            c = max(args.concurrency)
            results[("floor", c)] = r = loadgen.run(url, ids, c, args.requests, args.seconds, path="/healthz")
            print(f"{'/healthz':>9}  c={c:<3} {r['qps']:8.1f} qps  p50 {r['p50']:6.1f} ms  p99 {r['p99']:6.1f} ms",
                  flush=True)
        serve.delete(cfg.app_name)
    serve.shutdown()
    ray.shutdown()

    print(f"\n{args.items:,} items, SASRec 64-d x 2 layers, max_length 50, k=10, 1 replica (1 CPU, 1 torch thread), "
          f"{'direct ingress (no proxy), ' if args.direct_ingress else 'through the Serve HTTP proxy, '}"
          f"max_batch_size {args.max_batch_size}, wait {args.batch_wait_timeout_s * 1000:.0f} ms, {args.num_cpus} CPUs")
    print("| concurrency | batched QPS | unbatched QPS | ratio | batched p50 / p95 / p99 ms | unbatched p50 / p95 / p99 ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for c in args.concurrency:
        b, u = results[("batched", c)], results[("unbatched", c)]
        print(f"| {c} | {b['qps']:.1f} | {u['qps']:.1f} | {b['qps'] / u['qps']:.2f}x | "
              f"{b['p50']:.1f} / {b['p95']:.1f} / {b['p99']:.1f} | {u['p50']:.1f} / {u['p95']:.1f} / {u['p99']:.1f} |")
    c = max(args.concurrency)
    floor = results[("floor", c)]
    print(f"\nfloor: GET /healthz on the same replica at concurrency {c}: {floor['qps']:.1f} qps, p50 {floor['p50']:.1f} / "
          f"p99 {floor['p99']:.1f} ms. In a closed loop, mean latency = concurrency / QPS (Little's law), so "
          f"p99 <= 100 ms at concurrency {c} needs at least {c / 0.1:.0f} qps from /recommend.")
    failed = sum(r["failed"] for r in results.values())
    print(f"failed requests: {failed}")


if __name__ == "__main__":
    main()

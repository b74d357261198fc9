"""Benchmark: offline top-k for every user (`raysrec recommend`) vs asking the endpoint once per user.

One run, same checkpoint (``--items`` items, SASRec 64-d x 2, freshly initialised), same histories (``--users``
random histories of 5-50 items), same machine: users/s of the Ray Data batch job (``--num-actors`` actors,
1 CPU and 1 torch thread each, ``--batch-size`` users per model call), then the QPS of the Serve endpoint
(raysrec's default ingress, 1 replica, batching 64 / 2 ms) under a closed-loop load of ``--concurrency``
clients for ``--seconds``.

    python bench/batch_recommend.py [--items 20000] [--users 20000] [--num-actors 1] [--batch-size 1024]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--num-actors", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import loadgen  # noqa: PLC0415  (bench/, same folder)
    from serve_load import free_port, make_checkpoint, wait_for  # noqa: PLC0415

    from raysrec.ray_utils import ensure_ray  # noqa: PLC0415
    from raysrec.serving.batch import RecommendConfig, recommend  # noqa: PLC0415
    from raysrec.serving.config import ServeConfig  # noqa: PLC0415

    work = Path(tempfile.mkdtemp(prefix="raysrec-bench-batch-"))
    model = make_checkpoint(work / "model", args.items)
    ids = np.arange(100_001, 100_001 + args.items)
    rng = np.random.default_rng(0)
    histories = [rng.choice(ids, size=int(n)).tolist() for n in rng.integers(5, 51, size=args.users)]
    pq.write_table(pa.table({"user_id": np.arange(args.users), "history": histories}), work / "histories.parquet")

    serve_cfg = ServeConfig(model_dir=str(model), port=free_port(), access_log=False, app_name="bench")
    ensure_ray(num_cpus=args.num_cpus, serve_env=serve_cfg.ray_serve_env())
    started = time.perf_counter()
    summary = recommend(RecommendConfig(model=str(model), histories=str(work / "histories.parquet"),
                                        output=str(work / "recs"), k=args.k, batch_size=args.batch_size,
                                        num_actors=args.num_actors))
    wall = time.perf_counter() - started

    from ray import serve  # noqa: PLC0415

    from raysrec.serving.app import run  # noqa: PLC0415

    run(serve_cfg)
    url = f"http://127.0.0.1:{serve_cfg.port}"
    wait_for(url)
    loadgen.run(url, ids.tolist(), 4, 300, 10)                                # warm-up
    load = loadgen.run(url, ids.tolist(), args.concurrency, 10**9, args.seconds)
    serve.shutdown()

    print(f"\n{args.items:,} items, {args.users:,} users (histories of 5-50), k={args.k}, {os.cpu_count()} cores")
    print("| path | users/s | vs endpoint |")
    print("| --- | --- | --- |")
    print(f"| raysrec recommend ({args.num_actors} actor(s), batch {args.batch_size}; Ray Data read + write "
          f"included) | {summary['users_per_second']:,.0f} | {summary['users_per_second'] / load['qps']:.1f}x |")
    print(f"| endpoint, 1 replica, closed loop c={args.concurrency} (p99 {load['p99']:.0f} ms, failed "
          f"{load['failed']}) | {load['qps']:,.0f} | 1.0x |")
    print(f"\nbatch job wall time incl. model loads and Ray Data start: {wall:.1f} s ({args.users / wall:,.0f} users/s)")


if __name__ == "__main__":
    main()

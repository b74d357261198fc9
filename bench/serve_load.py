"""Benchmark: the Serve endpoint in each valid ingress configuration vs a plain uvicorn + FastAPI app, one run.

Builds a checkpoint with a catalogue of ``--items`` (default 20,000; SASRec 64-d x 2, freshly initialised:
latency does not depend on the weights), then for each configuration starts a fresh server (Ray's Serve
flags are read when Serve starts, so each Serve configuration gets its own Ray), warms it up, and runs a
closed-loop load generator (`bench/loadgen.py`, aiohttp, in its own process: C clients each POST
``/recommend``, wait, send the next) at each concurrency, bounded by ``--requests`` and ``--seconds``; then
the same at the highest concurrency on ``GET /livez`` (HTTP + framework, no model): the floor.

Configurations (``--configs``; batching on in all, same max_batch_size and wait):

* ``fastapi``: the baseline a user writes by hand (`bench/plain_fastapi.py`): uvicorn, FastAPI, an asyncio
  micro-batcher, the same request models, Recommender and responses. No Ray.
* ``proxy``: Serve's default Python HTTP proxy in front of the replica.
* ``direct``: ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``: no proxy, the replica serves HTTP on its own port.
* ``haproxy``: ``RAY_SERVE_ENABLE_HA_PROXY=1``: HAProxy (C) in front of the replica's direct-ingress port.
* ``to-proxy`` / ``to-direct`` / ``to-haproxy``: the same with ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (user code
  on the replica's main loop, in-loop router, buffered logs, gRPC between deployments, GC frozen at start).

Every Serve configuration starts its Ray with ``RAY_worker_niceness=0``, as `raysrec serve` does.

Cores: ``--server-cores`` pins the server side (Ray and everything it starts, or uvicorn) with
``sched_setaffinity``; ``--loadgen-cores`` pins the load generator with ``taskset``. Give them disjoint
cores to keep the client's CPU time out of the server's.

    python bench/serve_load.py [--items 20000] [--concurrency 1 16 64] [--requests 3000] [--seconds 20]
                               [--configs fastapi proxy direct haproxy to-proxy to-direct to-haproxy]
                               [--server-cores 0] [--loadgen-cores 1] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CONFIGS: dict[str, dict[str, str]] = {
    "fastapi": {},
    "proxy": {},
    "direct": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
    "to-proxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"},
    "to-direct": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "to-haproxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
}
SERVE_FLAGS = ("RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED",
               "RAY_worker_niceness")
# Every Serve configuration runs its actors at nice 0, as `raysrec serve` does (ServeConfig.ray_serve_env): at
# Ray's default of 15 a replica sharing a core with HAProxy (nice 0) waits whenever HAProxy has work.
for _name, _env in CONFIGS.items():
    if _name != "fastapi":
        _env.setdefault("RAY_worker_niceness", "0")


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/livez", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def wait_for(url: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not answers(url):
        if time.time() > deadline:
            raise TimeoutError(f"{url} did not answer in {timeout} s")
        time.sleep(0.2)


def replica_pid() -> int:
    import psutil  # noqa: PLC0415  (a Ray dependency)

    for proc in psutil.process_iter(["cmdline"]):
        if any("ServeReplica" in part for part in proc.info["cmdline"] or []):
            return proc.pid
    raise RuntimeError("no Serve replica process found")


def replica_url() -> str:
    """The direct-ingress HTTP port of the (single) replica: the first answering port of Serve's range."""
    low = int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "30000"))
    deadline = time.time() + 60
    while time.time() < deadline:
        for port in range(low, low + 50):
            if answers(f"http://127.0.0.1:{port}"):
                return f"http://127.0.0.1:{port}"
        time.sleep(0.5)
    raise RuntimeError("no replica answers on a direct-ingress port")


# ------------------------------------------------------------------ one configuration (its own process)
def measure(name: str, model_dir: str, args: argparse.Namespace) -> dict:
    import loadgen  # noqa: PLC0415  (bench/loadgen.py, same folder)

    ids = list(range(100_001, 100_001 + args.items))
    port = free_port()
    server = None
    if name == "fastapi":
        server = subprocess.Popen([sys.executable, str(HERE / "plain_fastapi.py"), "--model", model_dir,
                                   "--port", str(port), "--max-batch-size", str(args.max_batch_size),
                                   "--batch-wait-timeout-s", str(args.batch_wait_timeout_s)])
        url = f"http://127.0.0.1:{port}"
        wait_for(url)
    else:
        import ray  # noqa: PLC0415
        from ray import serve  # noqa: PLC0415

        from raysrec.serving.app import run  # noqa: PLC0415
        from raysrec.serving.config import ServeConfig  # noqa: PLC0415

        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        cfg = ServeConfig(model_dir=model_dir, port=port, max_batch_size=args.max_batch_size,
                          batch_wait_timeout_s=args.batch_wait_timeout_s, access_log=False, app_name="bench")
        run(cfg)
        url = replica_url() if name.endswith("direct") else f"http://127.0.0.1:{port}"
        wait_for(url)
    rows = {}
    try:
        loadgen.run(url, ids, 4, 300, 10, cpus=args.loadgen_cores)                   # warm-up
        for c in args.concurrency:
            spy = None
            if args.profile and c == max(args.concurrency):
                pid = server.pid if server is not None else replica_pid()
                out = Path(args.profile) / f"{name}.folded"
                out.parent.mkdir(parents=True, exist_ok=True)
                spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid), "-d", str(int(args.seconds)), "-r", "200",
                                        "-f", "raw", "-o", str(out), "--nonblocking"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows[str(c)] = loadgen.run(url, ids, c, args.requests, args.seconds, cpus=args.loadgen_cores)
            if spy is not None:
                spy.wait(60)
        c = max(args.concurrency)
        rows["floor"] = loadgen.run(url, ids, c, args.requests, args.seconds, path="/livez", cpus=args.loadgen_cores)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        else:
            serve.shutdown()
            ray.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--requests", type=int, default=3000, help="per level")
    parser.add_argument("--seconds", type=float, default=20.0, help="per level")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.002)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="Ray's CPUs")
    parser.add_argument("--server-cores", help="pin the server side to these cores (e.g. 0)")
    parser.add_argument("--loadgen-cores", help="pin the load generator to these cores (e.g. 1)")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--profile", help="record the server process with py-spy at the highest concurrency "
                                          "into this folder (<config>.folded; summarise with bench/profile_top.py)")
    parser.add_argument("--one", nargs=2, metavar=("CONFIG", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        name, model_dir = args.one
        if args.server_cores:
            os.sched_setaffinity(0, {int(c) for c in args.server_cores.split(",")})
        print("RESULT " + json.dumps(measure(name, model_dir, args)), flush=True)
        return

    work = Path(tempfile.mkdtemp(prefix="raysrec-bench-serve-"))
    model_dir = str(make_checkpoint(work, args.items))
    results = {}
    passthrough = [a for a in sys.argv[1:] if a != "--configs" and a not in CONFIGS]
    for name in args.configs:
        env = {k: v for k, v in os.environ.items() if k not in SERVE_FLAGS} | CONFIGS[name]
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, *passthrough, "--one", name, model_dir], env=env,
                              capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            results[name] = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
            print(f"{name:>10}  failed: {results[name]['error']}", flush=True)
            continue
        results[name] = rows = json.loads(lines[-1][len("RESULT "):])
        print(f"{name:>10}  " + "  ".join(f"c={c}: {r['qps']:.0f} qps p99 {r['p99']:.0f} ms" for c, r in rows.items())
              + f"  ({time.perf_counter() - started:.0f} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))

    cores = (f"server pinned to core(s) {args.server_cores}, load generator to {args.loadgen_cores}"
             if args.server_cores or args.loadgen_cores else "nothing pinned")
    print(f"\n{args.items:,} items, SASRec 64-d x 2 layers, max_length 50, k=10, 1 replica (1 CPU, 1 torch thread), "
          f"batching on (max_batch_size {args.max_batch_size}, wait {args.batch_wait_timeout_s * 1000:g} ms), "
          f"{os.cpu_count()} cores, {cores}")
    levels = [str(c) for c in args.concurrency]
    print("| configuration | " + " | ".join(f"c={c} QPS | c={c} p50 / p99 ms" for c in levels)
          + f" | floor (GET /livez, c={levels[-1]}) QPS | vs fastapi at c={levels[-1]} | failed |")
    print("| --- |" + " --- | --- |" * len(levels) + " --- | --- | --- |")
    base = results.get("fastapi", {}).get(levels[-1], {}).get("qps")
    for name, rows in results.items():
        if "error" in rows:
            print(f"| {name} | failed: {rows['error']} |")
            continue
        cells = [f"{rows[c]['qps']:.0f} | {rows[c]['p50']:.1f} / {rows[c]['p99']:.1f}" for c in levels]
        ratio = f"{rows[levels[-1]]['qps'] / base:.2f}x" if base else "-"
        failed = sum(r["failed"] for r in rows.values())
        print(f"| {name} | " + " | ".join(cells) + f" | {rows['floor']['qps']:.0f} | {ratio} | {failed} |")


if __name__ == "__main__":
    main()

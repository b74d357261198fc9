"""Soak: steady load on a multi-replica deployment, with one replica's process killed in the middle.

Deploys a ``--items`` catalogue (random-init SASRec, as in ``serve_load.py``) with ``--replicas``
replicas on a local Ray Serve (127.0.0.1), runs the closed-loop load generator in its own process
for ``--seconds``, and at ``--kill-at`` of the run sends SIGKILL to one replica's worker process
(a real crash, not a graceful shutdown). Prints sent / ok / failed (by cause) / p50 / p99 and how
long Serve took to be back at full strength; ``--json`` writes the same as one JSON object.

    python bench/soak.py                        # 5 minutes, concurrency 8, 2 replicas
    python bench/soak.py --seconds 20 --json out.json     # the short mode the test suite runs
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
from pathlib import Path

from serve_load import make_checkpoint  # same folder


def alive_replicas(app: str) -> list[tuple[str, int]]:
    """(actor id, pid) of every live replica process of ``app``."""
    import ray  # noqa: PLC0415
    from ray.util.state import list_actors  # noqa: PLC0415

    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")],
                         limit=10_000, raise_on_missing_output=False)
    return [(a.actor_id, a.pid) for a in actors if a.class_name.startswith(f"ServeReplica:{app}:")]


def running_replicas(app: str) -> int:
    from ray import serve  # noqa: PLC0415

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in status.deployments.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--kill-at", type=float, default=0.5, help="fraction of the run at which a replica dies")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    import loadgen  # noqa: PLC0415  (bench/loadgen.py, same folder)
    from ray import serve  # noqa: PLC0415

    from raysrec.ray_utils import ensure_ray  # noqa: PLC0415
    from raysrec.serving.app import run
    from raysrec.serving.config import ServeConfig  # noqa: PLC0415

    work = Path(tempfile.mkdtemp(prefix="raysrec-soak-"))
    model_dir = make_checkpoint(work, args.items)
    ids = list(range(100_001, 100_001 + args.items))
    ensure_ray(num_cpus=args.num_cpus)  # the state API (which replica runs where) needs Ray's dashboard
    app = "soak"
    cfg = ServeConfig(model_dir=str(model_dir), port=args.port, num_replicas=args.replicas,
                      num_cpus=min(1.0, args.num_cpus / args.replicas), access_log=False, app_name=app)
    run(cfg)
    url = f"http://127.0.0.1:{args.port}"
    loadgen.run(url, ids, 2, 100, 10)  # warm-up

    load = loadgen.start(url, ids, args.concurrency, 10**9, args.seconds, seed=1)
    started = time.time()
    time.sleep(args.seconds * args.kill_at)
    replicas = alive_replicas(app)
    if len(replicas) != args.replicas:
        raise SystemExit(f"expected {args.replicas} live replicas before the kill, found {len(replicas)}")
    actor_id, pid = replicas[0]
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    recovered_s = None
    while time.time() - killed_at < max(60.0, args.seconds):
        alive = {a for a, _ in alive_replicas(app)}
        if actor_id not in alive and len(alive) == args.replicas and running_replicas(app) == args.replicas:
            recovered_s = time.time() - killed_at
            break
        time.sleep(0.25)
    figures = loadgen.result(load, timeout=args.seconds + 120)
    figures.update(replicas=args.replicas, items=args.items, killed_pid=pid,
                   killed_after_s=round(killed_at - started, 1),
                   recovered_after_s=None if recovered_s is None else round(recovered_s, 1))
    serve.delete(app)

    print(f"{args.seconds:.0f} s at concurrency {args.concurrency}, {args.replicas} replicas, {args.items:,} items; "
          f"replica pid {pid} killed (SIGKILL) after {figures['killed_after_s']} s")
    print(f"sent {figures['sent']}  ok {figures['ok']}  failed {figures['failed']} "
          f"({100 * figures['failed_fraction']:.2f} %) {figures['failures'] or ''}  "
          f"p50 {figures['p50']:.1f} ms  p99 {figures['p99']:.1f} ms  qps {figures['qps']:.1f}")
    print("back to full strength after "
          + (f"{figures['recovered_after_s']} s" if recovered_s is not None else "NEVER (within the wait)"))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

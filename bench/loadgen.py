"""A closed-loop HTTP load generator for the endpoint, run in its own process.

``concurrency`` clients each POST ``/recommend`` with a random history (or, when the JSON file holds request
bodies instead of item ids, a random one of them as is: ``{"user_id": ...}`` for the live form), or GET another
path, such as ``/healthz`` to measure the server's floor: everything but the model, wait for the answer and
send the next, until ``total`` requests or ``seconds`` have passed. Every request is counted:
``ok`` (HTTP 200), or ``failed`` under its status code or the client error's name.

    python bench/loadgen.py URL IDS.json CONCURRENCY TOTAL SECONDS [SEED [PATH]]   # one JSON line

:func:`start` launches it as a subprocess (so the server under test does not share the client's
CPU time with the measuring process's own event loop) and :func:`result` reads its summary.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np


async def closed_loop(url: str, ids: list[Any], concurrency: int, total: int, seconds: float,
                      seed: int = 0, path: str = "/recommend") -> dict[str, Any]:
    import aiohttp  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    bodies = ids if ids and isinstance(ids[0], dict) else None
    pool = np.asarray([] if bodies else ids)   # once: rng.choice on a list copies it every call (1M items: ~30 ms)
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    sent = 0
    deadline = time.perf_counter() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while sent < total and time.perf_counter() < deadline:
            sent += 1
            if bodies is not None:
                body = bodies[int(rng.integers(0, len(bodies)))]
            else:
                body = {"history": pool[rng.integers(0, len(pool), int(rng.integers(5, 51)))].tolist(), "k": 10}
            started = time.perf_counter()
            request = (session.post(f"{url}{path}", json=body) if path == "/recommend"
                       else session.get(f"{url}{path}"))
            try:
                async with request as response:
                    await response.read()
                    if response.status != 200:
                        failures[f"http {response.status}"] += 1
                        continue
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                failures[type(exc).__name__] += 1
                continue
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    lat = np.asarray(latencies) * 1000
    failed = sum(failures.values())
    return {"concurrency": concurrency, "sent": sent, "ok": len(latencies), "failed": failed,
            "failed_fraction": failed / max(sent, 1), "failures": dict(failures), "seconds": wall,
            "qps": len(latencies) / wall,
            **{f"p{q}": float(np.percentile(lat, q)) if len(lat) else float("nan") for q in (50, 95, 99)}}


def start(url: str, ids: list[Any], concurrency: int, total: int, seconds: float, seed: int = 0,
          path: str = "/recommend", cpus: str | None = None) -> subprocess.Popen:
    """Start the generator in its own Python process (pinned to ``cpus``, e.g. ``"1"``, with taskset when
    given); :func:`result` waits for its summary."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ids, f)
    pin = ["taskset", "-c", cpus] if cpus else []
    proc = subprocess.Popen(pin + [sys.executable, str(Path(__file__).resolve()), url, f.name, str(concurrency),
                             str(total), str(seconds), str(seed), path], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    proc.ids_file = f.name  # type: ignore[attr-defined]
    return proc


def result(proc: subprocess.Popen, timeout: float | None = None) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    os.unlink(proc.ids_file)  # type: ignore[attr-defined]
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}): {err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def run(url: str, ids: list[Any], concurrency: int, total: int, seconds: float, seed: int = 0,
        path: str = "/recommend", cpus: str | None = None) -> dict[str, Any]:
    return result(start(url, ids, concurrency, total, seconds, seed, path, cpus))


if __name__ == "__main__":
    _url, _ids, _c, _n, _s, *_rest = sys.argv[1:]
    summary = asyncio.run(closed_loop(_url, json.loads(Path(_ids).read_text()), int(_c), int(_n), float(_s),
                                      int(_rest[0]) if _rest else 0, _rest[1] if len(_rest) > 1 else "/recommend"))
    print(json.dumps(summary))

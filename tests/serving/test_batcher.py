"""The micro-batcher both the Serve replica and the plain-FastAPI baseline use (no Ray needed)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from raysrec.serving.config import ServeConfig
from raysrec.serving.http import MicroBatcher


def _run(batcher: MicroBatcher, queries: list, stagger: float = 0.0) -> list:
    async def main():
        async def one(i, q):
            await asyncio.sleep(i * stagger)
            return await batcher(q)
        return await asyncio.gather(*(one(i, q) for i, q in enumerate(queries)), return_exceptions=True)
    return asyncio.run(main())


def test_concurrent_calls_share_batches_of_at_most_max_batch_size_in_order():
    sizes = []

    def fn(batch):
        sizes.append(len(batch))
        time.sleep(0.01)
        return [q * 10 for q in batch]

    batcher = MicroBatcher(fn, ThreadPoolExecutor(1), max_batch_size=4, batch_wait_timeout_s=0.05)
    assert _run(batcher, list(range(10))) == [q * 10 for q in range(10)]
    assert sizes == [4, 4, 2]


def test_a_lone_call_waits_at_most_the_timeout():
    batcher = MicroBatcher(lambda b: b, ThreadPoolExecutor(1), max_batch_size=64, batch_wait_timeout_s=0.2)
    started = time.perf_counter()
    assert _run(batcher, ["x"]) == ["x"]
    assert 0.15 < time.perf_counter() - started < 1.0


def test_a_failing_batch_fails_each_of_its_callers_and_the_next_batch_runs():
    calls = []

    def fn(batch):
        calls.append(list(batch))
        if "bad" in batch:
            raise ValueError("model failed")
        return batch

    batcher = MicroBatcher(fn, ThreadPoolExecutor(1), max_batch_size=2, batch_wait_timeout_s=0.05)
    out = _run(batcher, ["a", "bad", "c"])
    assert [type(o) for o in out[:2]] == [ValueError, ValueError] and out[2] == "c"
    assert calls == [["a", "bad"], ["c"]]


def test_ingress_settings_become_the_ray_serve_environment():
    assert ServeConfig(model_dir="m", ingress="haproxy", throughput_optimized=True).ray_serve_env() == {
        "RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_worker_niceness": "0"}
    assert ServeConfig(model_dir="m").ray_serve_env() == {
        "RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0",
        "RAY_worker_niceness": "0"}
    with pytest.raises(Exception, match="ingress"):
        ServeConfig.from_dict({"model_dir": "m", "ingress": "nginx"})

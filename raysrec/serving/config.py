"""The serving stage's config (Ray-free: loading it imports neither Ray Serve nor FastAPI)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional

from raysrec.config import Config, check, option
from raysrec.online.events import StoreConfig


@dataclasses.dataclass
class ServeConfig(Config):
    """The serving stage's config (``serve/config.yaml`` passes the same fields as ``args``)."""

    model_dir: str = option("", 'a model folder (train/tune output) or a checkpoint folder')
    host: str = option("127.0.0.1", 'bind address (loopback by default)')
    port: int = option(8000, 'HTTP port')
    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = "EveryNode"  # HeadOnly: several nodes on one host
    # How HTTP reaches the replicas, and Serve's request path; both are read when Serve starts (Ray's
    # RAY_SERVE_* environment, see ray_serve_env): `raysrec serve` on its own local Ray applies them, a
    # cluster gets them in its nodes' environment. Figures in docs/benchmarks.md (bench/serve_load.py).
    ingress: Literal["proxy", "haproxy"] = option(
        "proxy", "proxy: Serve's Python HTTP proxy; haproxy: HAProxy (C) in front of each replica's own HTTP port, "
                 "4.5-5.5x the QPS here, for a host or pod that runs one Serve (it binds fixed ports 8404/9101 and "
                 "the replicas' ports on all interfaces)")
    throughput_optimized: bool = option(False, "Serve's throughput-optimised request path (user code on the "
                                               "replica's event loop, buffered logs); pays off with haproxy")
    app_name: str = "raysrec"
    route_prefix: str = "/"
    num_replicas: int = option(1, 'replicas')
    autoscaling: Optional[dict[str, Any]] = None     # Serve autoscaling_config; overrides num_replicas
    num_cpus: float = 1.0                            # per replica
    torch_threads: int = option(1, 'torch threads per replica')
    device: Literal["cpu", "cuda"] = option("cpu", 'where replicas run the model')
    retrieval: Literal["auto", "exact", "hnsw"] = option(
        "auto", "top-k: exact (every item scored), hnsw (FAISS graph, raysrec[ann]; recall@10 in GET /model), "
                "or auto: hnsw from ann_min_items items when FAISS is installed")
    ann_min_items: int = option(1_000_000, "catalogue size from which retrieval auto uses hnsw")
    ann_ef_search: int = option(512, "HNSW search breadth: higher = better recall, slower")
    batching: bool = option(True, 'micro-batch concurrent requests')
    max_batch_size: int = option(64, 'requests per batch at most')
    batch_wait_timeout_s: float = option(0.002, 'how long a batch waits to fill')
    max_ongoing_requests: Optional[int] = option(None, 'per replica (default 2 x max_batch_size)')
    max_request_bytes: int = 1 << 20
    access_log: bool = True                          # one log line per request (off for load tests)
    # the live state: per-user events (POST /events, /recommend by user_id) and the event log
    store: StoreConfig = dataclasses.field(default_factory=StoreConfig)

    def validate(self) -> None:
        check(self.model_dir != "", "serve.model_dir is required")
        check(1 <= self.port <= 65535, "serve.port must be in [1, 65535]")
        check(self.max_batch_size >= 1, "serve.max_batch_size must be >= 1")
        check(self.batch_wait_timeout_s >= 0, "serve.batch_wait_timeout_s must be >= 0")
        check(self.num_replicas >= 1, "serve.num_replicas must be >= 1")
        check(self.max_request_bytes >= 1024, "serve.max_request_bytes must be >= 1024")
        check(self.ann_min_items >= 1 and self.ann_ef_search >= 1, "serve.ann_min_items and ann_ef_search must be >= 1")
        if self.max_ongoing_requests is not None:
            check(self.max_ongoing_requests >= self.max_batch_size,
                  "serve.max_ongoing_requests must be >= serve.max_batch_size, or batches can never fill")

    @property
    def url(self) -> str:
        """Where the app answers: ``http://host:port`` plus the route prefix."""
        return f"http://{self.host}:{self.port}{self.route_prefix.rstrip('/')}"

    def ray_serve_env(self) -> dict[str, str]:
        """The environment a Ray must start with for ``ingress`` and ``throughput_optimized``. Its actors also run
        at nice 0, not Ray's default 15: a replica sharing a core with HAProxy (nice 0) otherwise waits whenever
        HAProxy has work (1,152-1,307 -> 1,501 QPS at concurrency 64 on one core, bench/serve_load.py)."""
        haproxy = self.ingress == "haproxy"
        return {"RAY_SERVE_ENABLE_HA_PROXY": "1" if haproxy else "0",
                "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1" if haproxy else "0",
                "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1" if self.throughput_optimized else "0",
                "RAY_worker_niceness": "0"}

    @property
    def ongoing(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size

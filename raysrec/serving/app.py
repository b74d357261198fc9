"""Ray Serve application: a FastAPI ingress over :class:`~raysrec.serving.recommender.Recommender`.

Endpoints (JSON in and out, item ids are the dataset's original ids):

* ``POST /recommend`` ``{"history": [...], "k": 10, "exclude_seen": true, "exclude": []}`` ->
  ``{"items": [{"item_id", "score", "title"}], "unknown_items": [...], "model": "<version>"}``
* ``POST /score`` ``{"history": [...], "candidates": [...]}`` -> ``{"scores": [...]}`` (candidate
  order, ``null`` for unknown candidates)
* ``GET /healthz`` (readiness: a forward pass), ``GET /model``

* ``GET /livez`` (the process answers; no model call)

The live state (``store``: SQLite on one host by default, Redis on clusters; :mod:`raysrec.serving.live`):

* ``POST /events`` ``{"events": [{"event_id", "user_id", "item_id", "type", "timestamp"}]}`` ->
  ``{"accepted", "duplicates", "unknown_items"}``, once the events are durable;
* ``POST /recommend`` ``{"user_id": ..., "k": 10}``: the same answer as the ``history`` form on the user's
  stored events (``"form": "user_id"``);
* ``GET /users/{user_id}/history``, ``DELETE /users/{user_id}``.

Model calls are micro-batched by :class:`~raysrec.serving.http.MicroBatcher` (size and wait from
:class:`ServeConfig`, changeable live through the deployment's ``user_config``); the forward pass runs
on one worker thread, so the replica's event loop keeps collecting the next batch meanwhile and no
handler blocks it (required by Serve's throughput-optimised mode, which runs them on that loop).
``@serve.batch`` did the same at 0.7x the QPS (bench/serve_load.py, docs/benchmarks.md "Serving").
"""


import asyncio
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from fastapi import Request
from fastapi.responses import Response
from ray import serve

from raysrec.online.events import StoreUnavailable, user_key
from raysrec.serving.config import ServeConfig
from raysrec.serving.http import (
    BodyLimit,
    MicroBatcher,
    RecommendRequest,
    RecommendResponse,
    ScoreRequest,
    ScoreResponse,
    error_response,
    finite,
    make_api,
    parse,
    recommend_response,
    request_schema,
    score_response,
)
from raysrec.serving.live import LiveState
from raysrec.serving.recommender import Query, Recommender

__all__ = ["ServeConfig", "build_app", "run"]

api = make_api()


@dataclasses.dataclass
class ByUser:
    """A ``/recommend {"user_id"}`` request waiting for its model batch (its history is read there)."""

    request: RecommendRequest
    user: str
    now: float

    def query(self, events: list) -> Query:
        return self.request.user_query([e.item_id for e in events], [e.timestamp for e in events], self.now,
                                       [e.type for e in events])


@serve.deployment(name="recommender")
@serve.ingress(api)
class RecommenderServer:
    """One replica: the model, its item vectors and a batcher."""

    def __init__(self, config: dict[str, Any]) -> None:
        import torch  # noqa: PLC0415

        self.cfg = ServeConfig.from_dict(config)
        if not any(m.cls is BodyLimit for m in api.user_middleware):  # before the app serves its first request
            api.add_middleware(BodyLimit, limit=self.cfg.max_request_bytes)
        torch.set_num_threads(self.cfg.torch_threads)
        self.rec = Recommender.load(self.cfg.model_dir, device=self.cfg.device, retrieval=self.cfg.retrieval,
                                    ann_min_items=self.cfg.ann_min_items, ann_ef_search=self.cfg.ann_ef_search,
                                    threads=self.cfg.torch_threads)
        self.version = self.rec.metadata["version"]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raysrec-model")
        self._batcher = MicroBatcher(self._run_batch, self._pool, self.cfg.max_batch_size, self.cfg.batch_wait_timeout_s)
        self.reconfigure({"batching": self.cfg.batching, "max_batch_size": self.cfg.max_batch_size,
                          "batch_wait_timeout_s": self.cfg.batch_wait_timeout_s})
        self.live = LiveState(self.cfg.store, lambda ids: self.rec.lookup(ids)[2]) if self.cfg.store.enabled else None

    def __del__(self) -> None:
        """Serve's graceful shutdown: the event log gets what the store acknowledged since the last flush."""
        if getattr(self, "live", None) is not None:
            self.live.close()
            self.live = None

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live-tunable batching (Serve ``user_config``): batching, max_batch_size, batch_wait_timeout_s."""
        self.batching = bool(user_config.get("batching", True))
        self.batch_options = {"max_batch_size": int(user_config.get("max_batch_size", self.cfg.max_batch_size)),
                              "batch_wait_timeout_s": float(user_config.get("batch_wait_timeout_s",
                                                                            self.cfg.batch_wait_timeout_s))}
        self._batcher.max_batch_size = self.batch_options["max_batch_size"]
        self._batcher.wait = self.batch_options["batch_wait_timeout_s"]

    async def _answer(self, query: Query | ByUser) -> Any:
        if self.batching:
            return await self._batcher(query)
        answers = await asyncio.get_running_loop().run_in_executor(self._pool, self._run_batch, [query])
        return answers[0]

    def _run_batch(self, batch: list[Query | ByUser]) -> list[Any]:
        """One model batch, on the model thread: the stored histories of the batch's user_id requests are read in
        one store call right before the forward pass (no extra thread hop, one read per batch)."""
        users = [b.user for b in batch if isinstance(b, ByUser)]
        stored: dict[str, list] = {}
        failed: Optional[StoreUnavailable] = None
        if users:
            try:
                stored = self.live.model_reader.histories(users)
            except StoreUnavailable as exc:
                failed = exc
        runnable = [b for b in batch if not (isinstance(b, ByUser) and failed)]     # a store error fails user_id only
        answers = iter(self.rec.run([b.query(stored[b.user]) if isinstance(b, ByUser) else b for b in runnable])
                       if runnable else [])
        out: list[Any] = []
        for b in batch:
            if isinstance(b, ByUser):
                out.append(failed or (next(answers), len(stored[b.user])))
            else:
                out.append(next(answers))
        return out

    @api.post("/recommend", response_model=RecommendResponse, openapi_extra=request_schema(RecommendRequest))
    async def recommend(self, request: Request) -> Response:
        body = await parse(request, RecommendRequest)
        problem = self.rec.user_features_problem(body.user_features)
        if problem:
            return error_response(422, problem)
        if body.user_id is None:
            return recommend_response(await self._answer(body.query()), self.version)
        if self.live is None:
            return error_response(422, "body.user_id: this endpoint keeps no live state (store.url none); "
                                       "send the history")
        result = await self._answer(ByUser(body, user_key(body.user_id), time.time()))
        if isinstance(result, StoreUnavailable):
            return error_response(503, str(result), {"Retry-After": "1"})
        answer, events = result
        return recommend_response(answer, self.version, history_events=events)

    @api.post("/events")
    async def events(self, request: Request) -> Response:
        """Record live events (idempotent by event_id); answers once they are durable in the store."""
        if self.live is None:
            return error_response(404, "this endpoint keeps no live state (store.url none)")
        return await self.live.ingest(await request.body())

    @api.get("/users/{user_id}/history")
    async def user_history(self, user_id: str) -> Response:
        """A user's stored events, oldest first (an unknown user has none)."""
        if self.live is None:
            return error_response(404, "this endpoint keeps no live state (store.url none)")
        return await self.live.history_response(user_key(user_id))

    @api.delete("/users/{user_id}")
    async def forget_user(self, user_id: str) -> Response:
        """Forget a user: the stored events and those not yet in the event log."""
        if self.live is None:
            return error_response(404, "this endpoint keeps no live state (store.url none)")
        return await self.live.forget(user_key(user_id))

    @api.post("/score", response_model=ScoreResponse, openapi_extra=request_schema(ScoreRequest))
    async def score(self, request: Request) -> Response:
        body = await parse(request, ScoreRequest)
        problem = self.rec.user_features_problem(body.user_features)
        if problem:
            return error_response(422, problem)
        return score_response(await self._answer(body.query()), self.version)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Readiness: one real forward pass, on the same worker thread as the batches."""
        answer = await asyncio.get_running_loop().run_in_executor(self._pool, self.rec.probe)
        return {"status": "ok", "model": self.version, "probe": answer.items[0]["item_id"]}

    @api.get("/livez")
    async def livez(self) -> dict[str, str]:
        """Liveness: the process answers HTTP (no model call; `/healthz` is readiness and runs the model)."""
        return {"status": "ok"}

    @api.get("/model")
    async def model(self) -> dict[str, Any]:
        meta = dict(self.rec.metadata)
        meta["batching"] = {"enabled": self.batching, **self.batch_options}
        meta["store"] = self.live.describe() if self.live is not None else None
        return finite(meta)

    async def check_health(self) -> None:
        """Serve's replica health check: the model still answers (a forward pass, not the popularity path)."""
        await asyncio.get_running_loop().run_in_executor(self._pool, self.rec.probe)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder (``serve run serve.app:app_builder model_dir=...`` or ``serve/config.yaml``)."""
    cfg = ServeConfig.from_dict(dict(args))
    cfg = cfg.replace(store=cfg.store.absolute())   # replicas do not share our working directory
    options: dict[str, Any] = {
        "max_ongoing_requests": cfg.ongoing,
        "ray_actor_options": {"num_cpus": cfg.num_cpus, **({"num_gpus": 1} if cfg.device == "cuda" else {})},
        "logging_config": {"enable_access_log": cfg.access_log},
        "user_config": {"batching": cfg.batching, "max_batch_size": cfg.max_batch_size,
                        "batch_wait_timeout_s": cfg.batch_wait_timeout_s},
    }
    if cfg.autoscaling:
        options["autoscaling_config"] = cfg.autoscaling
    else:
        options["num_replicas"] = cfg.num_replicas
    return RecommenderServer.options(**options).bind(cfg.to_dict())


def run(cfg: ServeConfig, blocking: bool = False):
    """Start Serve's HTTP proxy on ``cfg.host:cfg.port`` and deploy; returns the app handle."""
    serve.start(proxy_location=cfg.proxy_location, http_options={"host": cfg.host, "port": cfg.port})
    return serve.run(build_app(cfg.to_dict()), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=blocking)


def serve_until_stopped(app_name: str) -> None:
    """Keep this driver (and a local Ray's Serve) up until SIGTERM or Ctrl-C, then stop gracefully: the app is
    deleted first, so new requests are turned away while each replica finishes the requests it holds (Serve
    waits for them, up to its graceful_shutdown_timeout_s) before it stops; then Serve shuts down.

    Kubernetes, systemd and ``timeout`` stop a process with SIGTERM. Ray's driver handler for it would abort
    with in-flight requests lost; here SIGTERM and SIGINT take the same path."""
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    stop = threading.Event()
    received: list[str] = []

    def _stop(signum, _frame) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(1.0):
            pass
        print(f"{received[0]}: no new requests; finishing the ones in flight, then stopping Serve", flush=True)
        serve.delete(app_name)          # blocks until the replicas have drained and stopped
        serve.shutdown()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("stopped", flush=True)

"""Ray Serve application: a FastAPI ingress over :class:`~raysrec.serving.recommender.Recommender`.

Endpoints (JSON in and out, item ids are the dataset's original ids):

* ``POST /recommend`` ``{"history": [...], "k": 10, "exclude_seen": true, "exclude": []}`` ->
  ``{"items": [{"item_id", "score", "title"}], "unknown_items": [...], "model": "<version>"}``
* ``POST /score`` ``{"history": [...], "candidates": [...]}`` -> ``{"scores": [...]}`` (candidate
  order, ``null`` for unknown candidates)
* ``GET /healthz``, ``GET /model``

Model calls are batched with ``@serve.batch`` (size and wait from :class:`ServeConfig`, changeable
live through the deployment's ``user_config``); the forward pass runs on one worker thread so
the replica's event loop keeps collecting the next batch meanwhile.
"""


import asyncio
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, StrictBool, StrictInt, StrictStr, model_validator
from ray import serve

from raysrec.serving.config import ServeConfig
from raysrec.serving.recommender import Answer, Query, Recommender

__all__ = ["ServeConfig", "build_app", "run"]

MAX_K = 1000
MAX_HISTORY = 10_000      # ids per request (history, exclude, candidates); the model reads the newest max_length
ItemId = Union[StrictInt, StrictStr]


# ---------------------------------------------------------------- request / response models
class HistoryRequest(BaseModel):
    """What every request carries: the user's history (and optionally its times)."""

    model_config = ConfigDict(extra="forbid")

    history: list[ItemId] = Field(default_factory=list, max_length=MAX_HISTORY,
                                  description="original item ids, oldest first")
    timestamps: Optional[list[FiniteFloat]] = Field(
        None, max_length=MAX_HISTORY, description="unix seconds of each history item (used by longshort)")
    now: Optional[FiniteFloat] = Field(None, description="unix seconds of the request; default: server clock")

    @model_validator(mode="after")
    def _same_length(self):
        if self.timestamps is not None and len(self.timestamps) != len(self.history):
            raise ValueError(f"timestamps has {len(self.timestamps)} entries but history has {len(self.history)}")
        return self


class RecommendRequest(HistoryRequest):
    k: StrictInt = Field(10, ge=1, le=MAX_K)         # strict like the ids: "10" and true are 422, not 10 and 1
    exclude_seen: StrictBool = True
    exclude: list[ItemId] = Field(default_factory=list, max_length=MAX_HISTORY)

    def query(self) -> Query:
        return Query(self.history, self.k, self.exclude_seen, self.exclude, self.timestamps, self.now)


class ScoreRequest(HistoryRequest):
    candidates: list[ItemId] = Field(..., min_length=1, max_length=MAX_HISTORY)

    def query(self) -> Query:
        return Query(self.history, 0, False, (), self.timestamps, self.now, candidates=self.candidates)


class ScoredItem(BaseModel):
    item_id: ItemId
    score: Optional[float] = None
    title: Optional[str] = None


class RecommendResponse(BaseModel):
    items: list[ScoredItem]
    unknown_items: list[ItemId]
    model: str
    fallback: Optional[str] = Field(None, description='"popularity" when no history item was known')


class ScoreResponse(BaseModel):
    scores: list[Optional[float]]
    unknown_items: list[ItemId]
    model: str


# ---------------------------------------------------------------- the ASGI app
api = FastAPI(title="raysrec", description="Sequential recommendations from a raysrec checkpoint.")


@api.exception_handler(RequestValidationError)
async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with one readable line per problem (``body.k: Input should be ...``) plus FastAPI's detail."""
    problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return JSONResponse(status_code=422, content={"error": "; ".join(problems),
                                                  "detail": jsonable_encoder(exc.errors(), exclude={"input", "ctx"})})


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``limit`` bytes (declared or streamed), before parsing."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge()
            return message

        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send) -> None:
        body = f'{{"error": "request body over the {self.limit} byte limit"}}'.encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def _finite(value: Any) -> Any:
    """JSON cannot carry NaN/inf: replace them by ``None`` in metadata."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


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
        self.rec = Recommender.load(self.cfg.model_dir, device=self.cfg.device)
        self.version = self.rec.metadata["version"]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raysrec-model")
        self.reconfigure({"batching": self.cfg.batching, "max_batch_size": self.cfg.max_batch_size,
                          "batch_wait_timeout_s": self.cfg.batch_wait_timeout_s})

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live-tunable batching (Serve ``user_config``): batching, max_batch_size, batch_wait_timeout_s."""
        self.batching = bool(user_config.get("batching", True))
        self.batch_options = {"max_batch_size": int(user_config.get("max_batch_size", self.cfg.max_batch_size)),
                              "batch_wait_timeout_s": float(user_config.get("batch_wait_timeout_s",
                                                                            self.cfg.batch_wait_timeout_s))}
        self._batched.set_max_batch_size(self.batch_options["max_batch_size"])
        self._batched.set_batch_wait_timeout_s(self.batch_options["batch_wait_timeout_s"])

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def _batched(self, queries: list[Query]) -> list[Answer]:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.rec.run, queries)

    async def _answer(self, query: Query) -> Answer:
        if self.batching:
            return await self._batched(query)
        answers = await asyncio.get_running_loop().run_in_executor(self._pool, self.rec.run, [query])
        return answers[0]

    @api.post("/recommend", response_model=RecommendResponse)
    async def recommend(self, body: RecommendRequest) -> RecommendResponse:
        answer = await self._answer(body.query())
        return RecommendResponse(items=[ScoredItem(**item) for item in answer.items],
                                 unknown_items=answer.unknown_items, model=self.version, fallback=answer.fallback)

    @api.post("/score", response_model=ScoreResponse)
    async def score(self, body: ScoreRequest) -> ScoreResponse:
        answer = await self._answer(body.query())
        return ScoreResponse(scores=answer.scores or [], unknown_items=answer.unknown_items, model=self.version)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Readiness: one real forward pass, on the same worker thread as the batches."""
        answer = await asyncio.get_running_loop().run_in_executor(self._pool, self.rec.probe)
        return {"status": "ok", "model": self.version, "probe": answer.items[0]["item_id"]}

    @api.get("/model")
    async def model(self) -> dict[str, Any]:
        meta = dict(self.rec.metadata)
        meta["batching"] = {"enabled": self.batching, **self.batch_options}
        return _finite(meta)

    async def check_health(self) -> None:
        """Serve's replica health check: the model still answers (a forward pass, not the popularity path)."""
        await asyncio.get_running_loop().run_in_executor(self._pool, self.rec.probe)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder (``serve run serve.app:app_builder model_dir=...`` or ``serve/config.yaml``)."""
    cfg = ServeConfig.from_dict(dict(args))
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

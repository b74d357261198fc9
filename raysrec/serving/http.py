"""The HTTP surface of the endpoint, without Ray: request/response models, the 413 body limit, the 422
format, response building, and a micro-batcher. The Serve app (:mod:`raysrec.serving.app`) and the
plain-FastAPI baseline of ``bench/serve_load.py`` both use it, so they do the same work per request.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Annotated, Any, Optional, TypeVar, Union

import orjson
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    StrictBool,
    StrictInt,
    StrictStr,
    StringConstraints,
    ValidationError,
    model_validator,
)

from raysrec.serving.recommender import Answer, Query

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
    now: Optional[FiniteFloat] = Field(None, description="unix seconds of the request; default: the newest history timestamp")
    types: Optional[list[Annotated[str, StringConstraints(min_length=1, max_length=64)]]] = Field(
        None, max_length=MAX_HISTORY, description="event type of each history item (view, cart, buy, ...), for a "
                                                  "model trained with types; a type it does not know counts as none")
    user_features: Optional[dict[Annotated[str, StringConstraints(min_length=1, max_length=64)],
                                 Union[Annotated[str, StringConstraints(max_length=256)], StrictInt, FiniteFloat,
                                       None]]] = Field(
        None, max_length=64, description="the user's attributes, raw (e.g. {\"age\": 24, \"gender\": \"M\"}), for "
                                         "a model trained with user attributes; a value it never saw counts as none")

    @model_validator(mode="after")
    def _same_length(self):
        for name in ("timestamps", "types"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.history):
                raise ValueError(f"{name} has {len(values)} entries but history has {len(self.history)}")
        return self


class RecommendRequest(HistoryRequest):
    user_id: Optional[ItemId] = Field(None, description="recommend from this user's stored events (POST /events) "
                                                        "instead of a history sent with the request")
    k: StrictInt = Field(10, ge=1, le=MAX_K)         # strict like the ids: "10" and true are 422, not 10 and 1
    exclude_seen: StrictBool = True
    exclude: list[ItemId] = Field(default_factory=list, max_length=MAX_HISTORY)

    @model_validator(mode="after")
    def _one_form(self):
        if self.user_id is not None and {"history", "timestamps", "types"} & self.model_fields_set:
            raise ValueError("give user_id (the stored history) or history, not both")
        if isinstance(self.user_id, str) and not (0 < len(self.user_id) <= 256 and self.user_id.isprintable()):
            raise ValueError("user_id: expected 1 to 256 printable characters")
        return self

    def query(self) -> Query:
        return Query(self.history, self.k, self.exclude_seen, self.exclude, self.timestamps, self.now,
                     types=self.types, user_features=self.user_features)

    def user_query(self, items: Sequence[ItemId], timestamps: Sequence[float], now: float,
                   types: Sequence[str]) -> Query:
        """The same query on a stored history (``now``: the request's, else the server's clock)."""
        return Query(items, self.k, self.exclude_seen, self.exclude, timestamps, self.now if self.now is not None
                     else now, types=types, user_features=self.user_features)


class ScoreRequest(HistoryRequest):
    candidates: list[ItemId] = Field(..., min_length=1, max_length=MAX_HISTORY)

    def query(self) -> Query:
        return Query(self.history, 0, False, (), self.timestamps, self.now, candidates=self.candidates,
                     types=self.types, user_features=self.user_features)


class ScoredItem(BaseModel):
    item_id: ItemId
    score: Optional[float] = None
    title: Optional[str] = None


class RecommendResponse(BaseModel):
    items: list[ScoredItem]
    unknown_items: list[ItemId]
    model: str
    fallback: Optional[str] = Field(None, description='"popularity" when no history item was known')
    form: str = Field("history", description='"history" (sent with the request) or "user_id" (the stored events)')
    history_events: Optional[int] = Field(None, description="user_id form: how many stored events were read "
                                                            "(0: an unknown user, answered as an empty history)")


class ScoreResponse(BaseModel):
    scores: list[Optional[float]]
    unknown_items: list[ItemId]
    model: str


# ---------------------------------------------------------------- the ASGI app
def make_api() -> FastAPI:
    """A FastAPI app with raysrec's 422 format (routes are added by whoever serves it)."""
    api = FastAPI(title="raysrec", description="Sequential recommendations from a raysrec checkpoint.")
    api.add_exception_handler(RequestValidationError, bad_request)
    return api


async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
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


def finite(value: Any) -> Any:
    """JSON cannot carry NaN/inf: replace them by ``None`` in metadata."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


# ---------------------------------------------------------------- the request path
# A request is parsed and validated in one pass by pydantic-core (``model_validate_json``: no ``json.loads``
# then a second walk), and the answer is written by orjson straight from the Recommender's dicts, which already
# have the response models' shape: no response-model validation or ``jsonable_encoder`` per request. The models
# above still define the contract, the OpenAPI schema and every 422 (same messages, ``body.`` locations).
M = TypeVar("M", bound=BaseModel)


async def parse(request: Request, model: type[M]) -> M:
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def request_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` documenting a body that the route reads itself with :func:`parse`."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema(
        ref_template="#/components/schemas/{model}")}}}}


def json_response(content: dict[str, Any]) -> Response:
    return Response(orjson.dumps(content), media_type="application/json")


def recommend_response(answer: Answer, version: str, history_events: Optional[int] = None) -> Response:
    """``history_events`` is given for the user_id form (the stored history's length)."""
    body = {"items": answer.items, "unknown_items": answer.unknown_items, "model": version,
            "fallback": answer.fallback, "form": "history" if history_events is None else "user_id"}
    if history_events is not None:
        body["history_events"] = history_events
    return json_response(body)


def error_response(status: int, message: str, headers: Optional[dict[str, str]] = None) -> Response:
    return Response(orjson.dumps({"error": message}), status_code=status, media_type="application/json",
                    headers=headers)


def score_response(answer: Answer, version: str) -> Response:
    return json_response({"scores": answer.scores or [], "unknown_items": answer.unknown_items, "model": version})


class MicroBatcher:
    """Micro-batching on an asyncio loop, for an app without Serve's ``@serve.batch``: callers ``await
    batcher(query)``; one batch at a time collects up to ``max_batch_size`` queries, waiting at most
    ``batch_wait_timeout_s`` after the first for more, and runs ``fn(queries)`` on ``executor`` (the loop
    keeps accepting requests meanwhile)."""

    def __init__(self, fn: Callable[[list[Query]], Sequence[Answer]], executor: Executor, max_batch_size: int,
                 batch_wait_timeout_s: float) -> None:
        self.fn, self.executor = fn, executor
        self.max_batch_size, self.wait = max_batch_size, batch_wait_timeout_s
        self.queue: Optional[asyncio.Queue] = None
        self.task: Optional[asyncio.Task] = None

    async def __call__(self, query: Query) -> Answer:
        loop = asyncio.get_running_loop()
        if self.task is None:
            self.queue = asyncio.Queue()
            self.task = loop.create_task(self._run())
        future = loop.create_future()
        self.queue.put_nowait((query, future))
        return await future

    def _drain(self, batch: list) -> None:
        while len(batch) < self.max_batch_size and not self.queue.empty():
            batch.append(self.queue.get_nowait())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = time.monotonic() + self.wait
            self._drain(batch)
            while len(batch) < self.max_batch_size and time.monotonic() < deadline:
                await asyncio.sleep(min(deadline - time.monotonic(), 0.0005))
                self._drain(batch)
            try:
                answers = await loop.run_in_executor(self.executor, self.fn, [q for q, _ in batch])
            except Exception as exc:   # noqa: BLE001  (every caller of the batch gets the error)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), answer in zip(batch, answers):
                if not future.done():
                    future.set_result(answer)

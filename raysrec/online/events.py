"""Live events: the live-state config, what one event is, and how a batch of them is checked (pure Python).

An event is what ``POST /events`` carries: ``event_id`` (the client's idempotency key), ``user_id``,
``item_id``, ``type`` and an optional Unix ``timestamp``. :func:`check_events` turns a request's raw dicts
into :class:`Event` objects or refuses the whole batch with an :class:`EventError` that names the event's
index and field: nothing of a batch with one bad event is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any, Optional, Union

from raysrec.config import Config, check, option
from raysrec.errors import RaysrecError

ItemId = Union[int, str]
DEFAULT_TYPES = ["view", "click", "cart", "fav", "buy", "like"]
MAX_EVENT_ID = 128        # characters of an event id
MAX_ID = 256              # characters of a user or item id given as a string
MAX_INT_ID = 2**63 - 1    # ids given as integers fit a signed 64-bit column


@dataclasses.dataclass
class StoreConfig(Config):
    """The live state: where per-user events are kept, the limits of ``POST /events``, and the event log.

    ``url``: ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` or a plain path (one host, every
    replica on it shares the file), ``redis://host:6379/0`` (clusters), or ``none`` (a stateless endpoint:
    ``/recommend`` by ``history`` only).
    """

    url: str = option("sqlite:///raysrec-state/events.db",
                      "live state: sqlite:///FILE (one host), redis://HOST:PORT/DB (clusters), or none")
    max_history: int = option(200, "events kept per user in the hot state (the event log keeps every event)")
    event_types: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_TYPES))
    default_type: str = "view"
    max_events_per_request: int = 1000
    max_pending_requests: int = option(32, "POST /events waiting for the store per replica; beyond: 429")
    max_future_s: float = 86_400.0       # a timestamp further ahead of the server's clock is refused
    event_log: Optional[str] = option(None, "where acknowledged events are exported: Parquet by day, a path or URI")
    flush_interval_s: float = option(60.0, "how often a replica exports new events to the event log")
    export_batch: int = option(50_000, "events per export step (one Parquet file per day it touches)")
    export_lease_s: float = option(30.0, "an exporter's lease, renewed every export step: a killed exporter holds "
                                         "the others off this long")
    key_prefix: str = option("raysrec", "Redis keys start with it: several apps can share one server")

    def validate(self) -> None:
        check(self.url != "", "store.url: a sqlite:// or redis:// URL, a path, or none")
        check(self.max_history >= 1, "store.max_history must be >= 1")
        check(len(self.event_types) >= 1 and all(t and t.isprintable() and len(t) <= 32 for t in self.event_types),
              "store.event_types: one or more printable names of at most 32 characters")
        check(self.default_type in self.event_types,
              f"store.default_type {self.default_type!r} must be one of store.event_types {self.event_types}")
        check(1 <= self.max_events_per_request <= 100_000, "store.max_events_per_request must be in [1, 100000]")
        check(self.max_pending_requests >= 1, "store.max_pending_requests must be >= 1")
        check(self.max_future_s >= 0, "store.max_future_s must be >= 0")
        check(self.flush_interval_s > 0, "store.flush_interval_s must be > 0")
        check(self.export_batch >= 1, "store.export_batch must be >= 1")
        check(self.export_lease_s > 0, "store.export_lease_s must be > 0")

    @property
    def enabled(self) -> bool:
        return self.url.lower() != "none"

    def absolute(self) -> StoreConfig:
        """This config with a SQLite file and a local event log as absolute paths (resolved where it is called:
        the driver; Serve replicas and Ray workers do not share its working directory)."""
        from pathlib import Path  # noqa: PLC0415

        from raysrec.online.store import absolute  # noqa: PLC0415

        log = self.event_log
        if log and "://" not in log:
            log = str(Path(log).resolve())
        return self.replace(url=absolute(self.url), event_log=log)


@dataclasses.dataclass(frozen=True)
class Event:
    """One checked event. ``timestamp`` is the client's, or the server's arrival time when it sent none
    (``given_time`` False); the fingerprint covers what the client sent, so a retry without a timestamp is
    a duplicate, not a conflict."""

    event_id: str
    user_id: str              # user ids are keys: 42 and "42" are one user
    item_id: ItemId           # item ids keep their JSON type, as /recommend's history does
    type: str
    timestamp: float
    given_time: bool = True

    @property
    def fingerprint(self) -> str:
        sent = [self.user_id, self.item_id, self.type, self.timestamp if self.given_time else None]
        return hashlib.blake2b(json.dumps(sent, separators=(",", ":")).encode(), digest_size=12).hexdigest()


@dataclasses.dataclass(frozen=True)
class StoredEvent:
    """An event as the store keeps it: ``seq`` is its place in arrival order (store-wide, increasing)."""

    seq: int
    event_id: str
    user_id: str
    item_id: ItemId
    type: str
    timestamp: float
    arrival: float

    def public(self) -> dict[str, Any]:
        """What ``GET /users/{id}/history`` shows of it."""
        return {"event_id": self.event_id, "item_id": self.item_id, "type": self.type, "timestamp": self.timestamp}


@dataclasses.dataclass(frozen=True)
class AppendResult:
    accepted: int
    duplicates: int


class EventError(RaysrecError):
    """A refused event: its index in the request and the field at fault (HTTP 422)."""

    def __init__(self, index: int, field: str, message: str) -> None:
        self.index, self.field = index, field
        super().__init__(f"events.{index}.{field}: {message}")


class EventConflict(RaysrecError):
    """An ``event_id`` already stored with another payload (HTTP 409); nothing of the batch was written."""

    def __init__(self, index: int, event_id: str) -> None:
        self.index, self.event_id = index, event_id
        super().__init__(f"events.{index}.event_id: {event_id!r} was already stored with another payload")


class StoreUnavailable(RaysrecError):
    """The store could not be reached or did not confirm the write in time (HTTP 503: the client retries)."""


def _check_id(value: Any, index: int, field: str) -> ItemId:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise EventError(index, field, f"expected a string or an integer, got {type(value).__name__}")
    if isinstance(value, int):
        if not 0 <= value <= MAX_INT_ID:
            raise EventError(index, field, f"integer ids must be in [0, 2^63-1], got {value}")
        return value
    if not value or len(value) > MAX_ID:
        raise EventError(index, field, f"expected 1 to {MAX_ID} characters, got {len(value)}")
    if not value.isprintable():
        raise EventError(index, field, "control characters are not allowed in ids")
    return value


def user_key(user_id: ItemId) -> str:
    """The store's key of a user: its id as a string (``42`` and ``"42"`` are one user)."""
    return str(user_id)


def check_events(raw: Sequence[Any], cfg: StoreConfig, now: float) -> list[Event]:
    """Check a request's events; any bad one refuses the whole batch (:class:`EventError`)."""
    if len(raw) > cfg.max_events_per_request:
        raise EventError(cfg.max_events_per_request, "", f"at most {cfg.max_events_per_request} events per request, "
                                                        f"got {len(raw)}")
    events = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise EventError(index, "", f"expected an object, got {type(item).__name__}")
        unknown = sorted(set(item) - {"event_id", "user_id", "item_id", "type", "timestamp"})
        if unknown:
            raise EventError(index, unknown[0], "unknown field; expected event_id, user_id, item_id, type, timestamp")
        for field in ("event_id", "user_id", "item_id"):
            if field not in item or item[field] is None:
                raise EventError(index, field, "required")
        event_id = item["event_id"]
        if not isinstance(event_id, str) or not 1 <= len(event_id) <= MAX_EVENT_ID or not event_id.isprintable():
            raise EventError(index, "event_id", f"expected a string of 1 to {MAX_EVENT_ID} printable characters")
        user = _check_id(item["user_id"], index, "user_id")
        item_id = _check_id(item["item_id"], index, "item_id")
        kind = item.get("type")
        if kind is None:
            kind = cfg.default_type
        elif not isinstance(kind, str) or kind not in cfg.event_types:
            raise EventError(index, "type", f"expected one of {cfg.event_types}, got {kind!r}")
        stamp = item.get("timestamp")
        given = stamp is not None
        if not given:
            stamp = now
        elif isinstance(stamp, bool) or not isinstance(stamp, (int, float)) or not math.isfinite(stamp):
            raise EventError(index, "timestamp", f"expected finite Unix seconds, got {stamp!r}")
        elif stamp < 0:
            raise EventError(index, "timestamp", f"expected Unix seconds >= 0, got {stamp}")
        elif stamp > now + cfg.max_future_s:
            raise EventError(index, "timestamp", f"{stamp} is more than {cfg.max_future_s:g} s ahead of the "
                                                 f"server's clock ({now:.0f})")
        events.append(Event(event_id, user_key(user), item_id, kind, float(stamp), given))
    return events

"""The live-state store's interface (pure: no Ray, no HTTP) and :func:`open_store`.

A store is the record of what ``POST /events`` acknowledged: ``append`` returns only once the batch is
durable, and is all-or-nothing. Every event gets a store-wide ``seq`` (arrival order), which the event-log
export (:mod:`raysrec.online.log`) uses as its resumable cursor. Histories are ordered by
``(timestamp, seq)``, so a late event falls into place.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from raysrec.errors import ConfigError
from raysrec.online.events import AppendResult, Event, EventConflict, StoreConfig, StoredEvent


class EventStore(abc.ABC):
    """Per-user event histories, keyed by user id, plus the store-wide arrival order for export."""

    max_history: int

    @abc.abstractmethod
    def append(self, events: Sequence[Event], arrival: float) -> AppendResult:
        """Store a batch atomically and durably. A repeated ``event_id`` with the same fingerprint is counted as a
        duplicate and stored once; with another fingerprint the whole batch is refused (``EventConflict``)."""

    @abc.abstractmethod
    def histories(self, user_ids: Sequence[str]) -> dict[str, list[StoredEvent]]:
        """The newest ``max_history`` events of each user, oldest first (``(timestamp, seq)`` order)."""

    @abc.abstractmethod
    def forget(self, user_id: str) -> int:
        """Delete a user's events (hot state and not-yet-exported log records); returns how many."""

    @abc.abstractmethod
    def events_after(self, seq: int, limit: int, until: Optional[int] = None) -> list[StoredEvent]:
        """Events with ``seq`` in ``(seq, until]`` in seq order, at most ``limit``: what the export reads."""

    @abc.abstractmethod
    def last_seq(self) -> int:
        """The newest event's seq (0 when empty)."""

    @abc.abstractmethod
    def lease(self, name: str, owner: str, ttl_s: float) -> bool:
        """Take or renew a named lease for ``ttl_s`` seconds; False while another owner holds it (one exporter)."""

    @abc.abstractmethod
    def release(self, name: str, owner: str) -> None:
        """Give a lease back early (only the owner's)."""

    def exported(self, seq: int) -> None:
        """The event log holds every event up to ``seq`` (a store may free what it kept only for the export)."""
        return None

    def close(self) -> None:
        """Release connections."""
        return None

    def history(self, user_id: str) -> list[StoredEvent]:
        return self.histories([user_id])[user_id]

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def duplicates_within(events: Sequence[Event]) -> tuple[list[int], dict[str, int]]:
    """Indices of the first occurrence of each ``event_id`` in a batch; a later repeat with another fingerprint
    raises ``EventConflict`` (the store checks the ids it already holds)."""
    first: dict[str, int] = {}
    keep: list[int] = []
    for i, e in enumerate(events):
        j = first.get(e.event_id)
        if j is None:
            first[e.event_id] = i
            keep.append(i)
        elif events[j].fingerprint != e.fingerprint:
            raise EventConflict(i, e.event_id)
    return keep, first


def sqlite_path(url: str) -> Path:
    """``sqlite:///rel.db`` -> rel.db, ``sqlite:////abs.db`` -> /abs.db (SQLAlchemy's convention), a path as is."""
    if url.startswith("sqlite://"):
        rest = url[len("sqlite://"):]
        if not rest.startswith("/") or rest == "/":
            raise ConfigError(f"store.url {url!r}: expected sqlite:///relative/file.db or sqlite:////absolute/file.db")
        return Path(rest[1:])
    return Path(url)


def absolute(url: str) -> str:
    """The URL with a SQLite file made absolute (replicas do not share the driver's working directory)."""
    if url.lower() == "none" or url.startswith(("redis://", "rediss://", "unix://")):
        return url
    return "sqlite:///" + str(sqlite_path(url).resolve())


def open_store(cfg: StoreConfig) -> EventStore:
    """The store a ``store.url`` names (``none`` has none: the caller checks ``cfg.enabled``)."""
    scheme = urlparse(cfg.url).scheme
    if scheme in ("redis", "rediss", "unix"):
        from raysrec.online.redis_store import RedisStore  # noqa: PLC0415

        return RedisStore(cfg.url, max_history=cfg.max_history, prefix=cfg.key_prefix)
    if scheme not in ("", "sqlite") and not (len(scheme) == 1 and cfg.url[1:3] == ":\\"):
        raise ConfigError(f"store.url {cfg.url!r}: expected sqlite:///FILE, redis://HOST:PORT/DB, a path, or none")
    from raysrec.online.sqlite_store import SqliteStore  # noqa: PLC0415

    return SqliteStore(sqlite_path(cfg.url), max_history=cfg.max_history)

"""The live-state side of a replica, without Ray: ``POST /events``, stored histories for ``/recommend``,
``GET /users/{id}/history``, ``DELETE /users/{id}``, and the scheduled event-log flush.

Each replica opens three connections to the store: one for writes (on the ingest thread: an append waits for
its fsync there), one for ``/recommend {"user_id"}`` (on the model thread: one read for all the user_id
requests of a model batch, right before its forward pass) and one for ``GET /users/{id}/history``, so a
write never holds up a read. ``POST /events`` answers only after ``append`` returned, that is after the
events are durable; when ``max_pending_requests`` appends already wait, it answers 429 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import orjson
from fastapi.responses import Response

from raysrec.config import redact
from raysrec.errors import ConfigError
from raysrec.online.events import EventConflict, EventError, StoreConfig, StoredEvent, StoreUnavailable, check_events
from raysrec.online.log import export_events
from raysrec.online.store import EventStore, open_store
from raysrec.serving.http import MicroBatcher, error_response, json_response

log = logging.getLogger(__name__)
FORGET_REMAINS = ("the event log keeps the events it had already exported (Parquet, until you delete those files), "
                  "and models trained on them keep what they learned until the next retrain without them")


class LiveState:
    """One replica's view of the store. ``known`` tells which item ids the model knows (for ``unknown_items``)."""

    def __init__(self, cfg: StoreConfig, known: Callable[[list[Any]], list[Any]]) -> None:
        self.cfg, self.known = cfg, known
        self.writer: EventStore = open_store(cfg)
        self.reader: EventStore = open_store(cfg)
        self.model_reader: EventStore = open_store(cfg)   # read by the model thread, one call per model batch
        self._write_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raysrec-ingest")
        self._read_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raysrec-history")
        self._reads = MicroBatcher(self._read_histories, self._read_pool, 256, 0.0)
        self.pending = 0
        self.owner = f"replica-{uuid.uuid4().hex[:12]}"
        self._stop = threading.Event()
        self._flusher: Optional[threading.Thread] = None
        if cfg.event_log:
            self._flusher = threading.Thread(target=self._flush_loop, name="raysrec-event-log", daemon=True)
            self._flusher.start()

    def describe(self) -> dict[str, Any]:
        out = {"url": redact(self.cfg.url), "kind": type(self.writer).__name__, "max_history": self.cfg.max_history,
               "event_types": self.cfg.event_types, "event_log": redact(self.cfg.event_log) if self.cfg.event_log else None}
        durability = getattr(self.writer, "durability", None)
        out["durability"] = durability or "SQLite WAL, synchronous=FULL"
        return out

    # ------------------------------------------------------------ POST /events
    async def ingest(self, body: bytes) -> Response:
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return error_response(422, f"body: invalid JSON ({exc})")
        if not isinstance(payload, dict) or not isinstance(payload.get("events"), list):
            return error_response(422, 'body: expected {"events": [...]}')
        extra = sorted(set(payload) - {"events"})
        if extra:
            return error_response(422, f"body.{extra[0]}: unknown field; expected events")
        now = time.time()
        try:
            events = check_events(payload["events"], self.cfg, now)
        except EventError as exc:
            return error_response(422, str(exc))
        if self.pending >= self.cfg.max_pending_requests:
            return error_response(429, f"ingest queue full ({self.pending} requests waiting for the store)",
                                  {"Retry-After": "1"})
        self.pending += 1
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._write_pool, self.writer.append,
                                                                      events, now)
        except EventConflict as exc:
            return error_response(409, str(exc))
        except StoreUnavailable as exc:
            return error_response(503, str(exc), {"Retry-After": "1"})
        finally:
            self.pending -= 1
        items = list(dict.fromkeys(e.item_id for e in events))
        return json_response({"accepted": result.accepted, "duplicates": result.duplicates,
                              "unknown_items": self.known(items)})

    # ------------------------------------------------------------ reads
    def _read_histories(self, users: list[str]) -> list[list[StoredEvent]]:
        found = self.reader.histories(users)
        return [found[u] for u in users]

    async def history(self, user_id: str) -> list[StoredEvent]:
        """The user's stored events, oldest first (micro-batched with concurrent reads)."""
        return await self._reads(user_id)

    async def history_response(self, user_id: str) -> Response:
        try:
            events = await self.history(user_id)
        except StoreUnavailable as exc:
            return error_response(503, str(exc), {"Retry-After": "1"})
        return json_response({"user_id": user_id, "events": [e.public() for e in events]})

    async def forget(self, user_id: str) -> Response:
        try:
            deleted = await asyncio.get_running_loop().run_in_executor(self._write_pool, self.writer.forget, user_id)
        except StoreUnavailable as exc:
            return error_response(503, str(exc), {"Retry-After": "1"})
        return json_response({"user_id": user_id, "deleted": deleted, "remains": FORGET_REMAINS})

    # ------------------------------------------------------------ the event log
    def flush(self, max_windows: Optional[int] = None) -> dict[str, Any]:
        """Export what the log lacks (one exporter at a time across replicas: a lease in the store)."""
        store = open_store(self.cfg)
        try:
            return export_events(store, self.cfg.event_log, batch=self.cfg.export_batch, owner=self.owner,
                                 lease_s=self.cfg.export_lease_s, max_windows=max_windows)
        finally:
            store.close()

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.cfg.flush_interval_s):
            try:
                self.flush(max_windows=100)
            except Exception as exc:  # noqa: BLE001  (the next round retries; the store still holds every event)
                log.warning("event-log flush to %s failed: %s", redact(self.cfg.event_log or ""), exc)

    def close(self, final_flush: bool = True) -> None:
        """Stop the schedule, export what is left (at shutdown), close the connections."""
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join(timeout=30)
            if final_flush:
                try:
                    self.flush()
                except Exception as exc:  # noqa: BLE001
                    log.warning("final event-log flush failed (the store keeps the events): %s", exc)
        self._write_pool.shutdown(wait=True)
        self._read_pool.shutdown(wait=True)
        self.writer.close()
        self.reader.close()
        self.model_reader.close()


def check_store(cfg: StoreConfig) -> None:
    """Open and close the store once, so a wrong URL fails at ``raysrec serve`` in one line, not in a replica."""
    if not cfg.enabled:
        return
    try:
        open_store(cfg).close()
    except StoreUnavailable as exc:
        raise ConfigError(f"store.url: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"store.url {redact(cfg.url)}: {exc}") from None

"""``raysrec events ingest``: replay an interaction log through ``POST /events``, in time order.

It reads any layout ``raysrec prepare`` reads (the same readers), sorts by (timestamp, line), and posts
batches at an optional rate. Each row's ``event_id`` is derived from the file and its row number, so running
the replay again (after a crash, or to be sure) stores nothing twice: the server counts the repeats as
duplicates. Answers 429 and 503 (and lost connections) are retried with the same ids after a pause; any other
4xx stops the replay with the server's message, since retrying a refused batch cannot help.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import time
from collections.abc import Callable
from typing import Any, Optional
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysrec.config import Config, check, option
from raysrec.data.sources import DropReason, SourceConfig, plan_splits, read_split, resolve_source
from raysrec.errors import RaysrecError


@dataclasses.dataclass
class ReplayConfig(Config):
    """What ``raysrec events ingest`` replays, where to, and how fast."""

    source: SourceConfig = dataclasses.field(default_factory=SourceConfig)
    url: str = option("http://127.0.0.1:8000", "the endpoint (its POST /events)")
    rate: float = option(0.0, "events per second at most (0: as fast as the server answers)")
    batch_size: int = option(100, "events per request")
    type: str = option("view", "the event type of a row without one (every row, unless --type-col names a column)")
    limit: int = option(0, "replay only the first N events in time order (0: all)")
    retry_seconds: float = option(120.0, "give up when the server refuses (429/503) or is unreachable this long")

    def validate(self) -> None:
        check(self.rate >= 0, "events.rate must be >= 0")
        check(1 <= self.batch_size <= 100_000, "events.batch_size must be in [1, 100000]")
        check(self.limit >= 0, "events.limit must be >= 0")
        check(urlparse(self.url).scheme in ("http", "https"), f"events.url {self.url!r}: expected http://HOST:PORT")


class ReplayError(RaysrecError):
    """The server refused a batch (a 4xx other than 429), or stayed unreachable."""


def read_events(cfg: ReplayConfig) -> tuple[pa.Table, dict[str, int], set[str]]:
    """Every row of the log in (timestamp, row) order, the rows left out by reason, and which of its id columns
    (``user``, ``item``) are integers read as strings (``prepare`` makes such ids integers, column by column)."""
    source = resolve_source(cfg.source)
    tables = [read_split(source, split) for split in plan_splits(source)]
    table = pa.concat_tables(tables) if tables else pa.table({})
    codes = table.column("drop_code").to_numpy()
    dropped = {DropReason(int(c)).label: int(n) for c, n in zip(*np.unique(codes[codes != 0], return_counts=True))}
    table = table.filter(pa.array(codes == 0))
    keys = [("timestamp", "ascending"), ("ord", "ascending")] if source.has_timestamp else [("ord", "ascending")]
    table = table.sort_by(keys)
    if cfg.limit:
        table = table.slice(0, cfg.limit)
    as_ints = {c for c in ("user", "item") if source.id_auto and
               pc.all(pc.match_substring_regex(table.column(c), r"^[0-9]{1,18}$")).as_py() is not False}
    return table, dropped, as_ints


def _id_prefix(cfg: ReplayConfig) -> str:
    return hashlib.blake2b(str(cfg.source.path).encode(), digest_size=6).hexdigest()


class Client:
    """One keep-alive HTTP connection to the endpoint."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        parsed = urlparse(url)
        cls = http.client.HTTPSConnection if parsed.scheme == "https" else http.client.HTTPConnection
        self.prefix = parsed.path.rstrip("/")
        self._connect = lambda: cls(parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80),
                                    timeout=timeout)
        self.conn = self._connect()

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        data = json.dumps(body).encode()
        try:
            self.conn.request("POST", self.prefix + path, body=data, headers={"content-type": "application/json"})
            response = self.conn.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = self._connect()
            raise
        try:
            parsed = json.loads(payload) if payload else {}
        except json.JSONDecodeError:
            parsed = {"error": payload[:200].decode("utf-8", "replace")}
        return response.status, parsed, {k.lower(): v for k, v in response.getheaders()}

    def close(self) -> None:
        self.conn.close()


def replay(cfg: ReplayConfig, progress: Optional[Callable[[int, int], None]] = None) -> dict[str, Any]:
    """Post the log; returns counts (accepted, duplicates, unknown items, rows left out) and the rate reached."""
    table, dropped, as_ints = read_events(cfg)
    n = table.num_rows
    users = table.column("user").to_pylist()
    items = table.column("item").to_pylist()
    if "user" in as_ints:    # ids read as strings and all integers: sent as integers, as prepare keeps them
        users = [int(u) for u in users]
    if "item" in as_ints:
        items = [int(i) for i in items]
    stamps = table.column("timestamp").to_pylist() if "timestamp" in table.column_names else [None] * n
    ords = table.column("ord").to_pylist()
    kinds = [k or cfg.type for k in table.column("type").to_pylist()]
    prefix = _id_prefix(cfg)
    client = Client(cfg.url)
    totals = {"events": n, "accepted": 0, "duplicates": 0, "retries": 0}
    unknown: set[Any] = set()
    started = time.monotonic()
    try:
        for start in range(0, n, cfg.batch_size):
            if cfg.rate:
                ahead = start / cfg.rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
            batch = []
            for r in range(start, min(start + cfg.batch_size, n)):
                event = {"event_id": f"{prefix}:{ords[r]}", "user_id": users[r], "item_id": items[r], "type": kinds[r]}
                if stamps[r] is not None:
                    event["timestamp"] = stamps[r]
                batch.append(event)
            body = _post_until_taken(client, batch, cfg, totals)
            totals["accepted"] += body["accepted"]
            totals["duplicates"] += body["duplicates"]
            unknown.update(body.get("unknown_items", []))
            if progress is not None:
                progress(min(start + cfg.batch_size, n), n)
    finally:
        client.close()
    seconds = time.monotonic() - started
    totals.pop("answered", None)
    return {**totals, "unknown_items": len(unknown), "rows_left_out": dropped, "seconds": round(seconds, 2),
            "events_per_second": round(n / seconds, 1) if seconds > 0 else None}


def _post_until_taken(client: Client, batch: list[dict[str, Any]], cfg: ReplayConfig, totals: dict[str, int]
                      ) -> dict[str, Any]:
    deadline = time.monotonic() + cfg.retry_seconds
    pause = 0.2
    while True:
        try:
            status, body, headers = client.post("/events", {"events": batch})
        except (OSError, http.client.HTTPException) as exc:
            status, body, headers = 0, {"error": str(exc)}, {}
        if status == 200:
            totals["answered"] = 1
            return body
        if status == 0 and not totals.get("answered"):   # nothing ever answered: a wrong URL, not a busy server
            raise ReplayError(f"no server answers at {cfg.url} ({body['error']}); start one with `raysrec serve`")
        if status not in (0, 429, 502, 503, 504):
            first = batch[0]["event_id"]
            raise ReplayError(f"{cfg.url}/events refused the batch starting at event {first} with {status}: "
                              f"{body.get('error', body)}")
        if time.monotonic() > deadline:
            raise ReplayError(f"{cfg.url}/events: no answer taking the batch for {cfg.retry_seconds:g} s "
                              f"(last: {status or 'no connection'} {body.get('error', '')})")
        totals["retries"] += 1
        wait = float(headers.get("retry-after", pause)) if status else pause
        time.sleep(min(wait, 5.0))
        pause = min(pause * 2, 5.0)


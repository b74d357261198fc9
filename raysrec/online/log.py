"""The event log: every acknowledged event, exported from the store to Parquet files partitioned by day.

Layout (a local folder or any pyarrow URI, e.g. ``s3://bucket/events``)::

    LOG/day=2026-12-01/part-00000000000000000001.parquet   # user_id, item_id, type, timestamp, event_id, seq, arrival
    LOG/_export_cursor.json                               # {"last_seq": N}: every event up to N is in the log

``raysrec prepare --input LOG`` reads it as it is (``user_id``, ``item_id``, ``timestamp``, ``type``).

The export is resumable: it works in windows of seq numbers ``(cursor, cursor + batch]``, writes one file
per day the window touches, named by the window's first seq, and only then moves the cursor. A run killed
half-way leaves the cursor where it was; the next run reads the same window again (possibly with more
events, never fewer) and overwrites the same files, so no event is skipped and none is written twice.
Only one exporter runs at a time (a lease in the store), so replicas can all flush on a schedule.
"""

from __future__ import annotations

import datetime
import json
import time
import uuid
from collections import defaultdict
from typing import Any, Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raysrec.files import filesystem
from raysrec.online.events import StoredEvent
from raysrec.online.store import EventStore

CURSOR = "_export_cursor.json"
LEASE = "event-log-export"
SCHEMA = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("type", pa.string()),
                    ("timestamp", pa.float64()), ("event_id", pa.string()), ("seq", pa.int64()),
                    ("arrival", pa.float64())])


def day_of(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d")


def _write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Atomically where the filesystem can rename (local: temp file, then rename); object stores put whole."""
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as out:
            out.write(data)


def read_cursor(log: str) -> int:
    fs, root = filesystem(log)
    try:
        with fs.open_input_stream(f"{root}/{CURSOR}") as handle:
            return int(json.loads(handle.read())["last_seq"])
    except FileNotFoundError:
        return 0


def table_of(events: list[StoredEvent]) -> pa.Table:
    return pa.table({"user_id": [e.user_id for e in events], "item_id": [str(e.item_id) for e in events],
                     "type": [e.type for e in events], "timestamp": [e.timestamp for e in events],
                     "event_id": [e.event_id for e in events], "seq": [e.seq for e in events],
                     "arrival": [e.arrival for e in events]}, schema=SCHEMA)


def export_events(store: EventStore, log: str, batch: int = 50_000, owner: Optional[str] = None,
                  lease_s: float = 30.0, max_windows: Optional[int] = None, progress=None) -> dict[str, Any]:
    """Export every event the store acknowledged after the log's cursor; returns what was done.

    ``{"exported": n, "files": f, "last_seq": cursor, "skipped": "..."}``; skipped says why nothing ran (another
    exporter holds the lease). ``max_windows`` stops early (a scheduled flush does a bounded amount of work)."""
    owner = owner or uuid.uuid4().hex
    if not store.lease(LEASE, owner, lease_s):
        return {"exported": 0, "files": 0, "last_seq": read_cursor(log), "skipped": "another exporter holds the lease"}
    fs, root = filesystem(log)
    fs.create_dir(root, recursive=True)
    started, exported, files, windows = time.time(), 0, 0, 0
    try:
        cursor = read_cursor(log)
        while max_windows is None or windows < max_windows:
            newest = store.last_seq()            # every seq up to it is final (committed, or never will be)
            if newest <= cursor:
                break
            end = min(cursor + batch, newest)
            events = store.events_after(cursor, limit=batch, until=end)
            by_day: dict[str, list[StoredEvent]] = defaultdict(list)
            for e in events:
                by_day[day_of(e.timestamp)].append(e)
            for day, rows in sorted(by_day.items()):
                fs.create_dir(f"{root}/day={day}", recursive=True)
                sink = pa.BufferOutputStream()
                pq.write_table(table_of(rows), sink, compression="zstd")
                _write_bytes(fs, f"{root}/day={day}/part-{cursor + 1:020d}.parquet", sink.getvalue().to_pybytes())
                files += 1
            _write_bytes(fs, f"{root}/{CURSOR}", json.dumps({"last_seq": end, "time": time.time()}).encode())
            store.exported(end)
            exported += len(events)
            cursor, windows = end, windows + 1
            if progress is not None:
                progress(exported, newest)
            if not store.lease(LEASE, owner, lease_s):       # renew; lost (expired and taken): stop here
                break
    finally:
        store.release(LEASE, owner)
    return {"exported": exported, "files": files, "last_seq": cursor, "seconds": round(time.time() - started, 3)}


def read_log(log: str) -> pa.Table:
    """Every event in a log folder (all days), in seq order: for tests, checks and small logs."""
    fs, root = filesystem(log)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    paths = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                   and "/day=" in i.path)
    if not paths:
        return SCHEMA.empty_table()
    tables = [pq.read_table(p, filesystem=fs, schema=SCHEMA) for p in paths]
    return pa.concat_tables(tables).sort_by("seq")

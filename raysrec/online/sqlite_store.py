"""The one-host store: one SQLite file (stdlib) in WAL mode with ``synchronous=FULL``.

Every replica on the host opens the same file. A write transaction (``BEGIN IMMEDIATE``) takes the file's
write lock, so appends from all replicas are serialised, ``seq`` (the rowid) grows in commit order, and
a commit is on disk (WAL fsynced) before ``append`` returns: an acknowledged event survives a crash of any
process, and of the host. Readers never block the writer (WAL). The table keeps every event: it is also
the source the event-log export reads; ``max_history`` caps what a history read returns.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from raysrec.online.events import AppendResult, Event, EventConflict, StoredEvent
from raysrec.online.store import EventStore, duplicates_within

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    fingerprint TEXT NOT NULL,
    user_id TEXT NOT NULL,
    item_id,                      -- no type affinity: an integer id stays an integer, a string a string
    type TEXT NOT NULL,
    timestamp REAL NOT NULL,
    arrival REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_user ON events (user_id, timestamp, seq);
CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL);
"""
COLUMNS = "seq, event_id, user_id, item_id, type, timestamp, arrival"
CHUNK = 500        # ids per IN (...) lookup


class SqliteStore(EventStore):
    def __init__(self, path: str | Path, max_history: int = 200, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.max_history = max_history
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # autocommit mode (isolation_level None): transactions are explicit BEGIN IMMEDIATE ... COMMIT
        self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()     # one connection, used by one thread at a time
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    def append(self, events: Sequence[Event], arrival: float) -> AppendResult:
        keep, _ = duplicates_within(events)
        unique = [events[i] for i in keep]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                stored: dict[str, str] = {}
                for start in range(0, len(unique), CHUNK):
                    ids = [e.event_id for e in unique[start:start + CHUNK]]
                    rows = self._db.execute(f"SELECT event_id, fingerprint FROM events WHERE event_id IN "
                                            f"({','.join('?' * len(ids))})", ids).fetchall()
                    stored.update(rows)
                new = []
                for i in keep:
                    e = events[i]
                    fingerprint = e.fingerprint
                    if e.event_id in stored:
                        if stored[e.event_id] != fingerprint:
                            raise EventConflict(i, e.event_id)
                    else:
                        new.append((e.event_id, fingerprint, e.user_id, e.item_id, e.type, e.timestamp, arrival))
                self._db.executemany("INSERT INTO events (event_id, fingerprint, user_id, item_id, type, timestamp, "
                                     "arrival) VALUES (?, ?, ?, ?, ?, ?, ?)", new)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return AppendResult(accepted=len(new), duplicates=len(events) - len(new))

    def histories(self, user_ids: Sequence[str]) -> dict[str, list[StoredEvent]]:
        out: dict[str, list[StoredEvent]] = {}
        with self._lock:
            self._db.execute("BEGIN")          # one snapshot for every user of the call
            try:
                for user in dict.fromkeys(user_ids):
                    rows = self._db.execute(f"SELECT {COLUMNS} FROM events WHERE user_id = ? "
                                            "ORDER BY timestamp DESC, seq DESC LIMIT ?",
                                            (user, self.max_history)).fetchall()
                    out[user] = [StoredEvent(*r) for r in reversed(rows)]
            finally:
                self._db.execute("COMMIT")
        return out

    def forget(self, user_id: str) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM events WHERE user_id = ?", (user_id,)).rowcount

    def events_after(self, seq: int, limit: int, until: Optional[int] = None) -> list[StoredEvent]:
        with self._lock:
            rows = self._db.execute(f"SELECT {COLUMNS} FROM events WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                                    (seq, until if until is not None else 2**63 - 1, limit)).fetchall()
        return [StoredEvent(*r) for r in rows]

    def last_seq(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])

    def lease(self, name: str, owner: str, ttl_s: float) -> bool:
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT owner, expires FROM leases WHERE name = ?", (name,)).fetchone()
                free = row is None or row[0] == owner or row[1] < now
                if free:
                    self._db.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?)", (name, owner, now + ttl_s))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return free

    def release(self, name: str, owner: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner))

    def close(self) -> None:
        with self._lock:
            self._db.close()

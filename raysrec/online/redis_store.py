"""The cluster store: a Redis primary (redis-py), shared by every replica on every node.

Keys, under ``prefix`` (several apps can share one server):

* ``P:h:USER``: the user's hot history, a sorted set capped at ``max_history`` (score: timestamp; member:
  the zero-padded seq, then the event as JSON, so equal timestamps sort by arrival);
* ``P:log``: a stream of every acknowledged event not yet exported (entry id ``SEQ-1``), trimmed by the
  event-log export once the events are in the log;
* ``P:id:EVENT_ID``: ``SEQ:FINGERPRINT`` for idempotency, kept ``dedupe_ttl_s`` (default 7 days);
* ``P:seq``: the arrival counter; ``P:lease:NAME``: the exporter's lease.

An append is one Lua script, so it is atomic (all of a batch or nothing) and its seqs are in commit order.
Durability is the server's: run it with ``appendonly yes`` and ``appendfsync always`` (Redis answers a write
only after it is fsynced to the AOF), or on Redis >= 7.2 with ``appendfsync everysec``: this store then
sends ``WAITAOF 1 0`` after each append and acknowledges only once the AOF has it on disk. Redis Cluster is
not supported (a batch touches many users' keys); use one primary with replicas / Sentinel.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any, Optional

from raysrec.config import redact
from raysrec.online.events import AppendResult, Event, EventConflict, StoredEvent, StoreUnavailable
from raysrec.online.store import EventStore, duplicates_within

log = logging.getLogger(__name__)

APPEND = """
local p, maxh, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local n = (#ARGV - 3) / 5
for i = 0, n - 1 do
  local b = 4 + i * 5
  local cur = redis.call('GET', p .. ':id:' .. ARGV[b])
  if cur and string.sub(cur, string.find(cur, ':', 1, true) + 1) ~= ARGV[b + 1] then return {-1, i} end
end
local accepted = 0
for i = 0, n - 1 do
  local b = 4 + i * 5
  local key = p .. ':id:' .. ARGV[b]
  if redis.call('EXISTS', key) == 0 then
    local seq = redis.call('INCR', p .. ':seq')
    redis.call('SET', key, seq .. ':' .. ARGV[b + 1], 'EX', ttl)
    local h = p .. ':h:' .. ARGV[b + 2]
    redis.call('ZADD', h, ARGV[b + 3], string.format('%020d', seq) .. '|' .. ARGV[b + 4])
    local size = redis.call('ZCARD', h)
    if size > maxh then redis.call('ZREMRANGEBYRANK', h, 0, size - maxh - 1) end
    redis.call('XADD', p .. ':log', seq .. '-1', 'r', ARGV[b + 4])
    accepted = accepted + 1
  end
end
return {accepted, n - accepted}
"""
RENEW = """
local cur = redis.call('GET', KEYS[1])
if cur == false then return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) and 1 or 0 end
if cur == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""
RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class RedisStore(EventStore):
    def __init__(self, url: str, max_history: int = 200, prefix: str = "raysrec", dedupe_ttl_s: int = 7 * 86400,
                 timeout_s: float = 10.0) -> None:
        import redis  # noqa: PLC0415  (raysrec[redis])

        self.max_history, self.prefix, self.dedupe_ttl_s = max_history, prefix, dedupe_ttl_s
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           decode_responses=True)
        self._errors = (redis.ConnectionError, redis.TimeoutError)
        try:
            info = self._redis.info("server")
            config = self._redis.config_get("append*")
        except self._errors as exc:
            raise StoreUnavailable(f"cannot reach Redis at {redact(url)}: {exc}") from None
        version = tuple(int(x) for x in str(info["redis_version"]).split(".")[:2])
        self.waitaof = version >= (7, 2)
        self.durability = f"appendonly {config.get('appendonly')}, appendfsync {config.get('appendfsync')}"
        if config.get("appendonly") != "yes" or (config.get("appendfsync") != "always" and not self.waitaof):
            log.warning("Redis at %s runs with %s: an acknowledged event can be lost if it crashes (run it with "
                        "appendonly yes and appendfsync always)", redact(url), self.durability)
        self._append = self._redis.register_script(APPEND)
        self._renew = self._redis.register_script(RENEW)
        self._release = self._redis.register_script(RELEASE)

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self.prefix!r})"

    def _call(self, fn, *args, **kwargs) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._errors as exc:
            raise StoreUnavailable(f"Redis: {exc}") from None

    def append(self, events: Sequence[Event], arrival: float) -> AppendResult:
        keep, _ = duplicates_within(events)
        argv: list[Any] = [self.prefix, self.max_history, self.dedupe_ttl_s]
        for i in keep:
            e = events[i]
            record = json.dumps([e.event_id, e.user_id, e.item_id, e.type, e.timestamp, arrival], separators=(",", ":"))
            argv += [e.event_id, e.fingerprint, e.user_id, repr(e.timestamp), record]
        accepted, other = self._call(self._append, args=argv)
        if accepted == -1:
            raise EventConflict(keep[other], events[keep[other]].event_id)
        if accepted and self.waitaof:
            local, _ = self._call(self._redis.execute_command, "WAITAOF", 1, 0, 10_000)
            if local < 1:
                raise StoreUnavailable("Redis did not fsync the append-only file within 10 s")
        return AppendResult(accepted=accepted, duplicates=len(events) - accepted)

    @staticmethod
    def _parse(seq: int, record: str) -> StoredEvent:
        event_id, user, item, kind, stamp, arrival = json.loads(record)
        return StoredEvent(seq, event_id, user, item, kind, stamp, arrival)

    def histories(self, user_ids: Sequence[str]) -> dict[str, list[StoredEvent]]:
        users = list(dict.fromkeys(user_ids))
        pipe = self._redis.pipeline(transaction=False)
        for user in users:
            pipe.zrange(f"{self.prefix}:h:{user}", -self.max_history, -1)
        replies = self._call(pipe.execute)
        return {u: [self._parse(int(m[:20]), m[21:]) for m in members] for u, members in zip(users, replies)}

    def forget(self, user_id: str) -> int:
        """Deletes the hot history, the user's entries of the not-yet-exported stream and their idempotency keys."""
        hot = f"{self.prefix}:h:{user_id}"
        members = self._call(self._redis.zrange, hot, 0, -1)
        doomed: dict[int, str] = {int(m[:20]): json.loads(m[21:])[0] for m in members}
        for e in self._scan_log(0, None):
            if e.user_id == user_id:
                doomed[e.seq] = e.event_id
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(hot)
        for seq, event_id in doomed.items():
            pipe.xdel(f"{self.prefix}:log", f"{seq}-1")
            pipe.delete(f"{self.prefix}:id:{event_id}")
        self._call(pipe.execute)
        return len(doomed)

    def _scan_log(self, after: int, limit: Optional[int], until: Optional[int] = None, page: int = 10_000
                  ) -> list[StoredEvent]:
        out: list[StoredEvent] = []
        start = f"({after}-1" if after > 0 else "-"
        end = f"{until}-1" if until is not None else "+"
        while limit is None or len(out) < limit:
            count = page if limit is None else min(page, limit - len(out))
            entries = self._call(self._redis.xrange, f"{self.prefix}:log", start, end, count=count)
            if not entries:
                break
            out += [self._parse(int(i.split("-")[0]), fields["r"]) for i, fields in entries]
            start = f"({entries[-1][0]}"
        return out

    def events_after(self, seq: int, limit: int, until: Optional[int] = None) -> list[StoredEvent]:
        return self._scan_log(seq, limit, until)

    def exported(self, seq: int) -> None:
        """The log holds every event up to ``seq``: drop them from the stream (the hot histories keep theirs)."""
        self._call(self._redis.xtrim, f"{self.prefix}:log", minid=f"{seq + 1}-0")

    def last_seq(self) -> int:
        return int(self._call(self._redis.get, f"{self.prefix}:seq") or 0)

    def lease(self, name: str, owner: str, ttl_s: float) -> bool:
        return bool(self._call(self._renew, keys=[f"{self.prefix}:lease:{name}"], args=[owner, int(ttl_s * 1000)]))

    def release(self, name: str, owner: str) -> None:
        self._call(self._release, keys=[f"{self.prefix}:lease:{name}"], args=[owner])

    def close(self) -> None:
        self._redis.close()


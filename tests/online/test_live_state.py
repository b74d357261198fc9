"""A replica's live state without Ray or HTTP: the ingest queue's 429 and a store that cannot be opened."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from raysrec.errors import ConfigError
from raysrec.online.events import StoreConfig
from raysrec.serving.live import LiveState, check_store


def test_a_full_ingest_queue_answers_429_with_retry_after_and_writes_nothing_of_those(tmp_path):
    cfg = StoreConfig(url=f"sqlite:///{tmp_path}/events.db", max_pending_requests=2)
    live = LiveState(cfg, known=lambda ids: [])

    async def burst():
        bodies = [orjson.dumps({"events": [{"event_id": f"r{r}-{i}", "user_id": r, "item_id": i}
                                           for i in range(200)]}) for r in range(12)]
        return await asyncio.gather(*(live.ingest(b) for b in bodies))

    answers = asyncio.run(burst())
    codes = [a.status_code for a in answers]
    assert codes[:2] == [200, 200] and codes.count(429) == 10          # two waited for the store, ten were turned away
    assert all(a.headers["retry-after"] == "1" for a in answers if a.status_code == 429)
    stored = live.reader.events_after(0, 10_000)
    assert len(stored) == 400 and {e.user_id for e in stored} == {"0", "1"}
    live.close()


def test_a_store_that_cannot_be_opened_fails_in_one_line():
    with pytest.raises(ConfigError, match="store.url.*127.0.0.1:1"):
        check_store(StoreConfig(url="redis://127.0.0.1:1/0"))
    with pytest.raises(ConfigError, match="store.url"):
        check_store(StoreConfig(url="sqlite:////proc/no/such/dir/x.db"))

"""The live-state stores, without Ray: SQLite on a real file and Redis on a real redis-server."""

from __future__ import annotations

import uuid

import pytest

from raysrec.online.events import Event, EventConflict, EventError, StoreConfig, check_events
from raysrec.online.log import export_events, read_log
from raysrec.online.store import open_store, sqlite_path

NOW = 1_700_000_000.0


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request, tmp_path):
    """A factory of stores of one kind (a second call opens the same state, like a second replica)."""
    opened = []
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/state/events.db"
    else:
        url = request.getfixturevalue("redis_server").url
    prefix = f"t{uuid.uuid4().hex[:8]}"

    def make(max_history: int = 200):
        store = open_store(StoreConfig(url=url, max_history=max_history, key_prefix=prefix))
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def ev(event_id, user, item, ts=None, kind="view"):
    given = ts is not None
    return Event(event_id, str(user), item, kind, float(ts if given else NOW), given)


def test_append_counts_duplicates_and_keeps_the_id_types(make_store):
    store = make_store()
    first = store.append([ev("a", 1, 10, 100), ev("b", 1, "x7", 101), ev("c", 2, 10, 100)], arrival=NOW)
    assert (first.accepted, first.duplicates) == (3, 0)
    again = store.append([ev("a", 1, 10, 100), ev("d", 1, 11, 102), ev("d", 1, 11, 102)], arrival=NOW)
    assert (again.accepted, again.duplicates) == (1, 2)       # "a" stored before, "d" twice in the batch
    history = store.history("1")
    assert [(e.event_id, e.item_id) for e in history] == [("a", 10), ("b", "x7"), ("d", 11)]
    assert isinstance(history[0].item_id, int) and isinstance(history[1].item_id, str)
    assert [e.event_id for e in make_store().history("2")] == ["c"]     # another connection sees it
    assert make_store().history("unknown") == []


def test_a_conflicting_id_refuses_the_whole_batch(make_store):
    store = make_store()
    store.append([ev("a", 1, 10, 100)], arrival=NOW)
    with pytest.raises(EventConflict) as raised:
        store.append([ev("new", 1, 11, 101), ev("a", 1, 99, 100)], arrival=NOW)
    assert raised.value.index == 1 and "events.1.event_id" in str(raised.value)
    with pytest.raises(EventConflict) as raised:            # the same id twice in one batch, two payloads
        store.append([ev("z", 1, 11, 101), ev("z", 1, 12, 101)], arrival=NOW)
    assert raised.value.index == 1
    assert [e.event_id for e in store.history("1")] == ["a"]    # nothing of either batch was written
    assert store.last_seq() == 1


def test_a_retry_without_timestamp_is_a_duplicate_not_a_conflict(make_store):
    store = make_store()
    cfg = StoreConfig()
    body = [{"event_id": "e1", "user_id": 5, "item_id": 3}]
    store.append(check_events(body, cfg, now=NOW), arrival=NOW)
    retry = store.append(check_events(body, cfg, now=NOW + 30), arrival=NOW + 30)   # the server's clock moved
    assert (retry.accepted, retry.duplicates) == (0, 1)
    with pytest.raises(EventConflict):
        store.append(check_events([{**body[0], "timestamp": NOW + 30}], cfg, now=NOW + 30), arrival=NOW + 30)


def test_histories_are_in_time_order_with_late_events_in_place_and_capped(make_store):
    store = make_store(max_history=3)
    store.append([ev("e1", "u", 1, 10), ev("e2", "u", 2, 30)], arrival=NOW)
    store.append([ev("late", "u", 3, 20), ev("tie", "u", 4, 30)], arrival=NOW + 1)   # arrives after, happened before
    assert [e.item_id for e in store.history("u")] == [3, 2, 4]      # e1 (oldest) falls out of the cap of 3
    store.append([ev(f"f{i}", "flood", i, 100 + i) for i in range(50)], arrival=NOW)
    both = store.histories(["u", "flood", "nobody"])
    assert [e.item_id for e in both["flood"]] == [47, 48, 49] and both["nobody"] == []
    everything = store.events_after(0, limit=1000)                   # what the export reads keeps every event
    assert len(everything) == 54 and [e.seq for e in everything] == sorted(e.seq for e in everything)


def test_forget_deletes_a_user_and_no_one_else(make_store):
    store = make_store()
    store.append([ev("a", "gone", 1, 1), ev("b", "stays", 1, 1), ev("c", "gone", 2, 2)], arrival=NOW)
    assert store.forget("gone") == 2
    assert store.history("gone") == [] and [e.event_id for e in store.history("stays")] == ["b"]
    assert [e.event_id for e in store.events_after(0, 10)] == ["b"]
    assert store.forget("gone") == 0


def test_one_exporter_holds_the_lease(make_store):
    one, two = make_store(), make_store()
    assert one.lease("x", "A", 60) and one.lease("x", "A", 60)     # renewable by its owner
    assert not two.lease("x", "B", 60)
    one.release("x", "B")                                          # not B's to give back
    assert not two.lease("x", "B", 60)
    one.release("x", "A")
    assert two.lease("x", "B", 60)


def test_export_writes_each_event_once_by_day_and_resumes(make_store, tmp_path):
    store = make_store(max_history=2)
    day = 86_400.0
    store.append([ev(f"e{i}", i % 3, i, NOW + (i % 2) * day) for i in range(7)], arrival=NOW)
    log = str(tmp_path / "log")
    result = export_events(store, log, batch=3)
    assert result["exported"] == 7 and result["last_seq"] == 7
    days = sorted(p.name for p in (tmp_path / "log").iterdir() if p.is_dir())
    assert days == ["day=2023-11-14", "day=2023-11-15"]
    assert export_events(store, log, batch=3)["exported"] == 0
    store.append([ev("e7", 0, 7, NOW), ev("e8", "new", "n1", NOW)], arrival=NOW)
    assert export_events(store, log, batch=3)["exported"] == 2
    table = read_log(log).to_pydict()
    assert table["event_id"] == [f"e{i}" for i in range(9)] and table["seq"] == list(range(1, 10))
    assert table["item_id"][-1] == "n1" and table["user_id"][:3] == ["0", "1", "2"]


def test_bad_events_name_their_index_and_field():
    cfg = StoreConfig(max_future_s=60)
    good = {"event_id": "e", "user_id": 1, "item_id": 2}
    cases = [
        ({**good, "timestamp": float("nan")}, "timestamp"), ({**good, "timestamp": -1}, "timestamp"),
        ({**good, "timestamp": NOW + 3600}, "timestamp"), ({**good, "user_id": "x" * 10_000}, "user_id"),
        ({**good, "item_id": "a\nb"}, "item_id"), ({**good, "type": "purchase"}, "type"),
        ({**good, "event_id": "x" * 129}, "event_id"), ({**good, "item_id": 1.5}, "item_id"),
        ({**good, "user_id": True}, "user_id"), ({**good, "colour": "red"}, "colour"),
        ({"user_id": 1, "item_id": 2}, "event_id"),
    ]
    for bad, field in cases:
        with pytest.raises(EventError) as raised:
            check_events([good, bad], cfg, now=NOW)
        assert raised.value.index == 1 and raised.value.field == field, (bad, raised.value)
    with pytest.raises(EventError, match="at most 2 events"):
        check_events([good] * 3, StoreConfig(max_events_per_request=2), now=NOW)
    shop = StoreConfig(event_types=["impression", "purchase"], default_type="impression")
    assert [e.type for e in check_events([good, {**good, "type": "purchase"}], shop, now=NOW)] == ["impression",
                                                                                                 "purchase"]
    with pytest.raises(EventError, match="expected one of \\['impression', 'purchase'\\]"):
        check_events([{**good, "type": "view"}], shop, now=NOW)
    [event] = check_events([good], cfg, now=NOW)
    assert (event.type, event.timestamp, event.given_time, event.user_id) == ("view", NOW, False, "1")


def test_store_urls():
    assert str(sqlite_path("sqlite:///rel/x.db")) == "rel/x.db" and str(sqlite_path("sqlite:////abs/x.db")) == "/abs/x.db"
    from raysrec.errors import ConfigError

    with pytest.raises(ConfigError, match="store.url"):
        open_store(StoreConfig(url="postgres://db/x"))


def test_the_event_log_can_live_in_object_storage(s3, tmp_path):
    """A cluster whose nodes share no disk keeps the log in S3 (moto's real S3 API here)."""
    store = open_store(StoreConfig(url=f"sqlite:///{tmp_path}/events.db"))
    store.append([ev(f"e{i}", i % 2, i, NOW + i * 86_400.0) for i in range(4)], arrival=NOW)
    log = s3("event-log")
    assert export_events(store, log, batch=3)["exported"] == 4
    store.append([ev("e4", 0, 4, NOW)], arrival=NOW)
    assert export_events(store, log, batch=3)["exported"] == 1          # the cursor in S3 was read back
    assert read_log(log).column("event_id").to_pylist() == [f"e{i}" for i in range(5)]
    store.close()

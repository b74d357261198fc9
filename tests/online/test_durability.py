"""Acknowledged events survive real SIGKILLs: of the process holding the SQLite file, of redis-server, and of
an event-log export half-way through (run again, it neither skips nor repeats an event)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raysrec.online.events import Event, StoreConfig
from raysrec.online.log import CURSOR, export_events, read_log
from raysrec.online.store import open_store

REPO = Path(__file__).resolve().parents[2]
WRITER = """
import sys, time
from raysrec.online.events import Event, StoreConfig
from raysrec.online.store import open_store
store = open_store(StoreConfig(url=sys.argv[1], key_prefix=sys.argv[2]))
for b in range(100000):
    events = [Event(f"b{b}-{i}", f"u{i % 7}", b * 10 + i, "view", 1000.0 + b, True) for i in range(10)]
    store.append(events, arrival=time.time())
    print(b, flush=True)              # acknowledged: the append returned
"""


def _acknowledged_then_killed(url: str, prefix: str, kill, min_acks: int = 30) -> int:
    """Run a writer process, SIGKILL something (``kill(proc)``) right after ``min_acks`` acknowledgements;
    returns how many batches were acknowledged."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, url, prefix], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    acked = -1
    for line in proc.stdout:
        acked = int(line)
        if acked + 1 >= min_acks:
            kill(proc)
            break
    for line in proc.stdout:              # acknowledgements printed before the kill landed
        acked = int(line)
    proc.kill()
    proc.wait()
    return acked + 1


def _check_every_acknowledged_batch(store, batches: int) -> None:
    stored = {e.event_id for e in store.events_after(0, 10_000_000)}
    missing = [f"b{b}-{i}" for b in range(batches) for i in range(10) if f"b{b}-{i}" not in stored]
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {missing[:3]}"


def test_the_process_holding_the_sqlite_file_is_killed_after_acknowledgements(tmp_path):
    url = f"sqlite:///{tmp_path}/events.db"
    batches = _acknowledged_then_killed(url, "x", lambda proc: proc.send_signal(signal.SIGKILL))
    assert batches >= 30
    with open_store(StoreConfig(url=url)) as store:
        _check_every_acknowledged_batch(store, batches)
        assert store.last_seq() == len(store.events_after(0, 10_000_000))   # nothing half-written either


def test_redis_server_is_killed_after_acknowledgements_and_restarted(redis_server):
    prefix = f"kill{time.time_ns()}"
    batches = _acknowledged_then_killed(redis_server.url, prefix, lambda proc: redis_server.kill())
    redis_server.start()                  # same folder: the append-only file is replayed
    with open_store(StoreConfig(url=redis_server.url, key_prefix=prefix)) as store:
        _check_every_acknowledged_batch(store, batches)
        assert len(store.history("u0")) > 0


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_an_export_killed_half_way_and_run_again_neither_skips_nor_repeats(kind, tmp_path, request):
    prefix = f"exp{time.time_ns()}"
    url = f"sqlite:///{tmp_path}/events.db" if kind == "sqlite" else request.getfixturevalue("redis_server").url
    n = 30_000
    with open_store(StoreConfig(url=url, key_prefix=prefix)) as store:
        for start in range(0, n, 5000):   # three days, so each export window writes several files
            store.append([Event(f"e{i}", f"u{i % 500}", i % 900, "view", 1_700_000_000.0 + (i % 3) * 86_400.0, True)
                          for i in range(start, start + 5000)], arrival=time.time())
    log = tmp_path / "log"
    cmd = [sys.executable, "-m", "raysrec.cli", "events", "export", "--store", url, "--event-log", str(log),
           "--batch", "300", "--key-prefix", prefix, "--export-lease-s", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    while not (log / CURSOR).exists() and proc.poll() is None:
        time.sleep(0.002)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cursor = json.loads((log / CURSOR).read_text())["last_seq"]
    assert 0 < cursor < n, f"the export was not killed half-way (cursor {cursor} of {n})"
    with open_store(StoreConfig(url=url, key_prefix=prefix)) as store:
        # the killed exporter's lease still holds the others off, until it expires
        assert "skipped" in export_events(store, str(log), batch=300)
    time.sleep(2.1)
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    table = read_log(str(log)).to_pydict()
    assert table["seq"] == list(range(1, n + 1)), "an event was skipped or written twice"
    assert sorted(table["event_id"], key=lambda e: int(e[1:])) == [f"e{i}" for i in range(n)]

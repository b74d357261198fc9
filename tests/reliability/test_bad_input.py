"""Bad input everywhere: every case gets a one-line reason naming the file/line/field and exit code 2.

The CLI cases run ``raysrec`` in-process (on the session's local Ray) exactly as a user would type
them; the property-based cases feed the readers and the request models arbitrary input and check
they either accept it or refuse it with *our* error, never crash with something else.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from raysrec.cli import main
from raysrec.data.sources import SourceConfig, plan_splits, read_split, resolve_source
from raysrec.errors import InputError
from tests.models_for_tests import tiny_model

HEADER = b"user_id,item_id,timestamp\n"

FILES = {  # name -> (file name, bytes, extra flags, what the message must say)
    "missing file": ("absent.csv", None, [], "input not found"),
    "empty file": ("empty.csv", b"", [], "the file is empty"),
    "blank lines only": ("blank.csv", b"\n\n\n", [], "the file is empty"),
    "binary": ("blob.csv", bytes(range(256)) * 8, [], "binary data (NUL bytes)"),
    "wrong encoding": ("latin1.csv", HEADER + "1,caf\xe9,3\n".encode("latin-1"), [],
                       "line 2: not valid utf-8 text"),
    "wrong separator": ("semi.csv", b"user_id;item_id;timestamp\n1;2;3\n", [], "is the separator ',' right?"),
    "non-numeric ids": ("ids.csv", HEADER + b"1,2,3\n1,two,4\n", ["--id-type", "int"],
                        "line 3, field 'item_id': expected an integer item id, got 'two'"),
    "non-numeric ml-100k": ("u.data", b"1\t2\t3\t881250949\nx\t2\t3\t881250949\n", ["--format", "ml-100k"],
                            "line 2, field 'user': expected an integer user id, got 'x'"),
    "negative timestamp": ("neg.csv", HEADER + b"1,2,3\n1,3,-5\n", [],
                           "line 3, field 'timestamp': expected a non-negative timestamp, got '-5'"),
    "non-numeric timestamp": ("ts.csv", HEADER + b"1,2,noon\n", [], "line 2, field 'timestamp': expected a number"),
    "infinite timestamp": ("inf.csv", HEADER + b"1,2,inf\n", [], "line 2, field 'timestamp': expected a finite number"),
    "header repeated as a row": ("dup.csv", HEADER + HEADER + b"1,2,3\n", [],
                                 "line 2, field 'timestamp': expected a number (Unix time in s, ms, us or ns) or a "
                                 "date-time such as 2019-10-01 00:00:00 UTC, got 'timestamp'"),
    "duplicate column names": ("cols.csv", b"user_id,item_id,item_id,timestamp\n1,2,2,3\n", [],
                               "the header names column(s) ['item_id'] more than once"),
    "missing column": ("nocol.csv", b"user_id,item_id\n1,2\n", [], "column 'timestamp' (the timestamp column) not found"),
    "huge line": ("huge.csv", HEADER + b"1," + b"7" * 3_000_000 + b",3\n", [], "line 2: a line of 3,000,004 bytes"),
    "huge header": ("hugehead.csv", b"x" * (2 << 20), [], "no line break in the first 1 MiB"),
    "too few fields": ("few.csv", HEADER + b"1,2\n", [], "line 2: expected 3 fields"),
    "unknown format": ("x.csv", HEADER + b"1,2,3\n", ["--format", "tiktok"], "invalid choice: 'tiktok'"),
    # skipped rows: when none is left, one line with the counts per reason (it crashed in Ray Data's shuffle)
    "every row skipped": ("times.csv", HEADER + b"1,2,noon\n3,4,2019-13-45 25:00:00 UTC\n\n",
                          ["--on-bad-row", "skip"],
                          "no interaction left after reading and cleaning ({'malformed_row': 2, 'blank_line': 1})"),
}


@pytest.mark.parametrize("case", list(FILES))
def test_prepare_refuses_bad_files_with_the_reason(ray_local, tmp_path, capsys, case):
    name, content, flags, message = FILES[case]
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "out"
    try:
        code = main(["prepare", "--input", str(path), "--output", str(out), *flags])
    except SystemExit as exc:  # argparse refuses unknown choices itself
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err, f"a reason, not a traceback:\n{err}"
    assert not out.exists(), "a failed prepare leaves no output"


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]      # closed again when this returns: nothing listens there


def _write(folder: Path, name: str, text: str) -> str:
    (folder / name).write_text(text)
    return str(folder / name)


STAGES = {  # name -> (argv builder, message)
    "train: not a prepared folder": (lambda p: ["train", "--data", str(p), "--output", str(p / "o"), "--no-ray"],
                                     "not a prepared data folder (no manifest.json)"),
    "train: typo in the config": (lambda p: ["train", "--config", _write(p, "t.yaml", "data: x\nlerning_rate: 1\n")],
                                  "t.yaml: unknown field(s) ['lerning_rate']"),
    "train: nested field in the config": (
        lambda p: ["train", "--config", _write(p, "t.yaml", "model: {hidden_dim: wide}\n")],
        "t.yaml: model.hidden_dim: expected an integer, got 'wide'"),
    "train: wrong type in the config": (lambda p: ["train", "--config", _write(p, "t.yaml", "epochs: many\n")],
                                        "t.yaml: epochs: expected an integer, got 'many'"),
    "config: code in YAML is refused": (
        lambda p: ["train", "--config", _write(p, "evil.yaml", "data: !!python/object/apply:os.system ['true']\n")],
        "not valid YAML/JSON"),
    "config: missing file": (lambda p: ["pipeline", "--config", str(p / "nope.yaml")], "config file not found"),
    "evaluate: not a checkpoint": (lambda p: ["evaluate", "--data", str(p), "--model", str(p)],
                                   "no raysrec model here"),
    "embed-items: not a prepared folder": (lambda p: ["embed-items", "--data", str(p / "none")],
                                           "not a prepared data folder (no manifest.json)"),
    "serve: not a checkpoint": (lambda p: ["serve", "--model", str(p / "none")], "model folder not found"),
    "deploy: not a checkpoint": (lambda p: ["deploy", "--model", str(p / "none")], "model folder not found"),
    "deploy: no cluster there": (lambda p: ["deploy", "--model", str(tiny_model(p / "m")), "--address", f"127.0.0.1:{_closed_port()}"],
                                 "no running Ray cluster at '127.0.0.1:"),
    "prepare: crossed time cuts": (lambda p: ["prepare", "-i", _write(p, "log.csv", "user_id,item_id,timestamp\n1,2,3\n"),
                                              "-o", str(p / "out"), "--split", "global_time", "--valid-time", "2024-02-01",
                                              "--test-time", "2024-01-01"], "must come before the test cut"),
    "tune: missing space": (lambda p: ["tune", "--data", str(p), "--output", str(p / "s"), "--space", "nope"],
                            "search space 'nope' not found"),
    "pipeline: unknown stage key": (lambda p: ["pipeline", "--config", _write(p, "p.yaml", "trian: {}\n")],
                                    "unknown field(s) ['trian']"),
}


@pytest.mark.parametrize("case", list(STAGES))
def test_every_stage_refuses_bad_arguments_with_the_reason(tmp_path, capsys, case):
    argv, message = STAGES[case]
    code = main(argv(tmp_path))
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


# ------------------------------------------------------------------ property-based
def _read_all(path: Path, **kwargs) -> pa.Table:
    source = resolve_source(SourceConfig(path=str(path), **kwargs))
    return pa.concat_tables([read_split(source, s) for s in plan_splits(source, 256)])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=600))
def test_any_bytes_after_a_header_are_read_or_refused_with_a_line_number(tmp_path, body):
    path = tmp_path / "fuzz.csv"
    path.write_bytes(HEADER + body)
    try:
        table = _read_all(path)
    except InputError as exc:
        assert str(path) in str(exc) and "line " in str(exc)
        return
    # Accepted: every line is one row, in input order, kept or counted as blank; none vanished.
    lines = body.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    assert table.num_rows == len(lines)
    assert table.column("ord").to_pylist() == sorted(table.column("ord").to_pylist())
    codes = table.column("drop_code").to_pylist()
    # blank = whitespace only, as Python's str.isspace() has it (\x1c-\x1f count too)
    assert codes.count(0) == sum(1 for line in lines if line.decode("utf-8", "replace").strip())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=8),
                               st.text(string.ascii_letters + string.digits, min_size=1, max_size=8),
                               st.integers(0, 2**40)), max_size=40),
       skip=st.booleans())
def test_well_formed_rows_are_all_kept_and_counted(tmp_path, rows, skip):
    path = tmp_path / "rows.csv"
    path.write_text(HEADER.decode() + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    try:
        table = _read_all(path, on_bad_row="skip" if skip else "error")
    except InputError as exc:  # only an empty file may be refused
        assert not rows and "empty" in str(exc)
        return
    assert table.num_rows == len(rows) and set(table.column("drop_code").to_pylist()) <= {0}
    assert table.column("user").to_pylist() == [u for u, _, _ in rows]


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                       max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(body=st.dictionaries(st.sampled_from(["history", "k", "exclude", "exclude_seen", "timestamps", "now",
                                             "candidates", "extra"]), JSONISH, max_size=5))
def test_request_models_accept_or_refuse_any_json_with_a_validation_error(body):
    from raysrec.serving.http import RecommendRequest, ScoreRequest

    for model in (RecommendRequest, ScoreRequest):
        try:
            request = model.model_validate_json(json.dumps(body))
        except ValidationError:
            continue
        query = request.query()
        assert len(query.history) <= 10_000
        if model is RecommendRequest:
            assert 1 <= query.k <= 1000


@pytest.mark.parametrize("argv,message", [
    (["prepare", "-i", "no-such-log.csv", "-o", "out"], "no-such-log.csv: input not found"),
    (["train", "--data", "no-such-folder", "-o", "out"], "no-such-folder: not a prepared data folder"),
    (["tune", "--data", "no-such-folder", "-o", "out"], "no-such-folder: not a prepared data folder"),
    (["serve", "--model", "no-such-model"], "model folder not found"),
    (["embed-items", "--data", "no-such-folder"], "not a prepared data folder"),
])
def test_user_mistakes_are_caught_before_ray_starts(argv, message, tmp_path):
    """With RAY_ADDRESS pointing nowhere, touching Ray would fail differently: the check runs first."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-m", "raysrec.cli", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr[-2000:]


def test_the_rees46_slices_broken_last_line_is_named_in_one_line(ray_local, tmp_path, capsys):
    """The real shop log's last line is cut off: by default prepare stops there in one line naming the line and
    what was expected, exit 2 (tests/data/test_side_inputs.py reads the same file with --on-bad-row skip)."""
    log = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "rees46-slice" / "2019-Oct-slice.csv"
    if not log.is_file():
        pytest.skip(f"{log} not found")
    code = main(["prepare", "-i", str(log), "-o", str(tmp_path / "out"), "--item-col", "product_id",
                 "--time-col", "event_time", "--type-col", "event_type"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "2019-Oct-slice.csv, line 17436: expected 9 fields" in err and "found 8" in err, err


def test_shards_whose_rows_are_all_skipped_are_empty_not_fatal(ray_local, tmp_path):
    """Malformed rows land in the shard of the empty user id; with no real user there, that shard is empty."""
    from raysrec.data.pipeline import PrepareConfig, prepare
    from raysrec.data.sources import SourceConfig
    from raysrec.data.transforms import shard_of

    users = [f"u{i}" for i in range(40)]
    blank_shard = shard_of(pa.array([""]), 8)[0]
    users = [u for u in users if shard_of(pa.array([u]), 8)[0] != blank_shard][:6]
    rows = [f"{u},i{(j * 7 + k) % 9},{k}" for j, u in enumerate(users) for k in range(5)]
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\nu0,i1,noon\n")
    manifest = prepare(PrepareConfig(source=SourceConfig(path=str(path), on_bad_row="skip"),
                                     output=str(tmp_path / "out"), num_shards=8))
    assert manifest["rows_read"] == len(rows) + 1 and manifest["rows_kept"] == len(rows)
    assert manifest["rows_dropped"]["malformed_row"] == 1 and manifest["num_users"] == len(users)

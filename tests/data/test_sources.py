"""Readers without Ray: every format, split boundaries, and one clear error per kind of bad input."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raysrec.data.sources import DropReason, SourceConfig, plan_splits, read_item_metadata, read_split, resolve_source
from raysrec.errors import InputError


def read_all(cfg: SourceConfig, split_bytes: int = 1 << 20) -> pa.Table:
    source = resolve_source(cfg)
    return pa.concat_tables([read_split(source, s) for s in plan_splits(source, split_bytes)])


def kept(table: pa.Table) -> pa.Table:
    return table.filter(pa.compute.equal(table.column("drop_code"), 0))


def test_ml1m_ratings_and_movies(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    (tmp_path / "movies.dat").write_bytes("1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
                                          "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
                                          "3::Caf\xe9 (1999)::Comedy\n".encode("latin-1"))
    cfg = SourceConfig(path=str(tmp_path))
    table = read_all(cfg)
    assert table.column("user").to_pylist() == [1, 1, 2]
    assert table.column("item").to_pylist() == [1193, 661, 1193]
    assert table.column("rating").to_pylist() == [5.0, 3.0, 4.0]
    assert table.column("timestamp").to_pylist() == [978300760.0, 978302109.0, 978298413.0]
    meta = read_item_metadata(resolve_source(cfg), cfg).set_index("item_id")
    assert meta.loc["661", "categories"] == "Animation|Children's|Musical"
    assert meta.loc["3", "title"] == "Caf\xe9 (1999)"


def test_ml100k_original_files(tmp_path):
    (tmp_path / "u.data").write_text("196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    flags = "|".join(["0"] * 19)
    genre = "|".join(["0", "0", "0", "1"] + ["0"] * 15)
    (tmp_path / "u.item").write_text(f"242|Kolya (1996)|24-Jan-1997||http://x|{flags}\n"
                                     f"302|L.A. Confidential (1997)|01-Jan-1997||http://y|{genre}\n")
    cfg = SourceConfig(path=str(tmp_path))
    assert read_all(cfg).column("item").to_pylist() == [242, 302]
    meta = read_item_metadata(resolve_source(cfg), cfg).set_index("item_id")
    assert meta.loc["302", "categories"] == "Animation"
    assert meta.loc["302", "title"] == "L.A. Confidential (1997)"


def test_sasrec_text_keeps_line_order_as_time(tmp_path):
    lines = ["1 5", "1 3", "2 9", "1  4", "2\t1"]
    path = tmp_path / "Beauty.txt"
    path.write_text("\n".join(lines) + "\n")
    table = read_all(SourceConfig(path=str(path), format="sasrec"), split_bytes=1024)
    assert table.column("item").to_pylist() == [5, 3, 9, 4, 1]
    stamps = table.column("timestamp").to_pylist()
    assert stamps == sorted(stamps), "line order must be time order"


def test_recbole_header_names_columns(tmp_path):
    path = tmp_path / "x.inter"
    path.write_text("item_id:token\tuser_id:token\ttimestamp:float\trating:float\nA7\tu1\t10\t4\nB2\tu1\t5\t2\n")
    table = read_all(SourceConfig(path=str(path)))
    assert table.column("user").to_pylist() == ["u1", "u1"]
    assert table.column("item").to_pylist() == ["A7", "B2"]
    assert table.column("rating").to_pylist() == [4.0, 2.0]


def test_generic_csv_and_parquet_with_named_columns(tmp_path):
    csv_path = tmp_path / "log.csv"
    csv_path.write_text('who,what,when\n"u,1",i1,3\nu2,i2,4\n')
    table = read_all(SourceConfig(path=str(csv_path), user_col="who", item_col="what", time_col="when"))
    assert table.column("user").to_pylist() == ["u,1", "u2"]
    pq_path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"u": [3, 4], "i": [7, 8], "t": [1.5, 2.5]}), pq_path)
    table = read_all(SourceConfig(path=str(pq_path), user_col="u", item_col="i", time_col="t"))
    assert table.column("user").type == pa.int64()
    assert table.column("timestamp").to_pylist() == [1.5, 2.5]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**9)), min_size=1,
                max_size=60),
       st.integers(1024, 4096), st.booleans())
def test_splits_cover_every_line_once_in_order(tmp_path_factory, rows, split_bytes, blank_lines):
    path = tmp_path_factory.mktemp("split") / "u.data"
    text = "".join(f"{u}\t{i}\t1\t{t}\n" + ("\n" if blank_lines and k % 7 == 3 else "") for k, (u, i, t) in enumerate(rows))
    path.write_text(text)
    table = read_all(SourceConfig(path=str(path), format="ml-100k"), split_bytes=split_bytes)
    good = kept(table)
    assert good.column("user").to_pylist() == [r[0] for r in rows]
    assert good.column("timestamp").to_pylist() == [float(r[2]) for r in rows]
    ords = table.column("ord").to_numpy()
    assert len(np.unique(ords)) == len(ords)
    assert table.num_rows == len(rows) + text.count("\n\n")


@pytest.mark.parametrize("content, fmt, fragment, line", [
    ("1,2,3,4\n", "ml-100k", "expected 4 fields (user, item, rating, timestamp) separated by a tab", 1),
    ("1\t2\t3\t881250949\n1\tx\t3\t881250949\n", "ml-100k", "field 'item': expected an integer item id, got 'x'", 2),
    ("1\t2\t3\t881250949\n1\t2\t3\t-5\n", "ml-100k", "expected a non-negative timestamp", 2),
    ("1\t2\tfive\t881250949\n", "ml-100k", "field 'rating': expected a number, got 'five'", 1),
    ("1\t2\t3\tnan\n", "ml-100k", "expected a finite number", 1),
    ("1 2 3\n", "sasrec", "expected 2 fields", 1),
    ("\x00\x01\x02\x03\xff\xfe\n", "sasrec", "binary data", 1),
])
def test_bad_rows_name_file_line_and_field(tmp_path, content, fmt, fragment, line):
    path = tmp_path / ("u.data" if fmt == "ml-100k" else "x.txt")
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(InputError) as info:
        read_all(SourceConfig(path=str(path), format=fmt))
    message = str(info.value)
    assert str(path) in message and f"line {line}" in message and fragment in message


def test_skip_mode_marks_bad_rows_instead_of_failing(tmp_path):
    path = tmp_path / "u.data"
    path.write_text("1\t2\t3\t10\nbad line\n1\t3\t3\t11\n")
    table = read_all(SourceConfig(path=str(path), on_bad_row="skip"))
    assert table.column("drop_code").to_pylist() == [0, int(DropReason.MALFORMED_ROW), 0]


def written(folder, name, text):
    (folder / name).write_text(text)
    return folder / name


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p / "missing.csv", "input not found"),
    (lambda p: written(p, "x.weird", "1 2\n"), "unknown source type"),
    (lambda p: p, "unknown source type"),
    (lambda p: written(p, "e.csv", ""), "empty"),
    (lambda p: written(p, "s.csv", "user_id;item_id;timestamp\n1;2;3\n"), "is the separator ',' right?"),
])
def test_bad_sources_are_refused_before_reading(tmp_path, make, fragment):
    with pytest.raises(InputError) as info:
        resolve_source(SourceConfig(path=str(make(tmp_path))))
    assert fragment in str(info.value)


def test_millisecond_and_finer_timestamps_are_read_as_seconds(tmp_path):
    """A 13-digit Unix time is milliseconds (it was read as seconds, 1000x too far apart); so are 16- and 19-digit
    microseconds and nanoseconds. Seconds stay as they are."""
    from raysrec.data.sources import epoch_seconds

    second = 1_569_888_000.0                                   # 2019-10-01 00:00:00 UTC
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\n"
                    f"1,2,{int(second)}\n1,3,{int(second * 1e3) + 500}\n1,4,{int(second * 1e6)}\n"
                    f"1,5,{int(second) * 10**9}\n")
    source = resolve_source(SourceConfig(path=str(path)))
    (split,) = plan_splits(source)
    stamps = read_split(source, split).column("timestamp").to_pylist()
    assert stamps == [second, second + 0.5, second, second]
    assert np.isnan(epoch_seconds(np.array([np.nan]))[0])


def test_a_bad_line_near_the_top_is_refused_before_ray_starts(tmp_path):
    """check_inputs (what the CLI runs before Ray) parses the head of the first file: a wrong format fails at
    once, in one line; a bad line past the head is left to the Ray Data workers, as is skip mode."""
    from raysrec.data.pipeline import PrepareConfig, check_inputs
    from raysrec.data.sources import check_head

    path = tmp_path / "u.data"
    path.write_text("1\t2\t3\t4\n1\t2\t3\tnoon\n")
    with pytest.raises(InputError, match=r"u.data, line 2, field 'timestamp': expected a number"):
        check_inputs(PrepareConfig(source=SourceConfig(path=str(path), format="ml-100k"), output=str(tmp_path / "o")))
    skip = resolve_source(SourceConfig(path=str(path), format="ml-100k", on_bad_row="skip"))
    check_head(skip)                                                         # skip mode counts it later
    late = tmp_path / "late.data"
    late.write_text("1\t2\t3\t4\n" * 3000 + "1\t2\t3\tnoon\n")                # the bad line starts at byte 24,000
    source = resolve_source(SourceConfig(path=str(late), format="ml-100k"))
    check_head(source, nbytes=10_000)
    with pytest.raises(InputError, match="line 3001"):
        check_head(source, nbytes=30_000)

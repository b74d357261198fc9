"""Readers for interaction logs: format detection, splitting into byte ranges, and parsing.

Every reader produces Arrow tables with one schema (:func:`event_schema`): ``user``, ``item``,
``timestamp`` (float seconds, or the line order when the source has none; numbers in s/ms/us/ns or date-time
strings such as ``2019-10-01 00:00:00 UTC``), ``rating`` (null when the source has none), ``ord`` (a global,
strictly increasing position of the row in the input, used to keep ties in input order), ``drop_code`` (0 =
kept so far; otherwise a :class:`DropReason`) and ``type`` (the behaviour type, e.g. ``view``/``buy``; null
when the source has no type column). Files are read in byte ranges ("splits") that start on line boundaries, so
no process ever holds a whole large file. Parsing uses pyarrow's CSV reader; a range that fails
to parse is re-read line by line to name the first bad line, field and what was expected.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import io
import re
from typing import Literal, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from raysrec.config import Config, check, option
from raysrec.errors import InputError
from raysrec.files import Location

SourceFormat = Literal["auto", "ml-1m", "ml-100k", "recbole", "sasrec", "user-lines", "csv", "parquet"]
FORMATS = ("ml-1m", "ml-100k", "recbole", "sasrec", "user-lines", "csv", "parquet")

# ord = file_index * 2**44 + byte offset of the split + row number inside the split. A row takes
# at least one byte, so ords are unique and follow file order, then line order.
_ORD_FILE_STRIDE = 1 << 44


class DropReason(enum.IntEnum):
    """Why a row read from the input is not in the output. Names appear in ``manifest.json``."""

    KEPT = 0
    MALFORMED_ROW = 1
    BLANK_LINE = 2
    RATING_BELOW_MIN = 3
    DUPLICATE = 4
    ITEM_BELOW_K_CORE = 5
    USER_BELOW_K_CORE = 6
    USER_TOO_SHORT = 7
    TRUNCATED = 8
    # global_time split: an event after the validation cut whose item is not in the training vocabulary (no
    # training-period event, or fewer than item_k_core): a model trained before the cut cannot know it
    ITEM_NOT_IN_TRAINING = 9
    TYPE_NOT_SELECTED = 10      # an event type left out by prepare.types


    @property
    def label(self) -> str:
        return self.name.lower()


def event_schema(id_type: pa.DataType) -> pa.Schema:
    return pa.schema([
        ("user", id_type), ("item", id_type), ("timestamp", pa.float64()),
        ("rating", pa.float64()), ("ord", pa.int64()), ("drop_code", pa.int8()), ("type", pa.string()),
    ])


@dataclasses.dataclass
class SourceConfig(Config):
    """Where the interaction log is and how to read it.

    ``format='auto'`` recognises a MovieLens-1M folder (``ratings.dat``), a MovieLens-100K
    folder (``u.data``), a RecBole atomic folder or file (``*.inter``), ``.csv``/``.tsv`` and
    ``.parquet``; SASRec-paper ``.txt`` files (``user item`` per line) must be named with ``format='sasrec'``,
    and files with one user per line (``user item item ...``, oldest first: S3-Rec, RecBole and many paper
    releases) with ``format='user-lines'``.
    """

    path: str = option("", 'interaction file or folder: a local path or a pyarrow URI (s3://, gs://, file://)')
    format: SourceFormat = option("auto", 'input layout; auto detects RecBole atomic files, MovieLens and SASRec text')
    items_path: Optional[str] = option(None, 'item metadata file (titles, categories)')
    users_path: Optional[str] = option(None, "user attributes file (csv/tsv/parquet with the user column; a RecBole "
                                             "folder's .user file is found without it)")
    user_col: str = option("user_id", 'user column (csv/parquet)')
    item_col: str = option("item_id", 'item column (csv/parquet)')
    time_col: Optional[str] = option("timestamp", 'timestamp column; none: the file order is the time order')
    rating_col: Optional[str] = option(None, 'rating column, for min_rating')
    type_col: Optional[str] = option(None, "event-type column (e.g. Taobao's behavior, REES46's event_type): "
                                           "a view and a buy become different events, counted per type")
    columns: Optional[list[str]] = option(None, 'the column names of a csv without a header line, in order '
                                                '(e.g. user_id item_id category_id behavior timestamp)')
    title_col: str = "title"
    categories_col: str = "categories"
    sep: Optional[str] = option(None, "field separator for csv (default ',')")
    encoding: str = option("utf-8", 'text encoding of the input')
    id_type: Literal["auto", "int", "str"] = option("auto", 'how original ids are typed')
    on_bad_row: Literal["error", "skip"] = option("error", 'error: stop at the first bad line; skip: count it under malformed_row')

    def validate(self) -> None:
        check(bool(self.path), "source.path: a file or folder of interactions is required")
        check(self.columns is None or (len(self.columns) >= 2 and all(str(c).strip() for c in self.columns)),
              f"source.columns: expected the names of at least 2 columns, got {self.columns!r}")


@dataclasses.dataclass(frozen=True)
class Split:
    """One unit of reading: a byte range of a text file or a row group of a Parquet file."""

    file_index: int
    path: str
    start: int
    end: int
    row_group: int = -1
    row_offset: int = 0
    source_index: int = 0      # 0: the source; 1: the event log read beside it


@dataclasses.dataclass
class ResolvedSource:
    """A source after format detection: concrete files, layout and column roles."""

    format: str
    files: list[Location]             # any pyarrow filesystem: tasks on every node open them
    fields: list[str]                 # every column of the file, in order
    roles: dict[str, str]             # role ('user','item','timestamp','rating') -> column name
    delimiter: str                    # '::' and whitespace are normalised before parsing
    has_header: bool
    encoding: str
    id_kind: Literal["int", "str"]
    items_path: Optional[Location]
    on_bad_row: str
    quoted: bool = False
    id_auto: bool = False             # ids read as strings, made ints at the end if all are
    file_offset: int = 0              # a second input's files count on from the first's (row ords stay unique)

    @property
    def has_timestamp(self) -> bool:
        return "timestamp" in self.roles

    @property
    def has_rating(self) -> bool:
        return "rating" in self.roles

    @property
    def has_type(self) -> bool:
        return "type" in self.roles

    @property
    def arrow_id_type(self) -> pa.DataType:
        return pa.int64() if self.id_kind == "int" else pa.string()

    def describe_sep(self) -> str:
        return {"\t": "a tab", " ": "whitespace", ",": "a comma"}.get(self.delimiter, repr(self.delimiter))


# ----------------------------------------------------------------------------------------------
# Resolution (driver side, cheap: looks at names and at most one header line)
# ----------------------------------------------------------------------------------------------

MAX_ID_LENGTH = 512  # characters; longer "ids" are broken lines or a wrong separator, not ids
MAX_LINE_BYTES = 64 << 10  # an interaction line is a few fields; a longer one is a broken file


def _require_file(path: Location, what: str) -> None:
    if not path.exists():
        raise InputError(f"{what} not found", path=str(path))
    if not path.is_file():
        raise InputError(f"{what}: expected a file, found a folder", path=str(path))


def _read_header(path: Location, encoding: str) -> str:
    with path.open() as handle:
        raw = handle.readline(1 << 20)
    if not raw.strip():
        raise InputError("the file is empty; expected a header line naming the columns", path=str(path), line=1)
    if b"\x00" in raw:
        raise InputError("binary data (NUL bytes) where a header line naming the columns was expected",
                         path=str(path), line=1)
    if not raw.endswith(b"\n") and len(raw) >= 1 << 20:
        raise InputError("no line break in the first 1 MiB: not a line-based text file", path=str(path), line=1)
    try:
        return raw.decode(encoding).rstrip("\r\n")
    except UnicodeDecodeError:
        raise InputError(f"the header is not valid {encoding} text (set source.encoding)", path=str(path), line=1) from None


def detect_format(path: Location) -> str:
    """Guess the source format from file names; raises when nothing matches."""
    if path.is_dir():
        if (path / "ratings.dat").is_file():
            return "ml-1m"
        if (path / "u.data").is_file():
            return "ml-100k"
        if any(path.glob("*.inter")):
            return "recbole"
        if any(path.glob("*.parquet")):
            return "parquet"
        raise InputError(
            "unknown source type: expected a folder with ratings.dat (MovieLens-1M), u.data "
            "(MovieLens-100K), *.inter (RecBole) or *.parquet, or pass --format", path=str(path))
    suffix = path.suffix.lower()
    if path.name == "ratings.dat":
        return "ml-1m"
    if path.name == "u.data":
        return "ml-100k"
    known = {".inter": "recbole", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
    if suffix in known:
        return known[suffix]
    raise InputError(
        f"unknown source type for a '{suffix or path.name}' file: pass --format one of {list(FORMATS)}",
        path=str(path))


def resolve_source(cfg: SourceConfig) -> ResolvedSource:
    """Turn a :class:`SourceConfig` into concrete files and column roles, validating both."""
    path = Location.of(cfg.path)
    if not path.exists():
        raise InputError("input not found: expected an interaction file or a folder holding one", path=str(path))
    fmt = detect_format(path) if cfg.format == "auto" else cfg.format
    items_path: Optional[Location] = None
    if path.is_dir() and fmt in ("csv", "parquet"):
        # The folder layout `raysrec synth` writes: interactions.<ext> and items.<ext>.
        ext = "csv" if fmt == "csv" else "parquet"
        if (path / f"interactions.{ext}").is_file():
            if (path / f"items.{ext}").is_file():
                items_path = path / f"items.{ext}"
            path = path / f"interactions.{ext}"
    if fmt not in FORMATS:
        raise InputError(f"unknown source type '{fmt}': expected one of {list(FORMATS)}", path=str(path))
    if cfg.items_path is not None:
        items_path = Location.of(cfg.items_path)

    if fmt == "ml-1m":
        ratings = path / "ratings.dat" if path.is_dir() else path
        _require_file(ratings, "MovieLens-1M ratings.dat")
        if items_path is None and (ratings.parent / "movies.dat").is_file():
            items_path = ratings.parent / "movies.dat"
        return ResolvedSource(fmt, [ratings], ["user", "item", "rating", "timestamp"],
                              {"user": "user", "item": "item", "rating": "rating", "timestamp": "timestamp"},
                              "::", False, "latin-1", "int", items_path, cfg.on_bad_row)
    if fmt == "ml-100k":
        data = path / "u.data" if path.is_dir() else path
        _require_file(data, "MovieLens-100K u.data")
        if items_path is None and (data.parent / "u.item").is_file():
            items_path = data.parent / "u.item"
        return ResolvedSource(fmt, [data], ["user", "item", "rating", "timestamp"],
                              {"user": "user", "item": "item", "rating": "rating", "timestamp": "timestamp"},
                              "\t", False, "latin-1", "int", items_path, cfg.on_bad_row)
    if fmt in ("sasrec", "user-lines"):
        layout = "'user item' lines" if fmt == "sasrec" else "'user item item ...' lines"
        files = path.glob("*.txt") if path.is_dir() else [path]
        if not files:
            raise InputError(f"no *.txt file in the folder ({fmt} format expects {layout})", path=str(path))
        for f in files:
            _require_file(f, f"{fmt} interaction file ({layout})")
        return ResolvedSource(fmt, files, ["user", "item"], {"user": "user", "item": "item"},
                              " ", False, cfg.encoding, "int", items_path, cfg.on_bad_row)
    if fmt == "recbole":
        if path.is_dir():
            inters = path.glob("*.inter")
            if len(inters) != 1:
                raise InputError(f"expected exactly one *.inter file, found {len(inters)}", path=str(path))
            inter = inters[0]
        else:
            inter = path
        _require_file(inter, "RecBole .inter file")
        if items_path is None and inter.with_suffix(".item").is_file():
            items_path = inter.with_suffix(".item")
        header = _read_header(inter, cfg.encoding)
        if "\t" not in header:
            raise InputError(
                f"expected tab-separated 'name:type' column headers, got {header[:80]!r}",
                path=str(inter), line=1)
        fields = [h.split(":", 1)[0].strip() for h in header.split("\t")]
        roles = _assign_roles(fields, cfg, inter, default_rating="rating")
        return ResolvedSource(fmt, [inter], fields, roles, "\t", True, cfg.encoding,
                              "int" if cfg.id_type == "int" else "str", items_path, cfg.on_bad_row,
                              id_auto=cfg.id_type == "auto")
    if fmt == "csv":
        files = path.glob("*.csv") if path.is_dir() else [path]
        if not files:
            raise InputError("no *.csv file in the folder", path=str(path))
        sep = cfg.sep or ("\t" if files[0].suffix == ".tsv" else ",")
        if cfg.columns is not None:       # no header line: the columns are named on the command line
            for f in files:
                _require_file(f, "csv file")
            fields = [str(c).strip() for c in cfg.columns]
            header = None
        else:
            header = _read_header(files[0], cfg.encoding)
            fields = next(csv.reader([header], delimiter=sep)) if len(sep) == 1 else header.split(sep)
            fields = [f.strip() for f in fields]
        repeated = sorted({f for f in fields if fields.count(f) > 1})
        if repeated:
            named = f"the header names column(s) {repeated} more than once: {header[:200]!r}" if header else \
                f"source.columns names column(s) {repeated} more than once"
            raise InputError(named, path=str(files[0]), line=1 if header else None)
        for other in files[1:] if header is not None else []:
            if _read_header(other, cfg.encoding) != header:
                raise InputError(f"header differs from the first file's {header!r}", path=str(other), line=1)
        roles = _assign_roles(fields, cfg, files[0], default_rating=None, sep=sep if header is not None else None)
        return ResolvedSource(fmt, files, fields, roles, sep, header is not None, cfg.encoding,
                              "int" if cfg.id_type == "int" else "str", items_path, cfg.on_bad_row,
                              quoted=True, id_auto=cfg.id_type == "auto")
    # parquet
    files = path.glob("*.parquet") if path.is_dir() else [path]
    partitioned = path.is_dir() and not files
    if partitioned:                   # a folder of day=YYYY-MM-DD partitions: the live service's event log
        files = event_log_files(path)
    if not files:
        raise InputError("no *.parquet file in the folder (nor day=*/ partitions of an event log)", path=str(path))
    try:
        with files[0].open() as handle:
            schema = pq.read_schema(handle)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"not a readable Parquet file ({exc})", path=str(files[0])) from None
    fields = list(schema.names)
    roles = _assign_roles(fields, cfg, files[0], default_rating=None)
    user_type = schema.field(roles["user"]).type
    id_kind = "int" if pa.types.is_integer(user_type) and cfg.id_type != "str" else "str"
    # the event log writes ids as strings (one schema for every file); integers in it become integers again
    return ResolvedSource(fmt, files, fields, roles, "", False, cfg.encoding, id_kind, items_path,
                          cfg.on_bad_row, id_auto=partitioned and id_kind == "str" and cfg.id_type == "auto")


def event_log_files(path: Location) -> list[Location]:
    """The Parquet files of an event log folder (``day=*/part-*.parquet``), in day then seq order."""
    return [f for day in path.glob("day=*") for f in day.glob("*.parquet")]


def with_event_log(main: ResolvedSource, location: str) -> tuple[ResolvedSource, ResolvedSource]:
    """``main`` and the live service's event log (``raysrec events export``) as a second input beside it.

    The log's ids are strings (live user ids often are, whatever the base log's are), so both inputs are read as
    strings and made integers at the end where every id is one (``id_auto``); the log's rows are numbered after
    ``main``'s."""
    path = Location.of(location)
    if not path.is_dir():
        raise InputError("event log not found: expected the folder `raysrec events export` writes", path=str(path))
    if not main.has_timestamp:
        raise InputError("the main input has no timestamps, so the event log's events cannot be put in order "
                         "with its events (set source.time_col)", path=str(path))
    if main.id_kind == "int":
        main = dataclasses.replace(main, id_kind="str", id_auto=True)
    roles = {"user": "user_id", "item": "item_id", "timestamp": "timestamp"}
    if main.has_type:                 # the service stores each event's type; read it where the main input has types
        roles["type"] = "type"
    log = ResolvedSource("parquet", event_log_files(path), ["user_id", "item_id", "type", "timestamp"], roles, "",
                         False, "utf-8", "str", None, main.on_bad_row, id_auto=main.id_auto,
                         file_offset=len(main.files))
    return main, log


def _assign_roles(fields: list[str], cfg: SourceConfig, path: Location, default_rating: Optional[str],
                  sep: Optional[str] = None) -> dict[str, str]:
    roles: dict[str, str] = {}
    time_col = None if (cfg.time_col or "").lower() in ("", "none") else cfg.time_col   # `--time-col none`
    wanted = {"user": cfg.user_col, "item": cfg.item_col, "timestamp": time_col,
              "rating": cfg.rating_col or (default_rating if default_rating in fields else None),
              "type": cfg.type_col}
    for role, name in wanted.items():
        if name is None:
            continue
        if name not in fields:
            hint = ""
            if len(fields) == 1 and sep is not None:
                hint = f" (the header has a single column: is the separator {sep!r} right?)"
            named = " (source.columns)" if cfg.columns is not None else ""
            raise InputError(f"column '{name}' (the {role} column) not found; the columns{named} are {fields}{hint}",
                             path=str(path), line=1 if sep is not None or path.suffix == ".inter" else None)
        roles[role] = name
    return roles


# ----------------------------------------------------------------------------------------------
# Splitting
# ----------------------------------------------------------------------------------------------

def plan_splits(source: ResolvedSource, target_bytes: int = 32 << 20) -> list[Split]:
    """Cut every input file into ~``target_bytes`` ranges (text) or row groups (Parquet)."""
    splits: list[Split] = []
    for index, location in enumerate(source.files):
        path = str(location)
        if source.format == "parquet":
            with location.open() as handle:
                meta = pq.ParquetFile(handle).metadata
            offset = 0
            for rg in range(meta.num_row_groups):
                rows = meta.row_group(rg).num_rows
                splits.append(Split(index, path, 0, 0, rg, offset))
                offset += rows
            continue
        size = location.size()
        if size == 0:
            raise InputError("the file is empty; expected interaction lines", path=path)
        for start in range(0, size, target_bytes):
            splits.append(Split(index, path, start, min(start + target_bytes, size)))
    return splits


HEAD_CHECK_BYTES = 1 << 20


def check_head(source: ResolvedSource, nbytes: int = HEAD_CHECK_BYTES) -> None:
    """Parse the first ``nbytes`` of the first file as a Ray Data worker will: with ``on_bad_row: error`` a bad
    line near the top (a wrong format, separator or column) raises its one-line :class:`InputError` here, before
    Ray starts, instead of from a worker once the cluster is up. Later lines are still checked by the workers."""
    if source.format == "parquet" or source.on_bad_row != "error" or not source.files:
        return
    first = source.files[0]
    size = first.size()
    if size:            # an empty file is refused with the other files' splits (plan_splits)
        read_split(source, Split(0, str(first), 0, min(size, nbytes)))


def _read_range(path: Location, start: int, end: int) -> tuple[bytes, int]:
    """Bytes of the lines whose first byte lies in [start, end), and the offset of the first."""
    with path.open() as handle:
        if start > 0:
            handle.seek(start - 1)
            if handle.read(1) != b"\n":
                handle.readline()  # the line in progress belongs to the previous split
        first = handle.tell()
        if first >= end:
            return b"", first
        data = handle.read(end - first)
        if not data.endswith(b"\n"):
            data += handle.readline()
    return data, first


def line_number(path: Location, offset: int) -> int:
    """1-based number of the line starting at byte ``offset`` (only computed to report errors)."""
    count, done = 1, 0
    with path.open() as handle:
        while done < offset:
            chunk = handle.read(min(16 << 20, offset - done))
            if not chunk:
                break
            count += chunk.count(b"\n")
            done += len(chunk)
    return count


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------

_WS = re.compile(rb"[ \t]+")
_EDGE_WS = re.compile(rb"(?m)^ | (?=\r?$)")


def _normalise(source: ResolvedSource, data: bytes) -> tuple[bytes, str]:
    """Rewrite multi-character separators to one the CSV parser accepts."""
    if source.delimiter == "::":
        return data.replace(b"::", b"\x1f"), "\x1f"
    if source.format == "sasrec":
        data = _WS.sub(b" ", data)
        return _EDGE_WS.sub(b"", data), " "
    return data, source.delimiter


def _line_starts(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Start offsets of all lines in ``data`` and a mask of the blank ones."""
    if not data:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    arr = np.frombuffer(data, np.uint8)
    newlines = np.flatnonzero(arr == 10)
    starts = np.concatenate([[0], newlines + 1])
    ends = np.concatenate([newlines, [len(data)]])
    if data.endswith(b"\n"):
        starts, ends = starts[:-1], ends[:-1]
    lengths = ends - starts
    blank = lengths == 0
    cr_only = (lengths == 1)
    if cr_only.any():
        blank |= cr_only & (arr[np.minimum(starts, len(arr) - 1)] == 13)
    return starts.astype(np.int64), blank


def read_split(source: ResolvedSource, split: Split) -> pa.Table:
    """Parse one split into the event schema; bad rows raise or are marked MALFORMED_ROW. Timestamps are in
    seconds (:func:`epoch_seconds`)."""
    table = _read_parquet_split(source, split) if source.format == "parquet" else _read_text_split(source, split)
    if not source.has_timestamp or table.num_rows == 0:
        return table
    stamps = table.column("timestamp").to_numpy(zero_copy_only=False)
    return table.set_column(2, "timestamp", pa.array(epoch_seconds(stamps), pa.float64()))


# A Unix time in seconds reaches 1e11 in the year 5138; in milliseconds 1e11 is 1973-03-03, in microseconds
# 1e14 is 1973 and in nanoseconds 1e17 is 1973. Logs are exported in any of the four (13-digit values are
# milliseconds: Taobao's UserBehavior in ms, Kafka, JavaScript's Date.now()).
_TIME_UNITS = ((1e17, 1e9), (1e14, 1e6), (1e11, 1e3))


def epoch_seconds(stamps: np.ndarray) -> np.ndarray:
    """Unix times in seconds, milliseconds, microseconds or nanoseconds (told apart by magnitude, see
    ``_TIME_UNITS``) -> seconds. NaN (a marked row's missing time) stays NaN."""
    out = np.asarray(stamps, dtype=np.float64).copy()
    done = np.zeros(out.shape, bool)
    for threshold, per_second in _TIME_UNITS:
        big = ~done & (out >= threshold)
        out[big] /= per_second
        done |= big
    return out


_ZONE_SUFFIX = r"\s*(?:UTC|GMT)$"      # "2019-10-01 00:00:00 UTC" (REES46): read as UTC, like a time without zone
TIME_EXPECTED = "a number (Unix time in s, ms, us or ns) or a date-time such as 2019-10-01 00:00:00 UTC"


def parse_times(text: pa.Array) -> np.ndarray:
    """Timestamps read as text -> float64: numbers as they are (:func:`epoch_seconds` tells their unit later),
    ISO 8601 date-times (a trailing ``UTC``, an offset, or none = UTC) as Unix seconds; NaN where a value is
    neither (or missing)."""
    try:
        return pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False)      # all numbers: the common case
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    values = pd.Series(text.to_numpy(zero_copy_only=False), dtype=object)
    seconds = np.array(pd.to_numeric(values, errors="coerce"), np.float64)
    dates = np.isnan(seconds) & values.notna().to_numpy()
    if dates.any():
        stamps = pd.to_datetime(values[dates].str.replace(_ZONE_SUFFIX, "", regex=True), utc=True,
                                errors="coerce", format="ISO8601")
        seconds[dates] = (stamps - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy(np.float64)
    return seconds


def split_bytes(source: ResolvedSource, split: Split) -> tuple[bytes, int]:
    """The data lines of a text split (the header line left out) and the ord of its first byte: what a reader of
    other columns of the same rows (item attributes) needs."""
    data, first = _read_range(source.files[split.file_index], split.start, split.end)
    if source.has_header and split.start == 0:
        cut = data.find(b"\n")
        data, first = (b"", first) if cut < 0 else (data[cut + 1:], first + cut + 1)
    return data, file_ord(source, split) + first


def file_ord(source: ResolvedSource, split: Split) -> int:
    """The ord of byte 0 (text) or row 0 (Parquet) of the split's file: ords of every file stay apart."""
    return (split.file_index + source.file_offset) * _ORD_FILE_STRIDE


def _read_user_lines(source: ResolvedSource, split: Split) -> pa.Table:
    """``user item item ...`` lines (oldest first, no times): one row per item, its ord (and so its time) the
    byte offset of its token, so a user's items keep their line order. A line with a user and no item is a
    ``malformed_row`` (or the error naming it); a blank line a ``blank_line``."""
    data, first = _read_range(source.files[split.file_index], split.start, split.end)
    base_ord = (split.file_index + source.file_offset) * _ORD_FILE_STRIDE + first
    users, items, ords, codes = [], [], [], []
    at = 0
    for raw in data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n"):
        line_at, at = at, at + len(raw) + 1
        tokens = [(m.start(), m.group()) for m in re.finditer(rb"\S+", raw)]
        problem = None
        if not tokens:
            users.append(None), items.append(None), ords.append(base_ord + line_at)
            codes.append(int(DropReason.BLANK_LINE))
            continue
        if len(tokens) < 2:
            problem = "expected 'user item item ...' (a user and at least one item), found one field"
        elif len(raw) > MAX_LINE_BYTES * 64 or any(len(t) > MAX_ID_LENGTH for _, t in tokens):
            problem = "an id longer than 512 characters or a line of over 4 MiB: a broken file?"
        elif not all(t.isdigit() for _, t in tokens):
            problem = f"expected integer ids, found {next(t for _, t in tokens if not t.isdigit())[:40]!r}"
        if problem is not None:
            if source.on_bad_row == "error":
                raise InputError(problem, path=split.path,
                                 line=line_number(source.files[split.file_index], first + line_at))
            users.append(None), items.append(None), ords.append(base_ord + line_at)
            codes.append(int(DropReason.MALFORMED_ROW))
            continue
        user = tokens[0][1].decode(source.encoding, "replace")
        for offset, token in tokens[1:]:
            users.append(user), items.append(token.decode(source.encoding, "replace"))
            ords.append(base_ord + line_at + offset), codes.append(0)
    id_type = source.arrow_id_type
    n = len(ords)
    stamps = np.asarray(ords, np.float64)
    return pa.Table.from_arrays(
        [pa.array(users, pa.string()).cast(id_type), pa.array(items, pa.string()).cast(id_type),
         pa.array(np.where(np.asarray(codes) == 0, stamps, np.nan), pa.float64(), from_pandas=True),
         pa.nulls(n, pa.float64()), pa.array(ords, pa.int64()), pa.array(codes, pa.int8()), pa.nulls(n, pa.string())],
        schema=event_schema(id_type))


def _read_text_split(source: ResolvedSource, split: Split) -> pa.Table:
    if source.format == "user-lines":
        return _read_user_lines(source, split)
    data, first = _read_range(source.files[split.file_index], split.start, split.end)
    skip_header = source.has_header and split.start == 0
    if skip_header:
        cut = data.find(b"\n")
        data = b"" if cut < 0 else data[cut + 1:]
        first += 0 if cut < 0 else cut + 1
    base_ord = (split.file_index + source.file_offset) * _ORD_FILE_STRIDE + first
    starts, blank = _line_starts(data)
    table = _fast_parse(source, data, int((~blank).sum()))
    if table is None:
        return _slow_parse(source, split, data, first, base_ord)
    n = table.num_rows
    ords = base_ord + np.arange(n, dtype=np.int64)
    table = _finish(source, table, ords)
    n_blank = int(blank.sum())
    if n_blank:
        table = pa.concat_tables([table, _marked_rows(source, base_ord + n + np.arange(n_blank), DropReason.BLANK_LINE)])
    return table


def _fast_parse(source: ResolvedSource, data: bytes, expected_rows: int) -> Optional[pa.Table]:
    """pyarrow's CSV reader; ``None`` when the range needs the line-by-line path to explain itself."""
    if expected_rows == 0:
        return _empty_roles(source)
    data, delimiter = _normalise(source, data)
    id_type = source.arrow_id_type
    types = {source.roles["user"]: id_type, source.roles["item"]: id_type}
    if source.has_timestamp:
        types[source.roles["timestamp"]] = pa.string()      # numbers or date-times: parse_times below
    if source.has_rating:
        types[source.roles["rating"]] = pa.float64()
    if source.has_type:
        types[source.roles["type"]] = pa.string()
    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(column_names=source.fields, encoding=source.encoding,
                                           block_size=max(1 << 20, min(len(data) + 1, 1 << 26))),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if source.quoted else False,
                                             ignore_empty_lines=True),
            convert_options=pacsv.ConvertOptions(column_types=types, include_columns=list(types),
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError):
        return None
    if table.num_rows != expected_rows:
        return None
    cols = {role: table.column(name) for role, name in source.roles.items()}
    for role in ("user", "item"):
        col = cols[role]
        if col.null_count:
            return None
        if source.id_kind == "str":
            lengths = pc.utf8_length(col)
            if pc.any(pc.equal(lengths, 0)).as_py() or pc.max(lengths).as_py() > MAX_ID_LENGTH:
                return None
    if source.has_type and pc.any(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(cols["type"])), 0)).as_py():
        return None
    if source.has_timestamp:
        ts = parse_times(cols["timestamp"].combine_chunks())
        if np.isnan(ts).any() or (ts < 0).any() or np.isinf(ts).any():
            return None
        cols["timestamp"] = pa.chunked_array([pa.array(ts, pa.float64())])
    if source.has_rating:
        r = cols["rating"]
        if r.null_count or pc.any(pc.is_nan(r)).as_py():
            return None
    return pa.table({role: cols[role].combine_chunks() for role in cols})


def _empty_roles(source: ResolvedSource) -> pa.Table:
    id_type = source.arrow_id_type
    cols = {"user": pa.array([], id_type), "item": pa.array([], id_type)}
    if source.has_timestamp:
        cols["timestamp"] = pa.array([], pa.float64())
    if source.has_rating:
        cols["rating"] = pa.array([], pa.float64())
    if source.has_type:
        cols["type"] = pa.array([], pa.string())
    return pa.table(cols)


def _finish(source: ResolvedSource, table: pa.Table, ords: np.ndarray) -> pa.Table:
    n = table.num_rows
    ts = table.column("timestamp") if source.has_timestamp else pa.array(ords.astype(np.float64))
    rating = table.column("rating") if source.has_rating else pa.nulls(n, pa.float64())
    kind = pc.utf8_trim_whitespace(table.column("type")) if source.has_type else pa.nulls(n, pa.string())
    return pa.Table.from_arrays(
        [table.column("user"), table.column("item"), ts, rating, pa.array(ords, pa.int64()),
         pa.array(np.zeros(n, np.int8)), kind],
        schema=event_schema(source.arrow_id_type))


def _marked_rows(source: ResolvedSource, ords: np.ndarray, reason: DropReason) -> pa.Table:
    n = len(ords)
    id_type = source.arrow_id_type
    return pa.Table.from_arrays(
        [pa.nulls(n, id_type), pa.nulls(n, id_type), pa.nulls(n, pa.float64()), pa.nulls(n, pa.float64()),
         pa.array(np.asarray(ords, np.int64)), pa.array(np.full(n, int(reason), np.int8)), pa.nulls(n, pa.string())],
        schema=event_schema(id_type))


def _split_fields(source: ResolvedSource, text: str) -> list[str]:
    if source.format == "sasrec":
        return text.split()
    if source.delimiter == "::":
        return text.split("::")
    if source.quoted:
        return next(csv.reader([text], delimiter=source.delimiter))
    return text.split(source.delimiter)


def _slow_parse(source: ResolvedSource, split: Split, data: bytes, first: int, base_ord: int) -> pa.Table:
    """Line-by-line parse that names the first bad line (error mode) or marks bad rows (skip mode)."""
    users, items, stamps, ratings, ords, codes, kinds = [], [], [], [], [], [], []
    index = {name: i for i, name in enumerate(source.fields)}
    offset = first
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines = lines[:-1]
    dated: list[tuple[int, int]] = []          # (row, line offset) of timestamps given as text, parsed together

    def check_dates() -> None:
        """Date-time strings, parsed in one call (one at a time costs ~1 ms each): a bad one is a bad row."""
        parsed = parse_times(pa.array([stamps[r] for r, _ in dated], pa.string())) if dated else []
        for (r, at), value in zip(dated, parsed):
            if value == value and value >= 0:
                stamps[r] = float(value)
                continue
            message = f"expected {TIME_EXPECTED}, got {str(stamps[r])[:40]!r}"
            if source.on_bad_row == "error":
                raise InputError(message, path=split.path, line=line_number(source.files[split.file_index], at),
                                 field=source.roles["timestamp"])
            users[r] = items[r] = stamps[r] = ratings[r] = kinds[r] = None
            codes[r] = int(DropReason.MALFORMED_ROW)
        dated.clear()

    for row, raw in enumerate(lines):
        line_offset, offset = offset, offset + len(raw) + 1
        problem = _check_line(source, raw, index)
        ords.append(base_ord + row)
        if isinstance(problem, _Bad):
            field, message = problem.field, problem.message
            if source.on_bad_row == "error":
                check_dates()                 # an earlier line's bad date-time is the first error
                raise InputError(message, path=split.path, line=line_number(source.files[split.file_index], line_offset), field=field)
            users.append(None), items.append(None), stamps.append(None), ratings.append(None), kinds.append(None)
            codes.append(int(DropReason.MALFORMED_ROW))
            continue
        if problem is None:  # blank line
            users.append(None), items.append(None), stamps.append(None), ratings.append(None), kinds.append(None)
            codes.append(int(DropReason.BLANK_LINE))
            continue
        user, item, stamp, rating, kind = problem
        users.append(user), items.append(item), ratings.append(rating), kinds.append(kind)
        if isinstance(stamp, str):
            dated.append((row, line_offset))
        stamps.append(float(base_ord + row) if stamp is None else stamp)
        codes.append(0)
    check_dates()
    id_type = source.arrow_id_type
    return pa.Table.from_arrays(
        [pa.array(users, id_type), pa.array(items, id_type), pa.array(stamps, pa.float64()),
         pa.array(ratings, pa.float64()), pa.array(ords, pa.int64()), pa.array(codes, pa.int8()),
         pa.array(kinds, pa.string())],
        schema=event_schema(id_type))


@dataclasses.dataclass(frozen=True)
class _Bad:
    field: Optional[str]
    message: str


def _check_line(source: ResolvedSource, raw: bytes, index: dict[str, int]):
    """Parsed ``(user, item, timestamp, rating, type)``, ``None`` for a blank line, or a :class:`_Bad`."""
    if len(raw) > MAX_LINE_BYTES:
        return _Bad(None, f"a line of {len(raw):,} bytes (at most {MAX_LINE_BYTES:,} for one interaction): "
                          f"a missing line break or a broken file? starts {raw[:40]!r}")
    try:
        text = raw.decode(source.encoding).rstrip("\r")
    except UnicodeDecodeError:
        return None if not raw.strip() else _Bad(None, f"not valid {source.encoding} text (binary data, or set source.encoding)")
    if not text.strip():
        return None
    if "\x00" in text:
        return _Bad(None, "contains NUL bytes: binary data, expected text lines")
    try:
        fields = _split_fields(source, text)
    except csv.Error as exc:
        return _Bad(None, f"cannot split the line into fields ({exc}): {text[:80]!r}")
    if len(fields) != len(source.fields):
        return _Bad(None, f"expected {len(source.fields)} fields ({', '.join(source.fields)}) separated by "
                          f"{source.describe_sep()}, found {len(fields)}: {text[:80]!r}")
    values = {}
    for role, name in source.roles.items():
        value = fields[index[name]].strip()
        if role in ("user", "item"):
            if not value:
                return _Bad(name, f"expected a non-empty {role} id")
            if len(value) > MAX_ID_LENGTH:
                return _Bad(name, f"a {role} id of {len(value):,} characters (at most {MAX_ID_LENGTH}): "
                                  f"a broken line or a wrong separator? {value[:40]!r}...")
            if source.id_kind == "int":
                try:
                    values[role] = int(value)
                except ValueError:
                    return _Bad(name, f"expected an integer {role} id, got {value[:40]!r}")
            else:
                values[role] = value
        elif role == "type":
            if not value:
                return _Bad(name, "expected a non-empty event type")
            values[role] = value
        elif role == "timestamp":
            try:
                number = float(value)
            except ValueError:
                values[role] = value          # a date-time string, parsed with the split's others (_slow_parse)
                continue
            if number != number or number in (float("inf"), float("-inf")):
                return _Bad(name, f"expected a finite number, got {value[:40]!r}")
            if number < 0:
                return _Bad(name, f"expected a non-negative timestamp, got {value[:40]!r}")
            values[role] = number
        else:
            try:
                number = float(value)
            except ValueError:
                return _Bad(name, f"expected a number, got {value[:40]!r}")
            if number != number or number in (float("inf"), float("-inf")):
                return _Bad(name, f"expected a finite number, got {value[:40]!r}")
            if role == "timestamp" and number < 0:
                return _Bad(name, f"expected a non-negative timestamp, got {value[:40]!r}")
            values[role] = number
    return values["user"], values["item"], values.get("timestamp"), values.get("rating"), values.get("type")


def _read_parquet_split(source: ResolvedSource, split: Split) -> pa.Table:
    columns = list(dict.fromkeys(source.roles.values()))
    try:
        with source.files[split.file_index].open() as handle:
            table = pq.ParquetFile(handle).read_row_group(split.row_group, columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"cannot read row group {split.row_group} ({exc})", path=split.path) from None
    n = table.num_rows
    ords = (split.file_index + source.file_offset) * _ORD_FILE_STRIDE + split.row_offset + np.arange(n, dtype=np.int64)
    cols = {}
    for role, name in source.roles.items():
        col = table.column(name)
        if role in ("user", "item"):
            target = source.arrow_id_type
            if pa.types.is_floating(col.type) or not (pa.types.is_integer(col.type) or pa.types.is_string(col.type)
                                                        or pa.types.is_large_string(col.type)):
                raise InputError(f"expected integer or string ids, found type {col.type}", path=split.path, field=name)
            col = col.cast(pa.string()) if target == pa.string() else col
            if pa.types.is_string(col.type) and target == pa.int64():
                raise InputError("expected integer ids, found strings", path=split.path, field=name)
            col = col.cast(target)
        elif role == "timestamp" and pa.types.is_timestamp(col.type):
            col = pc.divide(pc.cast(pc.cast(col, pa.timestamp("us")), pa.int64()), 1e6)
        elif role == "timestamp" and (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            col = pa.array(parse_times(col.combine_chunks().cast(pa.string())), pa.float64(), from_pandas=True)
        elif role == "type":
            col = col.cast(pa.string())
        else:
            if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
                raise InputError(f"expected a numeric column, found type {col.type}", path=split.path, field=name)
            col = col.cast(pa.float64())
        cols[role] = col.combine_chunks()
    bad = np.zeros(n, bool)
    reasons = {}
    for role, col in cols.items():
        isnull = col.is_null().to_numpy(zero_copy_only=False)
        bad |= isnull
        if isnull.any():
            reasons.setdefault(role, ("missing value", int(np.flatnonzero(isnull)[0])))
        if role == "timestamp":
            neg = pc.fill_null(pc.less(col, 0), False).to_numpy(zero_copy_only=False)
            bad |= neg
            if neg.any():
                reasons.setdefault(role, ("expected a non-negative timestamp", int(np.flatnonzero(neg)[0])))
    if bad.any() and source.on_bad_row == "error":
        role, (message, row) = min(reasons.items(), key=lambda kv: kv[1][1])
        raise InputError(f"{message} in row {split.row_offset + row + 1}", path=split.path, field=source.roles[role])
    result = _finish(source, pa.table(cols), ords)
    if bad.any():
        codes = np.where(bad, int(DropReason.MALFORMED_ROW), 0).astype(np.int8)
        result = result.set_column(5, "drop_code", pa.array(codes))
    return result


# ----------------------------------------------------------------------------------------------
# Item metadata (small files, read on the driver)
# ----------------------------------------------------------------------------------------------

ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def read_item_metadata(source: ResolvedSource, cfg: SourceConfig) -> Optional[pd.DataFrame]:
    """``item_id`` (as str), ``title``, ``categories`` ('|'-joined) from the source's item file, if any."""
    if source.items_path is None:
        return None
    location = source.items_path
    _require_file(location, "item metadata file")
    if location.suffix == ".json":          # S3-Rec's item2attributes.json: attributes only (prepare.item_features)
        return None
    with location.open() as handle:
        path = io.BytesIO(handle.read())    # item metadata is small; pandas reads it from memory
    try:
        if source.format == "ml-1m":
            frame = pd.read_csv(path, sep="::", engine="python", names=["item_id", "title", "categories"],
                                encoding="latin-1", dtype=str, quoting=csv.QUOTE_NONE)
        elif source.format == "ml-100k":
            frame = pd.read_csv(path, sep="|", header=None, encoding="latin-1", dtype=str, quoting=csv.QUOTE_NONE)
            flags = frame.iloc[:, 5:5 + len(ML100K_GENRES)].to_numpy() == "1"
            genres = ["|".join(g for g, f in zip(ML100K_GENRES, row) if f) for row in flags]
            frame = pd.DataFrame({"item_id": frame[0], "title": frame[1], "categories": genres})
        elif source.format == "recbole":
            frame = pd.read_csv(path, sep="\t", dtype=str, encoding=source.encoding, quoting=csv.QUOTE_NONE,
                                keep_default_na=False)
            frame.columns = [c.split(":", 1)[0] for c in frame.columns]
            title = next((c for c in ("movie_title", "title", "name") if c in frame.columns), None)
            cats = next((c for c in ("class", "genre", "genres", "categories", "category") if c in frame.columns), None)
            if source.roles["item"] not in frame.columns:
                raise InputError(f"column '{source.roles['item']}' not found; the columns are {list(frame.columns)}",
                                 path=str(location), line=1)
            frame = pd.DataFrame({
                "item_id": frame[source.roles["item"]],
                "title": frame[title] if title else None,
                "categories": frame[cats].str.split().str.join("|") if cats else None,
            })
        else:
            frame = (pd.read_parquet(path) if location.suffix == ".parquet"
                     else pd.read_csv(path, sep=source.delimiter or ",", dtype=str, encoding=source.encoding,
                                      keep_default_na=False))
            item_col = cfg.item_col if cfg.item_col in frame.columns else frame.columns[0]
            frame = pd.DataFrame({
                "item_id": frame[item_col].astype(str),
                "title": frame[cfg.title_col] if cfg.title_col in frame.columns else None,
                "categories": frame[cfg.categories_col] if cfg.categories_col in frame.columns else None,
            })
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot parse item metadata ({exc})", path=str(location)) from None
    frame["item_id"] = frame["item_id"].astype(str).str.strip()
    return frame.drop_duplicates("item_id", keep="first").reset_index(drop=True)

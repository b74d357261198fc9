"""``raysrec prepare``: raw interaction log -> sharded per-user sequences, on Ray Data.

Stages (each distributed; the driver only ever holds vocabularies and per-shard counters):

1. **read**: every input file is cut into byte ranges / row groups; Ray Data tasks parse them
   (:func:`raysrec.data.sources.read_split`), mark low ratings and add the user's shard number.
2. **group**: ``groupby(shard).map_groups`` sends all events of a user to one task, which drops
   marked rows and exact duplicates, sorts by (timestamp, input order) and returns the shard's
   per-user sequences as one Parquet blob; the grouped dataset is materialized in Ray's object
   store, so the next stages read it on whichever node they run (no node-local stage folder).
3. **filter**: per-shard tasks count items after the item/user k-core and minimum-length
   filters; the driver iterates until the k-core is stable and builds the item vocabulary.
4. **finalize**: per-shard tasks map ids to dense indices and truncate; the driver streams the
   finished shards into ``sequences/part-NNNNN.parquet`` (one row per user, sorted by
   ``user_index``), one at a time.

Inputs and the output may be local paths or pyarrow URIs (``s3://``, ``gs://``, ...): tasks read
byte ranges of the input through its filesystem. A local output is written to a temporary
sibling and renamed into place; a URI output is written data first and ``manifest.json`` last.

Item index: items are numbered 1..N in the natural order of their original ids (numbers
numerically, strings lexicographically); 0 is padding. Users are numbered 0..U-1 the same way.
A failed run never leaves an output that looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import raysrec
from raysrec.config import Config, check, option, redact, redact_tree
from raysrec.data import attributes, transforms
from raysrec.data.sources import (
    DropReason,
    ResolvedSource,
    SourceConfig,
    check_head,
    file_ord,
    plan_splits,
    read_item_metadata,
    read_split,
    resolve_source,
    split_bytes,
    with_event_log,
)
from raysrec.data.split import SplitConfig, SplitSpec
from raysrec.errors import InputError
from raysrec.files import Location, publish, publish_dir

log = logging.getLogger(__name__)

SEQUENCES_DIR = "sequences"
ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"          # with prepare.user_features: each user's attribute tokens
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "prepare_config.yaml"


@dataclasses.dataclass
class PrepareConfig(Config):
    """Configuration of ``raysrec prepare``; saved as ``prepare_config.yaml`` in the output."""

    source: SourceConfig = dataclasses.field(default_factory=SourceConfig)
    output: str = option("", 'output folder (written atomically)')
    min_rating: Optional[float] = option(None, 'drop interactions rated below this')
    item_k_core: int = option(0, 'keep items with at least this many interactions')
    user_k_core: int = option(0, 'keep users with at least this many interactions')
    min_sequence_length: int = option(3, 'drop users with fewer events (leave-one-out needs 3, global_time 1)')
    max_sequence_length: Optional[int] = option(None, "keep each user's newest N events (prepare's truncation, not the model window)")
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    item_features: Optional[list[str]] = option(None, "item attributes, COLUMN[:KIND] with KIND category (default), "
                                                      "multi ('|'-separated), path (a.b.c) or numeric (quantile "
                                                      "buckets); from the items file, else the event rows")
    user_features: Optional[list[str]] = option(None, "user attributes, COLUMN[:KIND] (kinds as item_features), "
                                                      "from the users file (source.users_path, --users; a RecBole "
                                                      "folder's .user file)")
    types: Optional[list[str]] = option(None, "keep only these event types (values of source.type_col, e.g. buy "
                                              "cart); the others are counted under type_not_selected")
    event_log: Optional[str] = option(None, "the live service's event log (raysrec events export), read beside the "
                                            "source: the nightly retrain learns what the service saw")
    num_shards: int = option(8, 'sequence shard files (training workers read them in parallel)')
    split_bytes: int = 32 << 20
    overwrite: bool = option(False, 'replace an existing output folder')

    def validate(self) -> None:
        check(bool(self.output), "prepare.output: an output folder is required")
        if self.split.protocol == "leave_one_out":
            check(self.min_sequence_length >= 3, "prepare.min_sequence_length must be >= 3 (leave-one-out needs a "
                                                 "train item, a valid and a test target)")
        check(self.min_sequence_length >= 1, "prepare.min_sequence_length must be >= 1")
        self.split.validate()
        check(self.max_sequence_length is None or self.max_sequence_length >= self.min_sequence_length,
              "prepare.max_sequence_length must be >= min_sequence_length")
        check(self.item_k_core >= 0 and self.user_k_core >= 0, "prepare k-core values must be >= 0")
        check(1 <= self.num_shards <= 4096, "prepare.num_shards must be in [1, 4096]")
        check(self.types is None or bool(self.source.type_col),
              "prepare.types selects event types: it needs source.type_col (--type-col), the column that holds them")
        check(self.split_bytes >= 1024, "prepare.split_bytes must be >= 1024")


# ----------------------------------------------------------------------------------------------
# Per-task functions (run inside Ray Data tasks; pure apart from their own shard files)
# ----------------------------------------------------------------------------------------------

def _parse_splits(batch: pa.Table, sources: list[ResolvedSource], min_rating: Optional[float], num_shards: int
                  ) -> pa.Table:
    from raysrec.data.sources import Split  # noqa: PLC0415 (keeps the task's closure small)

    tables = []
    for row in batch.to_pylist():
        split = Split(**row)
        source = sources[split.source_index]
        table = read_split(source, split)
        table = transforms.mark_low_ratings(table, min_rating)
        shard = transforms.shard_of(table.column("user").fill_null(0 if source.id_kind == "int" else ""), num_shards)
        tables.append(table.append_column("shard", pa.array(shard)))
    return pa.concat_tables(tables)


def _to_blob(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _from_blob(blob: bytes) -> pa.Table:
    return pq.read_table(pa.BufferReader(blob))


def _group_shard(events: pd.DataFrame, types: Optional[list[str]], with_types: bool) -> pd.DataFrame:
    shard = int(events["shard"].iloc[0])
    sequences, counts, per_type = transforms.group_user_sequences(events, types, with_types)
    return pd.DataFrame({"shard": [shard], "counts": [json.dumps(counts)], "type_counts": [json.dumps(per_type)],
                         "sequences": [_to_blob(sequences)]})


def _shard_times(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    table = _from_blob(batch["sequences"][0])
    times = pc.list_flatten(table.column("timestamps")).to_numpy(zero_copy_only=False) if table.num_rows else []
    return {"times": [np.asarray(times, np.float64)]}


def _filter_shard(batch: dict[str, np.ndarray], allowed: Optional[pa.Array], user_k: int,
                  min_length: int, train_before: Optional[float]) -> dict[str, Any]:
    shard = int(batch["shard"][0])
    table = _from_blob(batch["sequences"][0])
    table, _ = transforms.filter_sequences(table, allowed, user_k, min_length, train_before)
    counts = transforms.item_counts(table, train_before)
    return {"shard": [shard], "item_ids": [counts.index.to_numpy()], "item_counts": [counts.to_numpy()],
            "users": [table.column("user").to_numpy(zero_copy_only=False)]}


def _finalize_shard(batch: dict[str, np.ndarray], allowed: Optional[pa.Array],
                    user_k: int, min_length: int, item_vocab: pd.Index, user_vocab: pd.Index,
                    max_length: Optional[int], users_as_int: bool, split: SplitSpec,
                    type_vocab: Optional[pd.Index]) -> dict[str, Any]:
    shard = int(batch["shard"][0])
    table = _from_blob(batch["sequences"][0])
    train_before = split.valid_from if split.protocol == "global_time" else None
    table, counts = transforms.filter_sequences(table, allowed, user_k, min_length, train_before)
    final, truncated = transforms.finalize_sequences(table, item_vocab, user_vocab, max_length, type_vocab)
    counts.update(truncated)
    if users_as_int:
        final = final.set_column(1, "user_id", final.column("user_id").cast(pa.int64()))
    name = f"part-{shard:05d}.parquet"
    flat = np.concatenate(final.column("sequence").to_numpy(zero_copy_only=False)) if final.num_rows else np.zeros(0, np.int32)
    item_count = np.bincount(flat, minlength=len(item_vocab) + 1)
    lengths = np.diff(final.column("sequence").combine_chunks().offsets.to_numpy()) if final.num_rows else np.zeros(0)
    times = pc.list_flatten(final.column("timestamps")).to_numpy(zero_copy_only=False) \
        if final.num_rows else np.zeros(0, np.float64)
    # the training events' count per item (the sampled softmax's popularity proposal must not see held-out events)
    per_user = lengths.astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(per_user)])
    train_end = split.positions(offsets, times).train_end                  # per user: events before it train
    in_train = np.arange(len(flat)) - np.repeat(offsets[:-1], per_user) < np.repeat(train_end, per_user)
    train_count = np.bincount(flat[in_train], minlength=len(item_vocab) + 1)
    if split.protocol != "global_time":
        times = np.zeros(0, np.float64)
    type_count = np.zeros(0 if type_vocab is None else len(type_vocab) + 1, np.int64)
    if type_vocab is not None and final.num_rows:
        type_count = np.bincount(pc.list_flatten(final.column("types")).to_numpy(zero_copy_only=False),
                                 minlength=len(type_vocab) + 1)
    return {"shard": [shard], "file": [name if final.num_rows else ""], "counts": [json.dumps(counts)],
            "type_count": [type_count],
            "item_count": [item_count], "train_count": [train_count], "lengths": [lengths.astype(np.int64)],
            "times": [times.astype(np.float64)],
            "data": [_to_blob(final) if final.num_rows else b""]}


def _attribute_splits(batch: pa.Table, source: ResolvedSource, columns: list[str]) -> pd.DataFrame:
    """The newest sighting of each (item, attribute column, value) in these splits of the event rows."""
    from raysrec.data.sources import Split  # noqa: PLC0415

    parts = []
    item_col, time_col = source.roles["item"], source.roles.get("timestamp")
    for row in batch.to_pylist():
        split = Split(**row)
        if source.format == "parquet":
            with source.files[split.file_index].open() as handle:
                table = pq.ParquetFile(handle).read_row_group(
                    split.row_group, columns=list(dict.fromkeys([item_col] + ([time_col] if time_col else []) + columns)))
            parts.append(attributes.observations(table, item_col, time_col, columns,
                                                 file_ord(source, split) + split.row_offset))
            continue
        data, first_ord = split_bytes(source, split)
        parts.append(attributes.split_attributes(data, source.fields, item_col, time_col, columns, source.delimiter,
                                                 source.encoding, first_ord))
    return pd.concat(parts, ignore_index=True)


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------

def _ids_array(values: np.ndarray, id_kind: str) -> pa.Array:
    return pa.array(values, pa.int64() if id_kind == "int" else pa.string())


def check_inputs(cfg: PrepareConfig) -> ResolvedSource:
    """What can be checked without Ray (the input's files, format, header and columns; an existing output):
    the CLI calls this before Ray starts, so a wrong path fails in a second."""
    source = resolve_source(cfg.source)
    check_head(source)
    if cfg.split.protocol == "global_time" and not source.has_timestamp:
        raise InputError("prepare.split.protocol global_time needs a timestamp column, and this source has none "
                         "(set source.time_col)", path=cfg.source.path)
    if cfg.event_log:
        with_event_log(source, cfg.event_log)
    attribute_sources(cfg, source)
    user_attributes(cfg, source)
    out = Location.of(cfg.output) if "://" in cfg.output else Path(cfg.output).resolve()
    if out.exists() and not cfg.overwrite:
        raise InputError("output folder exists; pass --overwrite to replace it", path=str(out))
    return source


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Run the whole preparation on the current Ray cluster; returns the manifest."""
    import ray  # noqa: PLC0415

    started = time.time()
    source = check_inputs(cfg)
    remote = "://" in cfg.output
    out = Location.of(cfg.output) if remote else Path(cfg.output).resolve()
    # The output is assembled in a local temporary folder on the driver (nothing else reads it), then renamed
    # into place or, for a URI, published with its manifest last.
    if remote:
        tmp = Path(tempfile.mkdtemp(prefix="raysrec-prepare-")) / "prepared"
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    (tmp / SEQUENCES_DIR).mkdir(parents=True)
    context = ray.data.DataContext.get_current()
    shuffle = context.shuffle_strategy
    try:
        manifest = _run(cfg, source, tmp, ray)
        manifest["shuffle"] = context.shuffle_strategy.value    # the group stage's (see TASK_SHUFFLE_MAX_SPLITS)
        manifest["seconds"] = round(time.time() - started, 3)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        if remote:
            publish(tmp, cfg.output, last=(MANIFEST_FILE,))
        else:
            publish_dir(tmp, out)
    finally:
        context.shuffle_strategy = shuffle       # the driver's own, for what it runs next
        shutil.rmtree(tmp.parent if remote else tmp, ignore_errors=True)
    return manifest


def _items_file_attributes(cfg: PrepareConfig, source: ResolvedSource) -> Optional[pd.DataFrame]:
    if source.items_path is None or not cfg.item_features or not source.items_path.is_file():
        return None
    if source.format in ("ml-1m", "ml-100k", "recbole"):     # their own item files: title and categories (genres)
        meta = read_item_metadata(source, cfg.source)
        return None if meta is None else meta.drop(columns="title").fillna("")
    with source.items_path.open() as handle:
        data = handle.read()      # item files are small; read on the driver
    specs = [attributes.FeatureSpec.parse(f) for f in cfg.item_features]
    sep = cfg.source.sep or ("\t" if source.items_path.suffix in (".tsv", ".item") else ",")
    return attributes.read_attribute_table(data, str(source.items_path), cfg.source.item_col,
                                           [s.column for s in specs], sep, cfg.source.encoding)


def attribute_sources(cfg: PrepareConfig, source: ResolvedSource) -> tuple[dict[str, str], Optional[pd.DataFrame]]:
    """Where each item attribute is read: ``items`` (the items file has the column) or ``events`` (the event rows
    do), and the items file's attributes (read once); a column in neither fails here, before Ray starts."""
    if not cfg.item_features:
        return {}, None
    specs = [attributes.FeatureSpec.parse(f) for f in cfg.item_features]
    items = _items_file_attributes(cfg, source)
    in_items = set(items.columns) - {"item_id"} if items is not None else set()
    found = {}
    for spec in specs:
        if spec.column in in_items:
            found[spec.column] = "items"
        elif spec.column in source.fields and source.format in ("csv", "parquet"):
            found[spec.column] = "events"
        else:
            where = f"the items file {source.items_path} has {sorted(in_items)}" if items is not None else \
                "there is no items file (--items)"
            raise InputError(f"prepare.item_features: column '{spec.column}' is in neither the items nor the event "
                             f"rows ({where}; the event rows have {source.fields})", path=cfg.source.path)
    return found, items


def users_file(cfg: PrepareConfig, source: ResolvedSource) -> Optional[Location]:
    """The users file: ``source.users_path``, else a RecBole folder's ``<name>.user`` beside its ``.inter``."""
    if cfg.source.users_path:
        return Location.of(cfg.source.users_path)
    if source.format == "recbole" and source.files and source.files[0].with_suffix(".user").is_file():
        return source.files[0].with_suffix(".user")
    return None


def user_attributes(cfg: PrepareConfig, source: ResolvedSource) -> tuple[Optional[Location], Optional[pd.DataFrame]]:
    """The users file and its ``prepare.user_features`` columns (``user_id`` + str values; read on the driver: a
    users file is a table, not a log). A missing file or column fails here, before Ray starts."""
    if not cfg.user_features:
        return None, None
    specs = [attributes.FeatureSpec.parse(f) for f in cfg.user_features]
    location = users_file(cfg, source)
    if location is None or not location.is_file():
        raise InputError("prepare.user_features needs a users file with those columns (--users FILE)",
                         path=str(location) if location is not None else cfg.source.path)
    with location.open() as handle:
        data = handle.read()
    sep = cfg.source.sep or ("\t" if location.suffix in (".tsv", ".user") else ",")
    frame = attributes.read_attribute_table(data, str(location), cfg.source.user_col, [s.column for s in specs],
                                            sep, cfg.source.encoding, key="user_id")
    missing = [s.column for s in specs if s.column not in frame.columns]
    if missing:
        raise InputError(f"prepare.user_features: column(s) {missing} not in the users file (it has "
                         f"{[c for c in frame.columns if c != 'user_id']} besides the user column)", path=str(location))
    return location, frame


def _user_features(cfg: PrepareConfig, source: ResolvedSource, user_vocab: pd.Index
                   ) -> tuple[list[dict[str, Any]], Optional[dict[str, Any]]]:
    """Each ``prepare.user_features`` column encoded for the users of the vocabulary (as item attributes), and
    the manifest's ``users_file`` entry: its rows, and the data's users it has no row for."""
    location, frame = user_attributes(cfg, source)
    if frame is None:
        return [], None
    keys = pd.Index([str(u) for u in user_vocab.to_numpy()])
    frame = frame.set_index("user_id")
    out = []
    for spec in (attributes.FeatureSpec.parse(f) for f in cfg.user_features or []):
        series = frame[spec.column]
        tokens, vocab = attributes.encode(series.mask(series.str.strip() == "").reindex(keys), spec.kind)
        out.append({"name": spec.column, "kind": spec.kind, "vocabulary": vocab,
                    "users_with_value": int(sum(1 for t in tokens if t)), "tokens": tokens})
    matched = int(keys.isin(frame.index).sum())
    return out, {"path": str(location), "rows": int(len(frame)), "users_with_a_row": matched,
                 "users_without_a_row": int(len(keys) - matched)}


def _write_users(out: Path, user_vocab: pd.Index, users_as_int: bool, features: list[dict[str, Any]]) -> None:
    """``users.parquet``: user index (as in the shards), original id and each user attribute's tokens."""
    ids = transforms.ids_as_ints_if_possible(user_vocab.to_numpy()) if users_as_int else user_vocab.to_numpy()
    table = pa.table({"user_index": pa.array(np.arange(len(ids), dtype=np.int32)),
                      "user_id": _ids_array(ids, "int" if np.asarray(ids).dtype.kind in "iu" else "str")})
    for feature in features:
        table = table.append_column(attributes.COLUMN_PREFIX + feature["name"],
                                    pa.array(feature["tokens"], pa.list_(pa.int32())))
    pq.write_table(table, out / USERS_FILE)


def _unwrap(exc: BaseException) -> BaseException:
    """Find a user-facing error inside Ray's task-error wrappers."""
    seen = exc
    while seen is not None:
        if isinstance(seen, InputError):
            return seen
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else seen.__cause__
    # Ray Data re-raises a UDF's error as UserCodeException, and the original does not always survive
    # pickling across processes; its one-line message is still in the task's traceback text.
    found = re.findall(r"raysrec\.errors\.InputError: ([^\n]+)", str(exc))
    return InputError(found[-1]) if found else exc


# Up to this many input splits (~32 MB of text or a Parquet row group each), the group stage shuffles with tasks
# (Ray Data's sort-based pull shuffle) instead of Ray's default, which starts aggregator actors for every run: on
# a small log those actors' start-up was most of prepare's time (bench/prepare_shuffle.py, docs/benchmarks.md).
TASK_SHUFFLE_MAX_SPLITS = 16


def _choose_shuffle(ray, num_splits: int) -> None:
    """Set the group stage's shuffle for the datasets this prepare builds (each takes a copy of the driver's
    DataContext when it is created; the caller restores the driver's own after the run)."""
    from ray.data.context import ShuffleStrategy  # noqa: PLC0415

    if num_splits <= TASK_SHUFFLE_MAX_SPLITS:
        ray.data.DataContext.get_current().shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED


def _run(cfg: PrepareConfig, source: ResolvedSource, tmp: Path, ray) -> dict[str, Any]:
    sources = [source]
    if cfg.event_log:
        source, log_source = with_event_log(source, cfg.event_log)
        sources = [source, log_source]
    splits = plan_splits(source, cfg.split_bytes)
    main_splits = list(splits)            # the source's own (item attributes are read from its rows)
    if cfg.event_log:
        splits += [dataclasses.replace(s, source_index=1) for s in plan_splits(log_source, cfg.split_bytes)]
    if not splits:
        raise InputError("no data to read", path=cfg.source.path)
    # 1 + 2: read, parse and group by user shard.
    _choose_shuffle(ray, len(splits))
    ds = ray.data.from_items([dataclasses.asdict(s) for s in splits], override_num_blocks=len(splits))
    events = ds.map_batches(_parse_splits, batch_size=1, batch_format="pyarrow",
                            fn_kwargs={"sources": sources, "min_rating": cfg.min_rating, "num_shards": cfg.num_shards})
    grouped = events.groupby("shard", num_partitions=min(cfg.num_shards, max(2, len(splits)))).map_groups(
        _group_shard, batch_format="pandas", fn_kwargs={"types": cfg.types, "with_types": source.has_type})
    try:
        grouped = grouped.materialize()     # the shards' sequences, in the object store
        group_stats = grouped.select_columns(["shard", "counts", "type_counts"]).take_all()
    except Exception as exc:  # Ray wraps task errors; surface the user-facing one
        err = _unwrap(exc)
        if err is not exc:
            raise err from None
        raise
    counts: Counter = Counter()
    types_read: Counter = Counter()
    for row in group_stats:
        counts.update(json.loads(row["counts"]))
        types_read.update(json.loads(row["type_counts"]))
    rows_read = sum(counts.values())
    type_vocab = _type_vocabulary(cfg, types_read) if source.has_type else None
    if counts["kept"] == 0:
        hint = ("; --on-bad-row error names the first malformed line and field" if counts["malformed_row"] else "")
        raise InputError(f"no interaction left after reading and cleaning ({dict(+counts)}); check the "
                         f"separator, the rating filter and the id and time columns{hint}", path=cfg.source.path)
    shard_ds = grouped

    # 3a: a global time split's cuts come first, from the times of every cleaned event, so that the filters and
    # the vocabulary below can see the training period only.
    split = SplitSpec()
    if cfg.split.protocol == "global_time":
        all_times = [r["times"] for r in shard_ds.map_batches(_shard_times, batch_size=1).take_all()]
        split = SplitSpec("global_time", *cfg.split.cuts(np.concatenate(all_times)))
        del all_times
    train_before = split.valid_from if split.protocol == "global_time" else None

    # 3b: k-core / minimum length, iterated to a fixed point on the item set. Under a global time split the item
    # k-core, the user k-core and the vocabulary count training events only (Ji et al., TOIS 2023: filters that
    # see the test period leak it): an item first seen after the cut is not in the vocabulary.
    user_k = cfg.user_k_core
    min_length = cfg.min_sequence_length
    allowed: Optional[pa.Array] = None
    for _ in range(100):
        rows = shard_ds.map_batches(_filter_shard, batch_size=1, fn_kwargs={
            "allowed": allowed, "user_k": user_k, "min_length": min_length, "train_before": train_before}).take_all()
        per_shard = [pd.Series(r["item_counts"], index=r["item_ids"]) for r in rows if len(r["item_ids"])]
        if not per_shard:
            break
        totals = pd.concat(per_shard).groupby(level=0).sum()
        keep = totals[totals >= max(cfg.item_k_core, 1)].index.to_numpy()
        if len(keep) == len(totals) or (cfg.item_k_core <= 1 and train_before is None):
            break
        allowed = _ids_array(keep, source.id_kind)
    users = np.concatenate([r["users"] for r in rows])
    if len(users) == 0:
        kept_before = counts["kept"]
        raise InputError(f"no user left after filtering: {kept_before} events survived cleaning, but no user has "
                         f"at least {max(min_length, user_k)} interactions (min_sequence_length/user_k_core) "
                         "with items passing item_k_core", path=cfg.source.path)
    item_vocab, _ = _vocabulary(totals.index.to_numpy(), source.id_auto)
    user_vocab, users_as_int = _vocabulary(users, source.id_auto)

    # 4: dense indices, truncation, final shards.
    rows, times_parts = [], []
    for row in shard_ds.map_batches(_finalize_shard, batch_size=1, fn_kwargs={
            "allowed": allowed, "user_k": user_k, "min_length": min_length, "item_vocab": item_vocab,
            "user_vocab": user_vocab, "max_length": cfg.max_sequence_length, "users_as_int": users_as_int,
            "split": split, "type_vocab": type_vocab}).iter_rows():
        if row["file"]:        # streamed: the driver holds one finished shard at a time
            (tmp / SEQUENCES_DIR / row["file"]).write_bytes(row["data"])
        rows.append({k: v for k, v in row.items() if k not in ("data", "times")})
        times_parts.append(row["times"])
    final_counts: Counter = Counter()
    for row in rows:
        final_counts.update(json.loads(row["counts"]))
    item_count = np.sum([r["item_count"] for r in rows], axis=0)
    train_count = np.sum([r["train_count"] for r in rows], axis=0)
    lengths = np.concatenate([r["lengths"] for r in rows])
    dropped = Counter({k: v for k, v in counts.items() if k != "kept"})
    dropped.update(final_counts)
    rows_kept = int(lengths.sum())
    if rows_read != rows_kept + sum(dropped.values()):
        raise AssertionError(f"row accounting broken: read {rows_read}, kept {rows_kept}, dropped {dict(dropped)}")

    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if cfg.split.protocol == "global_time":
        times = np.concatenate(times_parts)
        splits = split.accounting(offsets, times)
        if splits["test_users"] == 0 or splits["valid_users"] == 0:
            raise InputError(f"prepare.split: no user has a {'test' if splits['test_users'] == 0 else 'validation'} "
                             f"target after the cut ({splits['valid_from_iso']} / {splits['test_from_iso']}, "
                             f"events per period {splits['events']}): move the cut", path=cfg.source.path)
    else:
        splits = SplitSpec().accounting(offsets, np.zeros(int(offsets[-1])))

    features = _item_features(cfg, source, main_splits, item_vocab, ray)
    _write_items(tmp, source, cfg.source, item_vocab, item_count, train_count, features)
    user_features, users_entry = _user_features(cfg, source, user_vocab)
    if user_features:
        _write_users(tmp, user_vocab, users_as_int, user_features)
    cfg.save(tmp / CONFIG_FILE)
    shard_files = sorted((r["file"], int(len(r["lengths"])), int(np.sum(r["lengths"]))) for r in rows if r["file"])
    return {
        "raysrec_version": raysrec.__version__,
        "config": redact_tree(cfg.to_dict()),
        "source_format": source.format,
        "inputs": [{"path": str(p), "bytes": p.size(), "sha256": p.sha256()}
                   for p in [f for src in sources for f in src.files] + ([source.items_path] if source.items_path
                                                                          else [])],
        "event_log": {"path": redact(cfg.event_log), "files": len(sources[1].files)} if cfg.event_log else None,
        "has_timestamps": source.has_timestamp,
        "item_features": [{k: v for k, v in f.items() if k != "tokens"} for f in features],
        "user_features": [{k: v for k, v in f.items() if k != "tokens"} for f in user_features],
        "users_file": users_entry,
        "event_types": None if type_vocab is None else {
            "column": cfg.source.type_col, "vocabulary": [str(t) for t in type_vocab],   # index 1.., 0 = unknown
            "read": dict(sorted(types_read.items())),
            "kept": {str(t): int(c) for t, c in zip(type_vocab, np.sum([r["type_count"] for r in rows], axis=0)[1:])}},
        "has_ratings": source.has_rating,
        "rows_read": rows_read,
        "rows_kept": rows_kept,
        "rows_dropped": {r.label: int(dropped.get(r.label, 0)) for r in DropReason if r != DropReason.KEPT},
        "num_users": int(len(user_vocab)),
        "num_items": int(len(item_vocab)),
        "sequence_length": {
            "min": int(lengths.min()), "max": int(lengths.max()), "mean": round(float(lengths.mean()), 3),
            "median": float(np.median(lengths)), "p90": float(np.percentile(lengths, 90)),
        },
        "splits": splits,
        "shards": [{"file": f"{SEQUENCES_DIR}/{f}", "users": u, "events": e} for f, u, e in shard_files],
    }


MAX_EVENT_TYPES = 127      # stored as int8; a shop has a handful (view, cart, buy, ...)


def _type_vocabulary(cfg: PrepareConfig, types_read: Counter) -> pd.Index:
    """The event types kept (every type read, or those of ``prepare.types``), sorted: type index 1..T."""
    chosen = sorted(types_read if cfg.types is None else set(types_read) & set(cfg.types))
    where = cfg.source.path
    if cfg.types is not None and not chosen:
        raise InputError(f"prepare.types {cfg.types}: none of these event types is in column "
                         f"'{cfg.source.type_col}', which holds {sorted(types_read)[:20]}", path=where)
    if len(chosen) > MAX_EVENT_TYPES:
        raise InputError(f"column '{cfg.source.type_col}' holds {len(chosen):,} distinct event types (at most "
                         f"{MAX_EVENT_TYPES}): is it the event-type column?", path=where)
    return pd.Index(chosen)


def _vocabulary(ids: np.ndarray, id_auto: bool) -> tuple[pd.Index, bool]:
    """Ids in natural order; ids read as strings sort numerically when all are integers."""
    if id_auto:
        as_int = transforms.ids_as_ints_if_possible(np.asarray(ids, dtype=object))
        if as_int.dtype.kind in "iu":
            return pd.Index(np.asarray(ids, dtype=object)[np.argsort(as_int, kind="stable")]), True
    return pd.Index(transforms.sorted_vocabulary(ids)), False


def _item_features(cfg: PrepareConfig, source: ResolvedSource, splits: list, item_vocab: pd.Index,
                   ray) -> list[dict[str, Any]]:
    """Each ``prepare.item_features`` column encoded for the items of the vocabulary: its manifest entry
    (column, kind, where it was read, vocabulary, items with a value, conflicts) and ``tokens`` per item."""
    where, items = attribute_sources(cfg, source)
    if not where:
        return []
    keys = [str(i) for i in item_vocab.to_numpy()]
    values: dict[str, tuple[pd.Series, Optional[int]]] = {}
    for column in [c for c, w in where.items() if w == "items"]:
        frame = items.set_index("item_id")[column]
        values[column] = (frame.mask(frame.str.strip() == ""), None)
    from_events = [c for c, w in where.items() if w == "events"]
    if from_events:
        ds = ray.data.from_items([dataclasses.asdict(s) for s in splits], override_num_blocks=len(splits))
        seen = ds.map_batches(_attribute_splits, batch_size=1, batch_format="pyarrow",
                              fn_kwargs={"source": source, "columns": from_events}).to_pandas()
        for column in from_events:
            values[column] = attributes.latest_values(seen, column)
    out = []
    for spec in (attributes.FeatureSpec.parse(f) for f in cfg.item_features or []):
        series, conflicts = values[spec.column]
        tokens, vocab = attributes.encode(series.reindex(keys), spec.kind)
        out.append({"name": spec.column, "kind": spec.kind, "source": where[spec.column], "vocabulary": vocab,
                    "items_with_value": int(sum(1 for t in tokens if t)), "conflicts": conflicts, "tokens": tokens})
    return out


def _write_items(out: Path, source: ResolvedSource, source_cfg: SourceConfig, item_vocab: pd.Index,
                 item_count: np.ndarray, train_count: np.ndarray, features: list[dict[str, Any]]) -> None:
    """``items.parquet``: index, original id, ``count`` (every kept event: what serving's popularity fallback
    ranks by) and ``train_count`` (training events only: the sampled softmax's popularity proposal)."""
    ids = item_vocab.to_numpy()
    if source.id_auto:
        ids = transforms.ids_as_ints_if_possible(ids)
    items = pd.DataFrame({"item_index": np.arange(1, len(ids) + 1, dtype=np.int32), "item_id": ids,
                          "count": item_count[1:].astype(np.int64), "train_count": train_count[1:].astype(np.int64)})
    meta = read_item_metadata(source, source_cfg)
    if meta is not None:
        meta = meta.set_index("item_id")
        key = pd.Index([str(i) for i in item_vocab.to_numpy()])
        items["title"] = meta["title"].reindex(key).to_numpy() if "title" in meta else None
        items["categories"] = meta["categories"].reindex(key).to_numpy() if "categories" in meta else None
    else:
        items["title"] = None
        items["categories"] = None
    table = pa.Table.from_pandas(items, preserve_index=False)
    table = table.cast(pa.schema([
        ("item_index", pa.int32()), ("item_id", pa.int64() if ids.dtype.kind in "iu" else pa.string()),
        ("count", pa.int64()), ("train_count", pa.int64()), ("title", pa.string()), ("categories", pa.string())]))
    for feature in features:
        table = table.append_column(attributes.COLUMN_PREFIX + feature["name"],
                                    pa.array(feature["tokens"], pa.list_(pa.int32())))
    pq.write_table(table, out / ITEMS_FILE)

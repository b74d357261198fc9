"""Pure, vectorised transforms on Arrow/pandas batches: no Ray, testable on their own.

The Ray Data pipeline (:mod:`raysrec.data.pipeline`) composes them; so do the single-process
reference in ``bench/prepare.py`` and the tests.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from raysrec.data.sources import DropReason

_HASH_KEY = "raysrec-buckets0"  # 16 bytes: pandas' stable hash key, fixed so shards never move


def shard_of(users: pa.Array | np.ndarray | pd.Series, num_shards: int) -> np.ndarray:
    """Deterministic shard number of each user id (the same on every machine and run)."""
    values = users.to_numpy(zero_copy_only=False) if isinstance(users, (pa.Array, pa.ChunkedArray)) else np.asarray(users)
    if values.dtype.kind not in "iu":
        values = values.astype(object)
    hashes = pd.util.hash_array(values, hash_key=_HASH_KEY, categorize=False)
    return (hashes % np.uint64(num_shards)).astype(np.int32)


def mark_low_ratings(table: pa.Table, min_rating: Optional[float]) -> pa.Table:
    """Set ``drop_code`` to RATING_BELOW_MIN for kept rows whose rating is below ``min_rating``."""
    if min_rating is None or table.num_rows == 0:
        return table
    codes = table.column("drop_code").to_numpy()
    rating = table.column("rating").to_numpy(zero_copy_only=False)
    low = (codes == 0) & (np.nan_to_num(rating, nan=np.inf) < min_rating)
    if not low.any():
        return table
    codes = np.where(low, np.int8(DropReason.RATING_BELOW_MIN), codes).astype(np.int8)
    return table.set_column(table.schema.get_field_index("drop_code"), "drop_code", pa.array(codes))


def count_codes(codes: np.ndarray) -> Counter:
    """Count rows per drop reason label (``kept`` for code 0)."""
    values, counts = np.unique(codes, return_counts=True)
    return Counter({("kept" if v == 0 else DropReason(int(v)).label): int(c) for v, c in zip(values, counts)})


def group_user_sequences(events: pd.DataFrame, types: Optional[list[str]] = None,
                         with_types: bool = False) -> tuple[pa.Table, Counter, Counter]:
    """Events of some users -> one row per user with time-ordered ``items``, ``timestamps`` (and ``types`` when
    ``with_types``: the source has an event-type column).

    Rows already marked with a drop code are counted and removed; so are events whose type is not in ``types``
    (when given: ``type_not_selected``). Exact duplicates (same user, item, timestamp, rating and type: a view and
    a buy in the same second are two events) keep their first occurrence in input order. Sorting is stable on
    (timestamp, ord), so ties keep the input order.
    Returns the table, the counts per reason (``kept`` = events in the output) and the valid events per type
    before the type filter (what the input holds).
    """
    counts = count_codes(events["drop_code"].to_numpy())
    kept_in = counts.pop("kept", 0)
    frame = events[events["drop_code"].to_numpy() == 0]
    per_type = Counter(frame["type"].value_counts().to_dict()) if with_types else Counter()
    if with_types and types is not None:
        chosen = frame["type"].isin(types).to_numpy()
        counts["type_not_selected"] += int((~chosen).sum())
        kept_in -= int((~chosen).sum())
        frame = frame[chosen]
    frame = frame.sort_values(["user", "timestamp", "ord"], kind="stable")
    key = ["user", "item", "timestamp", "rating"] + (["type"] if with_types else [])
    dup = frame.duplicated(key, keep="first").to_numpy()
    if dup.any():
        counts["duplicate"] += int(dup.sum())
        frame = frame[~dup]
    counts["kept"] = kept_in - int(dup.sum())
    users = frame["user"].to_numpy()
    if len(users) == 0:
        return _empty_sequences(events["user"].dtype, with_types), counts, per_type
    boundaries = np.flatnonzero(users[1:] != users[:-1]) + 1
    offsets = pa.array(np.concatenate([[0], boundaries, [len(users)]]).astype(np.int32))
    columns = {
        "user": pa.array(users[offsets.to_numpy()[:-1]]),
        "items": pa.ListArray.from_arrays(offsets, pa.array(frame["item"].to_numpy())),
        "timestamps": pa.ListArray.from_arrays(offsets, pa.array(frame["timestamp"].to_numpy(np.float64))),
    }
    if with_types:
        columns["types"] = pa.ListArray.from_arrays(offsets, pa.array(frame["type"].to_numpy(object), pa.string()))
    return pa.table(columns), counts, per_type


def _empty_sequences(user_dtype, with_types: bool = False) -> pa.Table:
    """No user left in this shard (every row of it dropped): an empty table of the same schema. ``user_dtype``
    may be a pandas extension dtype (``string[pyarrow]``), which numpy cannot interpret."""
    id_type = pa.int64() if pd.api.types.is_integer_dtype(user_dtype) else pa.string()
    columns = {"user": pa.array([], id_type), "items": pa.array([], pa.list_(id_type)),
               "timestamps": pa.array([], pa.list_(pa.float64()))}
    if with_types:
        columns["types"] = pa.array([], pa.list_(pa.string()))
    return pa.table(columns)


def event_columns(table: pa.Table) -> list[str]:
    """The per-event list columns of a sequences table: items, timestamps, and types where present."""
    return [c for c in ("items", "timestamps", "types") if c in table.column_names]


def _take_list_values(column: pa.ChunkedArray | pa.ListArray, keep: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    flat = pc.list_flatten(column)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), flat.filter(pa.array(keep)))


def filter_sequences(table: pa.Table, allowed_items: Optional[pa.Array], user_k: int,
                     min_length: int, train_before: Optional[float] = None) -> tuple[pa.Table, Counter]:
    """Drop events of items outside ``allowed_items``, then users shorter than the limits.

    Events are attributed to the first reason that removes them: ITEM_BELOW_K_CORE (or, at or after
    ``train_before``, ITEM_NOT_IN_TRAINING), then USER_BELOW_K_CORE, then USER_TOO_SHORT (``len < min_length``).
    ``train_before`` (a global time split's validation cut): the user k-core counts only the events before it,
    so no filter sees what happens after the cut; ``min_length`` counts the whole sequence.
    """
    counts: Counter = Counter()
    if table.num_rows == 0:
        return table, counts
    lengths = pc.list_value_length(table.column("items")).to_numpy(zero_copy_only=False)
    if allowed_items is not None:
        flat = pc.list_flatten(table.column("items"))
        keep = pc.is_in(flat, value_set=allowed_items).to_numpy(zero_copy_only=False)
        removed = ~keep
        if removed.any():
            if train_before is not None:
                late = _flat_times(table) >= train_before
                counts["item_not_in_training"] += int((removed & late).sum())
                counts["item_below_k_core"] += int((removed & ~late).sum())
            else:
                counts["item_below_k_core"] += int(removed.sum())
            user_of = np.repeat(np.arange(table.num_rows), lengths)
            new_lengths = np.bincount(user_of[keep], minlength=table.num_rows)
            table = pa.table({"user": table.column("user"), **{
                name: _take_list_values(table.column(name), keep, new_lengths) for name in event_columns(table)}})
            lengths = new_lengths
    core_lengths = lengths
    if train_before is not None:
        user_of = np.repeat(np.arange(table.num_rows), lengths)
        core_lengths = np.bincount(user_of[_flat_times(table) < train_before], minlength=table.num_rows)
    short_core = core_lengths < user_k
    counts["user_below_k_core"] += int(lengths[short_core].sum())
    short = ~short_core & (lengths < min_length)
    counts["user_too_short"] += int(lengths[short].sum())
    keep_users = ~(short_core | short)
    if not keep_users.all():
        table = table.filter(pa.array(keep_users))
    return table, +counts


def _flat_times(table: pa.Table) -> np.ndarray:
    return pc.list_flatten(table.column("timestamps")).to_numpy(zero_copy_only=False)


def item_counts(table: pa.Table, before: Optional[float] = None) -> pd.Series:
    """Interaction count per item id in a sequences table; with ``before``, only the events before that time are
    counted, and every item present is listed (0 for an item with none)."""
    flat = pc.list_flatten(table.column("items"))
    counts = pc.value_counts(flat if before is None else flat.filter(pa.array(_flat_times(table) < before)))
    series = pd.Series(counts.field("counts").to_numpy(zero_copy_only=False),
                       index=counts.field("values").to_numpy(zero_copy_only=False), dtype=np.int64)
    if before is not None:
        present = pc.unique(flat).to_numpy(zero_copy_only=False)
        series = series.reindex(present, fill_value=0)
    return series


def sorted_vocabulary(ids: np.ndarray) -> np.ndarray:
    """Ids in their natural order (numbers numerically, strings lexicographically)."""
    ids = np.asarray(ids)
    if ids.dtype.kind in "iu":
        return np.sort(ids)
    return np.array(sorted(ids.tolist()), dtype=object)


def finalize_sequences(table: pa.Table, item_vocab: pd.Index, user_vocab: pd.Index,
                       max_length: Optional[int], type_vocab: Optional[pd.Index] = None) -> tuple[pa.Table, Counter]:
    """Map ids to dense indices (items 1..N, 0 = padding; users 0..U-1; event types 1..T, 0 = unknown, when
    ``type_vocab``), keep the newest ``max_length``."""
    counts: Counter = Counter()
    lengths = pc.list_value_length(table.column("items")).to_numpy(zero_copy_only=False).astype(np.int64)
    flat_items = pc.list_flatten(table.column("items")).to_numpy(zero_copy_only=False)
    item_index = item_vocab.get_indexer(flat_items) + 1
    if (item_index == 0).any():
        raise AssertionError("an item missing from the vocabulary reached finalize_sequences")
    flat_times = pc.list_flatten(table.column("timestamps")).to_numpy(zero_copy_only=False)
    type_index = None
    if type_vocab is not None:
        type_index = type_vocab.get_indexer(pc.list_flatten(table.column("types")).to_numpy(zero_copy_only=False)) + 1
        if (type_index == 0).any():
            raise AssertionError("an event type missing from the vocabulary reached finalize_sequences")
    if max_length is not None and (lengths > max_length).any():
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        position = np.arange(len(flat_items)) - np.repeat(starts, lengths)
        keep = position >= np.repeat(lengths - max_length, lengths)
        counts["truncated"] += int((~keep).sum())
        item_index, flat_times = item_index[keep], flat_times[keep]
        type_index = type_index[keep] if type_index is not None else None
        lengths = np.minimum(lengths, max_length)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    user_ids = table.column("user").to_numpy(zero_copy_only=False)
    user_index = user_vocab.get_indexer(user_ids)
    out = pa.table({
        "user_index": pa.array(user_index.astype(np.int32)),
        "user_id": table.column("user"),
        "sequence": pa.ListArray.from_arrays(offsets, pa.array(item_index.astype(np.int32))),
        "timestamps": pa.ListArray.from_arrays(offsets, pa.array(flat_times.astype(np.float64))),
    })
    if type_index is not None:
        out = out.append_column("types", pa.ListArray.from_arrays(offsets, pa.array(type_index.astype(np.int8))))
    return out.sort_by("user_index"), counts


def ids_as_ints_if_possible(ids: np.ndarray) -> np.ndarray:
    """Ids read as strings become int64 when every one is a canonical integer ("12", not "012")."""
    if ids.dtype.kind in "iu" or len(ids) == 0:
        return ids
    try:
        as_int = np.array([int(x) for x in ids], dtype=np.int64)
    except (ValueError, TypeError, OverflowError):
        return ids
    if all(str(v) == s for v, s in zip(as_int.tolist(), ids.tolist())):
        return as_int
    return ids

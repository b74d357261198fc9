"""Item attributes (category, brand, price, genres, ...): where they are read, and how each becomes tokens.

An attribute is a column named by ``prepare.item_features`` as ``COLUMN[:KIND]``:

* ``category`` (the default): the value is one token (brand, category id);
* ``multi``: '|'-separated values, each a token (ML-100K genres; the S3-Rec ``item2attributes.json`` lists);
* ``path``: a dotted hierarchy, one token per level prefix (REES46 ``appliances.kitchen.mixer`` gives
  ``appliances``, ``appliances.kitchen``, ``appliances.kitchen.mixer``), so items share the coarse levels;
* ``numeric``: a number (price), one token for its quantile bucket among the items (``NUMERIC_BUCKETS``).

Values come from the items file when it has the column, else from the event rows (REES46 and Taobao carry
them on every event): per item the latest non-empty value (by time, then input order), and an item seen with
more than one value counts as a conflict in ``manifest.json``. Pure functions: no Ray here; the per-split
reader runs inside Ray Data tasks of :mod:`raysrec.data.pipeline`.

User attributes (``prepare.user_features``: ML-100K's age, gender, occupation) are read from a users file and
encoded the same way. At serving time a request's raw values are encoded against the saved vocabulary
(:func:`encode_value`): the model keeps no user profiles, so a user forgotten by the live store is forgotten.
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Literal, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from raysrec.errors import InputError

FeatureKind = Literal["category", "multi", "path", "numeric"]
KINDS = ("category", "multi", "path", "numeric")
NUMERIC_BUCKETS = 10
COLUMN_PREFIX = "feature."            # items.parquet: ``feature.<name>`` holds each item's token indices


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    column: str
    kind: FeatureKind = "category"

    @classmethod
    def parse(cls, text: str) -> FeatureSpec:
        column, _, kind = str(text).partition(":")
        if not column.strip() or (kind and kind not in KINDS):
            raise InputError(f"prepare.item_features {text!r}: expected COLUMN or COLUMN:KIND with KIND one of "
                             f"{list(KINDS)}")
        return cls(column.strip(), kind or "category")  # type: ignore[arg-type]


def tokens_of(value: Optional[str], kind: FeatureKind) -> list[str]:
    """One item's tokens for a ``category``, ``multi`` or ``path`` value (none for a missing or empty value)."""
    text = "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value).strip()
    if not text:
        return []
    if kind == "multi":
        return list(dict.fromkeys(t.strip() for t in text.split("|") if t.strip()))
    if kind == "path":
        levels = [p for p in text.split(".") if p]
        return [".".join(levels[:i + 1]) for i in range(len(levels))]
    return [text]


def encode(values: pd.Series, kind: FeatureKind) -> tuple[list[list[int]], list[str]]:
    """Values of items 1..N (in index order; missing = no value) -> per item its token indices (1..V) and the
    vocabulary (token index - 1 -> name). Tokens are sorted by name; numeric buckets by value."""
    if kind == "numeric":
        numbers = pd.to_numeric(values, errors="coerce")
        known = numbers.notna()
        tokens = [[] for _ in range(len(values))]
        if not known.any():
            return tokens, []
        buckets = pd.qcut(numbers[known].rank(method="first"), q=min(NUMERIC_BUCKETS, int(known.sum())),
                          labels=False)
        edges = [numbers[known][buckets == b] for b in range(int(buckets.max()) + 1)]
        vocab = [f"[{e.min():g}, {e.max():g}]" for e in edges]
        for position, bucket in zip(np.flatnonzero(known.to_numpy()), buckets.to_numpy()):
            tokens[position] = [int(bucket) + 1]
        return tokens, vocab
    per_item = [tokens_of(v, kind) for v in values]
    vocab = sorted({t for item in per_item for t in item})
    index = {t: i + 1 for i, t in enumerate(vocab)}
    return [[index[t] for t in item] for item in per_item], vocab


def encode_value(value: object, kind: FeatureKind, vocab: list[str]) -> list[int]:
    """One raw value (a request's) -> its token indices in a saved ``vocab`` (names the vocabulary lacks are left
    out: they were never learned). A number of a ``numeric`` attribute goes to the bucket whose range holds it,
    or the nearest one."""
    if kind != "numeric":
        index = {t: i + 1 for i, t in enumerate(vocab)}
        return [index[t] for t in tokens_of(None if value is None else str(value), kind) if t in index]
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return []
    if not vocab or not np.isfinite(number):
        return []
    edges = [tuple(float(x) for x in label.strip("[]").split(",")) for label in vocab]   # "[lo, hi]" per bucket
    inside = [b for b, (lo, hi) in enumerate(edges) if lo <= number <= hi]
    nearest = inside[0] if inside else int(np.argmin([min(abs(number - lo), abs(number - hi)) for lo, hi in edges]))
    return [nearest + 1]


def token_matrix(column: list[Optional[list[int]]], num_items: int) -> np.ndarray:
    """items.parquet's ``feature.<name>`` (by item index 1..N; users.parquet's by user index + 1) -> (N + 1, M)
    int64, 0-padded (row 0: padding, or no such user)."""
    width = max([len(t) for t in column if t is not None] + [1])
    out = np.zeros((num_items + 1, width), np.int64)
    for row, tokens in enumerate(column, start=1):
        if tokens is not None and len(tokens):
            out[row, :len(tokens)] = tokens
    return out


# ---------------------------------------------------------------- attributes from an items file
def read_attribute_table(data: bytes, name: str, item_col: str, columns: list[str], sep: str,
                         encoding: str, key: str = "item_id") -> pd.DataFrame:
    """An items file (csv/tsv, parquet, or S3-Rec's ``item2attributes.json``: ``{"item": [attr, ...]}``, its
    lists as column ``attributes``) -> ``key`` (str ids) and the asked ``columns`` that it has (str values).
    A users file is read the same way (``item_col`` the user column, ``key`` ``user_id``); RecBole atomic
    headers (``age:token``) are read without their types."""
    if name.endswith(".json"):
        try:
            mapping = json.loads(data.decode(encoding))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"not a JSON object of item -> attribute list ({exc})", path=name) from None
        if not isinstance(mapping, dict):
            raise InputError("expected a JSON object of item -> attribute list", path=name)
        return pd.DataFrame({key: [str(k) for k in mapping],
                             "attributes": ["|".join(str(v) for v in (vs if isinstance(vs, list) else [vs]))
                                            for vs in mapping.values()]})
    if name.endswith(".parquet"):
        frame = pq.read_table(io.BytesIO(data)).to_pandas()
    else:
        frame = pd.read_csv(io.BytesIO(data), sep=sep, dtype=str, encoding=encoding, keep_default_na=False)
    if len(frame.columns) and all(":" in str(c) for c in frame.columns):       # RecBole: name:type
        frame.columns = [str(c).split(":", 1)[0] for c in frame.columns]
    if item_col not in frame.columns:
        role = "item" if key == "item_id" else "user"
        raise InputError(f"column '{item_col}' (the {role} column) not found; the columns are {list(frame.columns)}",
                         path=name)
    keep = [c for c in columns if c in frame.columns]
    out = frame[[item_col, *keep]].astype(str).rename(columns={item_col: key})
    return out.drop_duplicates(key, keep="first")


# ---------------------------------------------------------------- attributes from the event rows
def split_attributes(data: bytes, fields: list[str], item_col: str, time_col: Optional[str],
                     columns: list[str], delimiter: str, encoding: str, base_ord: int) -> pd.DataFrame:
    """One byte range of a csv event log -> per (item, column, value) the newest ``(time, ord)`` it was seen at.

    Rows the main reader counts as malformed are skipped here (they are already counted there); a row without
    a readable time is ordered by its input position only."""
    if not data:
        return _empty_observations()
    table = pacsv.read_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(column_names=fields, encoding=encoding),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=lambda row: "skip"),
        convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in fields},
                                             include_columns=[item_col] + ([time_col] if time_col else []) + columns,
                                             strings_can_be_null=False))
    return observations(table, item_col, time_col, columns, base_ord)


def observations(table: pa.Table, item_col: str, time_col: Optional[str], columns: list[str],
                 base_ord: int) -> pd.DataFrame:
    """Rows with ``item_col``, ``time_col`` and the attribute ``columns`` -> the newest sighting of each (item,
    column, value): columns ``item``, ``column``, ``value``, ``time``, ``ord``."""
    from raysrec.data.sources import epoch_seconds, parse_times  # noqa: PLC0415

    n = table.num_rows
    items = table.column(item_col).cast(pa.string()).to_numpy(zero_copy_only=False)
    times = epoch_seconds(parse_times(table.column(time_col).cast(pa.string()).combine_chunks())) if time_col \
        else np.zeros(n)
    ords = base_ord + np.arange(n, dtype=np.int64)
    parts = []
    for column in columns:
        values = pd.Series(table.column(column).cast(pa.string()).to_numpy(zero_copy_only=False), dtype=object)
        present = values.notna().to_numpy() & (values.fillna("").str.strip() != "").to_numpy()
        frame = pd.DataFrame({"item": items[present], "column": column, "value": values[present].str.strip(),
                              "time": np.nan_to_num(times[present], nan=-np.inf), "ord": ords[present]})
        parts.append(newest(frame))
    return pd.concat(parts, ignore_index=True) if parts else _empty_observations()


def newest(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (item, column, value) the row of its newest sighting."""
    if frame.empty:
        return _empty_observations()
    frame = frame.sort_values(["time", "ord"], kind="stable")
    return frame.drop_duplicates(["item", "column", "value"], keep="last").reset_index(drop=True)


def latest_values(sightings: pd.DataFrame, column: str) -> tuple[pd.Series, int]:
    """Every split's sightings of one column -> per item its newest value, and how many items were seen with
    more than one value (conflicts)."""
    seen = newest(sightings[sightings["column"] == column])
    conflicts = int((seen.groupby("item")["value"].nunique() > 1).sum()) if len(seen) else 0
    latest = seen.sort_values(["time", "ord"], kind="stable").drop_duplicates("item", keep="last")
    return pd.Series(latest["value"].to_numpy(), index=latest["item"].to_numpy(), dtype=object), conflicts


def _empty_observations() -> pd.DataFrame:
    return pd.DataFrame({"item": pd.Series([], dtype=object), "column": pd.Series([], dtype=object),
                         "value": pd.Series([], dtype=object), "time": pd.Series([], dtype=np.float64),
                         "ord": pd.Series([], dtype=np.int64)})

"""A prepared data folder and the per-user sequences it holds.

Sequences are held as CSR arrays (``offsets`` + flat ``items``/``times``): a million users cost a
few flat arrays, not a million Python lists. The folder may be local or on any pyarrow
filesystem, so workers on every node of a cluster read their shards from shared storage.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raysrec.data.attributes import COLUMN_PREFIX, token_matrix
from raysrec.data.pipeline import ITEMS_FILE, MANIFEST_FILE, USERS_FILE
from raysrec.data.split import LEAVE_ONE_OUT, Positions, SplitSpec
from raysrec.errors import ConfigError, InputError
from raysrec.files import filesystem
from raysrec.models.inputs import Events


@dataclasses.dataclass
class SequenceSet:
    """Per-user item sequences in CSR form; ``items[offsets[u]:offsets[u+1]]`` is user ``u``'s. ``split`` says
    which events train and which are held out (:mod:`raysrec.data.split`)."""

    user_index: np.ndarray   # (U,) int32
    offsets: np.ndarray      # (U+1,) int64
    items: np.ndarray        # (E,) int32, 1..num_items
    times: np.ndarray        # (E,) float64
    split: SplitSpec = LEAVE_ONE_OUT
    types: Optional[np.ndarray] = None   # (E,) int8 behaviour type index (0 = unknown), when the data has types
    # per user attribute, (num_users + 1, M) tokens by user_index + 1 (row 0: no such user), when read for a model
    # with user attributes (PreparedData.read(user_features=True))
    user_tokens: tuple[np.ndarray, ...] = ()
    _target_flags: Optional[np.ndarray] = dataclasses.field(default=None, init=False, repr=False, compare=False)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def positions(self) -> Positions:
        """Per user: where training ends and where the validation and test targets are."""
        return self.split.positions(self.offsets, self.times, self.types)

    def users_of(self, owners: np.ndarray) -> list[np.ndarray]:
        """Per user attribute, the (B, M) tokens of the local users ``owners`` (none without user attributes)."""
        rows = self.user_index[owners].astype(np.int64) + 1
        return [table[rows] for table in self.user_tokens]

    def target_flags(self) -> Optional[np.ndarray]:
        """(E,) bool: the events that can be targets (``split.target_types``), or None when every event can.
        Computed once per set: every training batch reads it."""
        if self._target_flags is None and self.split.target_types:
            self._target_flags = self.split.targets(self.types)
        return self._target_flags

    def __len__(self) -> int:
        return len(self.user_index)

    def events(self) -> Events:
        """The flat event columns, as the model input function reads them."""
        return Events(self.items, self.times, self.types)

    def sequence(self, u: int) -> np.ndarray:
        return self.items[self.offsets[u]:self.offsets[u + 1]]

    @classmethod
    def from_table(cls, table: pa.Table, split: SplitSpec = LEAVE_ONE_OUT) -> SequenceSet:
        seq = table.column("sequence").combine_chunks()
        times = table.column("timestamps").combine_chunks()
        offsets = seq.offsets.to_numpy().astype(np.int64)
        base = offsets[0]
        types = None
        if "types" in table.column_names:
            types = table.column("types").combine_chunks().values.to_numpy()[base:offsets[-1]].astype(np.int64)
        return cls(table.column("user_index").to_numpy().astype(np.int32), offsets - base,
                   seq.values.to_numpy()[base:offsets[-1]].astype(np.int32),
                   times.values.to_numpy()[base:offsets[-1]].astype(np.float64), split, types)

    @classmethod
    def from_lists(cls, sequences: list[list[int]], times: Optional[list[list[float]]] = None,
                   split: SplitSpec = LEAVE_ONE_OUT) -> SequenceSet:
        lengths = np.array([len(s) for s in sequences], np.int64)
        flat_times = (np.concatenate([np.asarray(t, np.float64) for t in times]) if times
                      else np.concatenate([np.arange(n, dtype=np.float64) for n in lengths]))
        return cls(np.arange(len(sequences), dtype=np.int32), np.concatenate([[0], np.cumsum(lengths)]),
                   np.concatenate([np.asarray(s, np.int32) for s in sequences]), flat_times, split)


@dataclasses.dataclass
class PreparedData:
    """A folder written by ``raysrec prepare``: manifest, items table and sequence shards.

    The folder may be local or on any pyarrow filesystem (``s3://bucket/prepared``), so training
    workers on other nodes of a cluster read their shards straight from shared storage.
    """

    root: str
    manifest: dict
    items: pd.DataFrame
    fs: pafs.FileSystem = dataclasses.field(default_factory=pafs.LocalFileSystem, repr=False)
    path: str = ""
    _users: Optional[dict] = dataclasses.field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def load(cls, root: str | Path) -> PreparedData:
        fs, path = filesystem(root)
        manifest_path = f"{path}/{MANIFEST_FILE}"
        if fs.get_file_info(manifest_path).type != pafs.FileType.File:
            raise InputError("not a prepared data folder (no manifest.json): run `raysrec prepare` first", path=str(root))
        with fs.open_input_stream(manifest_path) as handle:
            manifest = json.loads(handle.read().decode())
        items = pq.read_table(f"{path}/{ITEMS_FILE}", filesystem=fs).to_pandas()
        return cls(str(root), manifest, items, fs, path)

    def copy_file(self, name: str, dest: str | Path) -> Path:
        """Copy one file of the folder (e.g. ``items.parquet``) to a local path."""
        with self.fs.open_input_stream(f"{self.path}/{name}") as src, open(dest, "wb") as out:
            while chunk := src.read(8 << 20):
                out.write(chunk)
        return Path(dest)

    @property
    def num_items(self) -> int:
        return int(self.manifest["num_items"])

    @property
    def has_timestamps(self) -> bool:
        return bool(self.manifest.get("has_timestamps", False))

    def item_features(self) -> dict[str, tuple[list[str], np.ndarray]]:
        """Each item attribute of ``prepare.item_features``: its vocabulary (token index - 1 -> name) and the
        (num_items + 1, M) token indices of every item (0-padded; row 0 is padding)."""
        out = {}
        ordered = self.items.sort_values("item_index")
        for feature in self.manifest.get("item_features") or []:
            column = ordered[COLUMN_PREFIX + feature["name"]].tolist()
            out[feature["name"]] = (list(feature["vocabulary"]), token_matrix(column, self.num_items))
        return out

    def user_features(self) -> dict[str, tuple[str, list[str], np.ndarray]]:
        """Each user attribute of ``prepare.user_features``: its kind, vocabulary and the (num_users + 1, M) tokens
        of every user by user index + 1 (row 0: no user)."""
        features = self.manifest.get("user_features") or []
        if not features:
            return {}
        if self._users is None:     # read once: the model config and the sequences both need it
            users = pq.read_table(f"{self.path}/{USERS_FILE}", filesystem=self.fs).to_pandas().sort_values("user_index")
            num_users = int(self.manifest["num_users"])
            self._users = {f["name"]: (f["kind"], list(f["vocabulary"]),
                                       token_matrix(users[COLUMN_PREFIX + f["name"]].tolist(), num_users))
                           for f in features}
        return self._users

    @property
    def event_types(self) -> list[str]:
        """The event type names, type index 1..T (0 = unknown); empty when the data has no types."""
        return list((self.manifest.get("event_types") or {}).get("vocabulary", []))

    @property
    def split(self) -> SplitSpec:
        return SplitSpec.from_manifest(self.manifest)

    def shard_files(self) -> list[str]:
        return [f"{self.path}/{s['file']}" for s in self.manifest["shards"]]

    def target_split(self, target_types: Sequence[str] = ()) -> SplitSpec:
        """The split, with only events of ``target_types`` (names) as targets when given (``train.target_types``)."""
        if not target_types:
            return self.split
        names = self.event_types
        if not names:
            raise ConfigError(f"train.target_types: {self.root} has no event types (prepare --type-col)")
        unknown = [t for t in target_types if t not in names]
        if unknown:
            raise ConfigError(f"train.target_types: {', '.join(map(repr, unknown))} not among the event types of "
                              f"{self.root} ({', '.join(names)})")
        return dataclasses.replace(self.split, target_types=tuple(sorted(names.index(t) + 1 for t in target_types)))

    def read(self, files: Optional[list[str]] = None, target_types: Sequence[str] = (),
             user_features: bool = False) -> SequenceSet:
        """The sequences of ``files`` (all shards by default); ``target_types``: see :meth:`target_split`;
        ``user_features``: with every user's attribute tokens (:attr:`SequenceSet.user_tokens`)."""
        split = self.target_split(target_types)
        users = tuple(tokens for _, _, tokens in self.user_features().values()) if user_features else ()
        files = self.shard_files() if files is None else files
        table = pa.concat_tables([self._read_shard(f) for f in files]) if files else None
        if table is None:
            return SequenceSet(np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0),
                               split, np.zeros(0, np.int64) if split.target_types else None, users)
        return dataclasses.replace(SequenceSet.from_table(table.sort_by("user_index"), split), user_tokens=users)

    def _read_shard(self, file: str) -> pa.Table:
        try:
            return pq.read_table(file, filesystem=self.fs)
        except (pa.ArrowException, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"unreadable sequence shard ({first}); prepare the data again", path=file) from None

    def item_ids(self) -> np.ndarray:
        """Original item ids in index order: ``item_ids()[i - 1]`` is the id of item index ``i`` (as
        :func:`raysrec.artifact.item_ids` for a checkpoint)."""
        return self.items.sort_values("item_index")["item_id"].to_numpy()

    def item_popularity(self) -> np.ndarray:
        """Training events per item index (index 0, padding, gets 0): no validation or test event counts. Folders
        prepared before ``train_count`` existed give every kept event."""
        counts = np.zeros(self.num_items + 1, np.int64)
        column = "train_count" if "train_count" in self.items else "count"
        counts[self.items["item_index"].to_numpy()] = self.items[column].to_numpy()
        return counts

"""``raysrec recommend``: offline top-k for every user, with Ray Data batch inference.

The histories come from a prepared folder (every user's whole sequence, its event types and, for a model that
reads them, the user's attributes) or from a Parquet file/folder of ``user_id``, ``history`` (a list of original
item ids, oldest first) and optionally ``timestamps`` and ``types``. A pool
of actors (``num_actors``, each loading the model once, on a GPU with ``use_gpu``) answers them in batches
with :meth:`Recommender.run`, the endpoint's own code, so a user's list is the one ``POST /recommend``
returns for the same history, ``k``, ``exclude_seen`` and ``now``.

Output: Parquet files under ``output/recommendations/``, one row per input row: ``user_id``, ``item_ids``
(ranked), ``scores``, ``fallback`` ("popularity" when no history item was known), ``unknown_items``
(history ids the model does not know); ``recommend_config.yaml`` and ``summary.json`` (rows, users/s) beside.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from raysrec.config import Config, check, option, redact
from raysrec.errors import ConfigError

OUTPUT_DIR = "recommendations"
CONFIG_FILE = "recommend_config.yaml"


@dataclasses.dataclass
class RecommendConfig(Config):
    model: str = option("", "a model folder, checkpoint folder or tune export (local path or URI)")
    data: str = option("", "a prepared folder: recommend for every user in it (their whole history)")
    histories: str = option("", "or a Parquet file/folder of user_id, history (original ids), [timestamps]")
    output: str = option("", "output folder")
    k: int = option(100, "items per user")
    exclude_seen: bool = option(True, "leave the user's history out of their list")
    now: Optional[float] = option(None, "unix seconds the lists are for (longshort's recency); default: each "
                                        "user's newest event time")
    batch_size: int = option(1024, "users per model call")
    num_actors: int = option(1, "model replicas (Ray Data actors), each loads the model once")
    cpus_per_actor: float = option(1.0, "CPUs per actor")
    use_gpu: bool = option(False, "one GPU per actor")
    torch_threads: int = option(1, "torch threads per actor")

    def validate(self) -> None:
        check(self.model != "", "recommend.model is required")
        check(bool(self.data) != bool(self.histories), "recommend needs exactly one of data and histories")
        check(self.output != "", "recommend.output is required")
        check(1 <= self.k <= 10_000, "recommend.k must be in [1, 10000]")
        check(self.batch_size >= 1 and self.num_actors >= 1, "recommend.batch_size and num_actors must be >= 1")


class _Answerer:
    """A Ray Data actor: loads the model once, answers batches of histories."""

    def __init__(self, model: str, k: int, exclude_seen: bool, now: Optional[float], device: str, torch_threads: int,
                 item_ids: Optional[np.ndarray], type_names: Optional[np.ndarray] = None,
                 user_tables: Optional[dict[str, np.ndarray]] = None) -> None:
        import torch  # noqa: PLC0415

        from raysrec.serving.recommender import Recommender  # noqa: PLC0415

        torch.set_num_threads(torch_threads)
        self.rec = Recommender.load(model, device=device)
        self.k, self.exclude_seen, self.now = k, exclude_seen, now
        self.item_ids = item_ids     # prepared input: item index -> original id (index 0 is padding)
        self.type_names = type_names  # prepared input: type index -> name (index 0: unknown)
        # prepared input, a model reading user attributes: its attributes' tokens by user index + 1
        wanted = list(self.rec.model.cfg.user_feature_vocab)
        self.user_tables = [user_tables[name] for name in wanted] if user_tables and wanted else []

    def __call__(self, batch: pa.Table) -> pa.Table:
        from raysrec.serving.recommender import Query  # noqa: PLC0415

        if self.item_ids is not None:          # a prepared folder: indices -> the original ids the endpoint takes
            histories = [self.item_ids[np.asarray(s, dtype=np.int64)].tolist()
                         for s in batch.column("sequence").to_pylist()]
        else:
            histories = batch.column("history").to_pylist()
        times = batch.column("timestamps").to_pylist() if "timestamps" in batch.column_names else None
        types = batch.column("types").to_pylist() if "types" in batch.column_names else None
        if types is not None and self.type_names is not None:
            types = [self.type_names[np.asarray(t, dtype=np.int64)].tolist() for t in types]
        users = None
        if self.user_tables:
            rows = batch.column("user_index").to_numpy().astype(np.int64) + 1
            users = [[table[r][table[r] > 0].tolist() for table in self.user_tables] for r in rows]
        queries = [Query(history=h or [], k=self.k, exclude_seen=self.exclude_seen,
                         timestamps=times[i] if times and times[i] is not None else None, now=self.now,
                         types=types[i] if types and types[i] is not None else None,
                         user_tokens=users[i] if users else None)
                   for i, h in enumerate(histories)]
        answers = self.rec.run(queries)
        return pa.table({
            "user_id": batch.column("user_id"),
            "item_ids": [[item["item_id"] for item in a.items] for a in answers],
            "scores": pa.array([[item["score"] for item in a.items] for a in answers], pa.list_(pa.float64())),
            "fallback": pa.array([a.fallback for a in answers], pa.string()),
            "unknown_items": pa.array([[str(u) for u in a.unknown_items] for a in answers], pa.list_(pa.string())),
        })


def _check_histories(files: list, fs) -> None:
    import pyarrow.parquet as pq  # noqa: PLC0415

    for f in files:
        names = set(pq.read_schema(f, filesystem=fs).names)
        missing = {"user_id", "history"} - names
        if missing:
            raise ConfigError(f"{f}: needs columns user_id and history (a list of item ids); "
                              f"missing {', '.join(sorted(missing))}")


def recommend(cfg: RecommendConfig, num_cpus: Optional[int] = None) -> dict[str, Any]:
    """Top-k for every input row; returns the summary written to ``summary.json``. Inputs are checked before
    Ray starts (a local one with ``num_cpus``, or the cluster of ``RAY_ADDRESS``)."""
    import pyarrow.fs as pafs  # noqa: PLC0415
    import ray  # noqa: PLC0415

    from raysrec import artifact  # noqa: PLC0415
    from raysrec.data.storage import PreparedData  # noqa: PLC0415
    from raysrec.evaluation import check_same_items  # noqa: PLC0415
    from raysrec.files import filesystem, join  # noqa: PLC0415

    cfg.validate()
    model = artifact.locate(cfg.model)           # a wrong model path fails here, before Ray does anything
    item_ids = type_names = user_tables = None
    if cfg.data:
        data = PreparedData.load(cfg.data)
        with tempfile.TemporaryDirectory(prefix="raysrec-recommend-") as scratch:   # a URI model: downloaded once
            folder, _ = artifact.fetch(model, scratch)
            check_same_items(artifact.item_ids(folder.checkpoint), data, redact(model))
        files = data.shard_files()
        fs, _ = filesystem(cfg.data)
        columns = ["user_id", "sequence"] + (["timestamps"] if data.has_timestamps else []) + (
            ["types"] if data.event_types else [])
        users = data.user_features()        # a model that reads user attributes gets each user's
        if users:
            columns.append("user_index")
            user_tables = {name: tokens for name, (_, _, tokens) in users.items()}
        item_ids = np.concatenate([[None], data.item_ids()]).astype(object)     # index 0: padding
        type_names = np.array([""] + data.event_types, dtype=object)
    else:
        fs, root = filesystem(cfg.histories)
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise ConfigError(f"recommend.histories: {cfg.histories} does not exist")
        files = ([root] if info.type == pafs.FileType.File else
                 sorted(f.path for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                        if f.path.endswith(".parquet")))
        if not files:
            raise ConfigError(f"recommend.histories: no .parquet files in {cfg.histories}")
        _check_histories(files, fs)
        columns = None
    out = Path(cfg.output) if "://" not in cfg.output else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / CONFIG_FILE)
    now = cfg.now
    from raysrec.ray_utils import ensure_ray  # noqa: PLC0415

    ensure_ray(num_cpus=num_cpus)
    started = time.perf_counter()
    ds = ray.data.read_parquet(files, filesystem=fs, columns=columns)
    ds = ds.map_batches(
        _Answerer, batch_size=cfg.batch_size, batch_format="pyarrow", concurrency=cfg.num_actors,
        num_cpus=cfg.cpus_per_actor, num_gpus=1 if cfg.use_gpu else 0,
        fn_constructor_kwargs={"model": model, "k": cfg.k, "exclude_seen": cfg.exclude_seen, "now": now,
                               "device": "cuda" if cfg.use_gpu else "cpu", "torch_threads": cfg.torch_threads,
                               "item_ids": item_ids, "type_names": type_names, "user_tables": user_tables})
    out_fs, out_root = filesystem(cfg.output)
    ds.write_parquet(join(out_root, OUTPUT_DIR), filesystem=out_fs)
    seconds = time.perf_counter() - started
    rows = sum(m.num_rows for m in _written(out_fs, join(out_root, OUTPUT_DIR)))
    summary = {"rows": rows, "seconds": round(seconds, 2), "users_per_second": round(rows / max(seconds, 1e-9), 1),
               "k": cfg.k, "now": now, "model": redact(model)}
    with out_fs.open_output_stream(join(out_root, "summary.json")) as f:
        f.write(json.dumps(summary, indent=2).encode())
    return summary


def _written(fs, root: str) -> list:
    import pyarrow.fs as pafs  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    files = [f.path for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if f.path.endswith(".parquet")]
    return [pq.read_metadata(f, filesystem=fs) for f in files]

"""Benchmark: `raysrec prepare` (Ray Data) vs a single-process pandas implementation of the same steps.

Both read the same synthetic CSV log (>= 10M events by default), drop exact duplicates, order
each user's events by (timestamp, input order), build the dense item/user indices and write
per-user sequences to Parquet. Prints events/s of each and the ratio, measured in one run.

    python bench/prepare.py [--events 10000000] [--num-cpus N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from raysrec.data.pipeline import PrepareConfig, prepare
from raysrec.data.sources import SourceConfig
from raysrec.data.synth import SynthConfig, generate
from raysrec.ray_utils import ensure_ray


def pandas_reference(csv_path: Path, out: Path) -> int:
    """The straightforward single-process version a user would write."""
    frame = pd.read_csv(csv_path, engine="pyarrow")
    frame["ord"] = np.arange(len(frame))
    frame = frame.drop_duplicates(["user_id", "item_id", "timestamp"], keep="first")
    frame = frame.sort_values(["user_id", "timestamp", "ord"], kind="stable")
    counts = frame.groupby("user_id").size()
    frame = frame[frame["user_id"].isin(counts.index[counts >= 3])]
    items = np.sort(frame["item_id"].unique())
    frame["item_index"] = np.searchsorted(items, frame["item_id"].to_numpy()) + 1
    sequences = frame.groupby("user_id", sort=True).agg(sequence=("item_index", list), timestamps=("timestamp", list))
    sequences = sequences.reset_index()
    sequences.insert(0, "user_index", np.arange(len(sequences), dtype=np.int32))
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(sequences, preserve_index=False), out / "sequences.parquet")
    pd.DataFrame({"item_index": np.arange(1, len(items) + 1), "item_id": items}).to_parquet(out / "items.parquet")
    return int(len(frame))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=60_000)
    parser.add_argument("--items", type=int, default=40_000)
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="raysrec-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    csv_path = work / "interactions.csv"
    t = time.perf_counter()
    interactions, _ = generate(SynthConfig(num_users=args.users, num_items=args.items, num_events=args.events))
    pacsv.write_csv(pa.Table.from_pandas(interactions, preserve_index=False), csv_path)
    del interactions
    print(f"generated {args.events:,} events ({csv_path.stat().st_size / 1e6:.0f} MB CSV) in {time.perf_counter() - t:.1f}s")

    t = time.perf_counter()
    kept_pandas = pandas_reference(csv_path, work / "pandas")
    pandas_s = time.perf_counter() - t

    ensure_ray(num_cpus=args.num_cpus)
    t = time.perf_counter()
    manifest = prepare(PrepareConfig(source=SourceConfig(path=str(csv_path), id_type="int"),
                                     output=str(work / "raysrec"), overwrite=True))
    ray_s = time.perf_counter() - t
    assert manifest["rows_kept"] == kept_pandas, (manifest["rows_kept"], kept_pandas)

    import ray
    cpus = int(ray.cluster_resources().get("CPU", 0))
    print(f"\n{'implementation':<28}{'seconds':>10}{'events/s':>14}")
    print(f"{'pandas, single process':<28}{pandas_s:>10.1f}{args.events / pandas_s:>14,.0f}")
    print(f"{f'raysrec prepare ({cpus} CPUs)':<28}{ray_s:>10.1f}{args.events / ray_s:>14,.0f}")
    print(f"ratio raysrec/pandas (throughput): {pandas_s / ray_s:.2f}x")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

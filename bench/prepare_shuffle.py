"""Benchmark: the group stage's shuffle in `raysrec prepare`, task-based vs Ray Data's default, on the shared logs.

Ray Data's default shuffle starts aggregator actors for every run; up to ``TASK_SHUFFLE_MAX_SPLITS`` input splits
prepare shuffles with tasks instead (Ray Data's sort-based pull shuffle). For each log this prepares the same input
with both, in one Ray session, alternating and ``--repeats`` times each, checks that both write the same sequences,
users and items, and prints the median seconds and the ratio.

    python bench/prepare_shuffle.py [--logs ml-100k sports taobao synth] [--repeats 3] [--synth-events 2000000]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd

from raysrec.data import pipeline
from raysrec.data.pipeline import PrepareConfig, prepare
from raysrec.data.sources import SourceConfig
from raysrec.data.synth import SynthConfig, write
from raysrec.ray_utils import ensure_ray

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LOGS = {
    "ml-100k": lambda work, n: SourceConfig(path=str(SHARED / "ml-100k")),
    "sports": lambda work, n: SourceConfig(path=str(SHARED / "amazon-sports" / "Sports_and_Outdoors.txt"),
                                           format="user-lines"),
    "taobao": lambda work, n: SourceConfig(path=str(SHARED / "taobao-sample" / "UserBehavior.csv"),
                                           columns=["user_id", "item_id", "category_id", "behavior", "timestamp"],
                                           type_col="behavior", on_bad_row="skip"),
    "synth": lambda work, n: _synth(work, n),
}


def _synth(work: Path, events: int) -> SourceConfig:
    raw = work / f"synth-{events}"
    if not raw.is_dir():
        write(SynthConfig(output=str(raw), num_users=events // 20, num_items=max(1000, events // 100),
                          num_events=events, seed=0, format="csv"))
    return SourceConfig(path=str(raw), format="csv")


def _contents(folder: Path) -> list[pd.DataFrame]:
    files = [folder / "sequences", folder / "items.parquet", folder / "users.parquet"]
    return [pd.read_parquet(f) for f in files if f.exists()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", nargs="+", default=list(LOGS), choices=list(LOGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--synth-events", type=int, default=2_000_000)
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp folder)")
    args = parser.parse_args()
    ensure_ray(num_cpus=2)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="raysrec-shuffle-"))
    default_limit = pipeline.TASK_SHUFFLE_MAX_SPLITS
    print("| log | events read | Ray's default shuffle, s | task shuffle, s | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.logs:
        source = LOGS[name](work, args.synth_events)
        seconds: dict[str, list[float]] = {"default": [], "tasks": []}
        outputs, manifest = {}, {}
        for _ in range(args.repeats):
            for mode, limit in (("default", -1), ("tasks", 10**9)):
                pipeline.TASK_SHUFFLE_MAX_SPLITS = limit
                out = work / f"{name}-{mode}"
                shutil.rmtree(out, ignore_errors=True)
                started = time.perf_counter()
                manifest = prepare(PrepareConfig(source=source, output=str(out)))
                seconds[mode].append(time.perf_counter() - started)
                outputs[mode] = out
        pipeline.TASK_SHUFFLE_MAX_SPLITS = default_limit
        for a, b in zip(_contents(outputs["default"]), _contents(outputs["tasks"]), strict=True):
            pd.testing.assert_frame_equal(a, b)     # the same prepared data either way
        d, t = statistics.median(seconds["default"]), statistics.median(seconds["tasks"])
        print(f"| {name} | {manifest['rows_read']:,} | {d:.2f} | {t:.2f} | {d / t:.1f}x |",
              flush=True)


if __name__ == "__main__":
    main()

"""Benchmark: the final valid/test figures on a user sample (``train.final_eval_max_users``) against every user
(issue #25, step 3).

Trains one model single-process on a real log (Amazon Sports by default: 35,598 users, 18,357 items) with every
user scored at the end, then scores its checkpoint again on seeded samples of each size: the seconds per split,
the figure, the 95 % half-width printed with it, and whether the every-user figure lies inside. Over the seeds,
the interval should hold the every-user figure about 95 times in 100, and a split's seconds should fall with
the sample size. One JSON line per (size, seed) goes to ``--results``; the table is printed at the end.

    python bench/final_scoring.py --work /work/bench-work
    python bench/final_scoring.py --model /work/bench-work/final-sports --sizes 2000 5000 10000 20000

Nothing else should run meanwhile: the seconds are wall time on this machine's cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from features import prepared  # noqa: E402  (the benchmark's own data readers and cache)

from raysrec.evaluation import CheckpointEvaluator  # noqa: E402
from raysrec.models.config import ModelConfig  # noqa: E402
from raysrec.ray_utils import ensure_ray  # noqa: E402
from raysrec.train.config import TrainConfig  # noqa: E402
from raysrec.train.run import fit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEYS = ("ndcg@10", "hr@10")


def train(data: Path, out: Path, epochs: int) -> None:
    cfg = TrainConfig(data=str(data), output=str(out), epochs=epochs, patience=3, loss="gbce", final_eval_max_users=0,
                      model=ModelConfig(use_types=False, use_item_features=False))
    fit(cfg, use_ray=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="sports", help="a log of bench/features.py's DATA")
    parser.add_argument("--work", default=str(REPO / "runs" / "bench-final"), help="prepared data and the model")
    parser.add_argument("--model", default=None, help="score this model folder instead of training one")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--sizes", nargs="+", type=int, default=[2_000, 5_000, 10_000, 20_000])
    parser.add_argument("--seeds", type=int, default=20, help="samples of each size")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (a 2-CPU worker's)")
    parser.add_argument("--results", default=str(REPO / "bench" / "results" / "final_scoring.jsonl"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ensure_ray(num_cpus=2)
    data = prepared(args.data, work)
    model = Path(args.model) if args.model else work / f"final-{args.data}"
    if not (model / "metrics.json").is_file():
        train(data, model, args.epochs)
    evaluator = CheckpointEvaluator(data, model)
    base = evaluator.cfg
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    every = {}
    for split in ("valid", "test"):
        started = time.perf_counter()
        every[split] = evaluator.score(split=split, max_users=0)
        every[split]["seconds"] = time.perf_counter() - started
    print(json.dumps({"every_user": every}), flush=True)
    for size in args.sizes:
        for seed in range(args.seeds):
            evaluator.cfg = base.replace(seed=seed)
            for split in ("valid", "test"):
                started = time.perf_counter()
                scores = evaluator.score(split=split, max_users=size)
                row = {"data": args.data, "size": size, "seed": seed, "split": split,
                       "seconds": round(time.perf_counter() - started, 2), "users_total": scores.get("users_total"),
                       **{k: scores[k] for k in KEYS}, **{f"ci95_{k}": scores.get(f"ci95_{k}", 0.0) for k in KEYS},
                       **{f"every_{k}": every[split][k] for k in KEYS}}
                rows.append(row)
                with results.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
    print(f"\nevery user: valid {every['valid']['rows']:,} users in {every['valid']['seconds']:.1f} s, "
          f"test in {every['test']['seconds']:.1f} s; test ndcg@10 {every['test']['ndcg@10']:.4f}, "
          f"hr@10 {every['test']['hr@10']:.4f}\n")
    print("| users sampled | s / split | test NDCG@10 (mean over seeds) | 95 % half-width | covered (NDCG, HR) |")
    print("| --- | --- | --- | --- | --- |")
    for size in args.sizes:
        mine = [r for r in rows if r["size"] == size]
        test = [r for r in mine if r["split"] == "test"]
        covered = {k: sum(abs(r[k] - r[f"every_{k}"]) <= r[f"ci95_{k}"] for r in mine) / len(mine) for k in KEYS}
        print(f"| {size:,} | {statistics.mean(r['seconds'] for r in mine):.1f} | "
              f"{statistics.mean(r['ndcg@10'] for r in test):.4f} | "
              f"{statistics.mean(r['ci95_ndcg@10'] for r in test):.4f} | "
              f"{covered['ndcg@10']:.0%}, {covered['hr@10']:.0%} |")


if __name__ == "__main__":
    main()

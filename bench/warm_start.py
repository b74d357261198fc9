"""Benchmark: retraining on a newer log, warm start (``train.init_from``) vs from scratch (issue #16).

A nightly retrain, replayed on ML-100K with a global time split:

1. the *old* log is every event before T1 (``--t1-quantile`` of the event times); a model is trained
   on it from scratch (its own global time split: valid/test at the 0.8/0.9 quantiles of that log);
2. the *new* log is everything; it is prepared with the validation cut at ``--valid-quantile`` and the
   test cut T2 at ``--test-quantile`` of all event times, so the new model trains on events before the
   validation cut and is tested on each user's first event at or after T2;
3. on the new log: from scratch, warm start with a fresh optimizer (``init_optimizer: reset``), warm
   start with the old run's AdamW moments (``carry``), and warm start with shrink and perturb (Ash &
   Adams, NeurIPS 2020: ``init_shrink`` 0.5, ``init_perturb`` 0.1), same model, seed and early stopping.

Printed: epochs to the best validation epoch, seconds, test NDCG@10 / HR@10 of the best checkpoint, and
validation NDCG@10 at equal wall time (each run's curve read at the fastest run's time to its best).
Training is the local (single-process) loop, the code every Ray Train worker runs.

    python bench/warm_start.py                      # ~20 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from raysrec.data.pipeline import PrepareConfig, prepare
from raysrec.data.sources import SourceConfig
from raysrec.data.split import SplitConfig
from raysrec.models.config import ModelConfig
from raysrec.ray_utils import ensure_ray
from raysrec.train.config import TrainConfig
from raysrec.train.run import fit

REPO = Path(__file__).resolve().parents[1]
ML100K = Path(os.environ.get("RAYSREC_ML100K", REPO.parent / "shared" / "data" / "ml-100k"))


def curve(model_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative training seconds and valid NDCG@10 after each epoch (the model folder's history.csv)."""
    history = pd.read_csv(model_dir / "history.csv")
    return np.cumsum(history["epoch_seconds"].to_numpy()), history["valid_ndcg@10"].to_numpy()


def at_time(model_dir: Path, t: float) -> float:
    """The best valid NDCG@10 a run had reached by ``t`` seconds of training (0 before its first epoch)."""
    seconds, valid = curve(model_dir)
    done = valid[seconds <= t + 1e-9]
    return float(done.max()) if len(done) else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--t1-quantile", type=float, default=0.6)
    parser.add_argument("--valid-quantile", type=float, default=0.7)
    parser.add_argument("--test-quantile", type=float, default=0.85)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "raysrec-bench-warm"))
    parser.add_argument("--json", default="bench/results/warm_start.json")
    args = parser.parse_args()
    os.environ.setdefault("RAYSREC_PROGRESS", "0")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ensure_ray(num_cpus=os.cpu_count())

    inter = pd.read_csv(ML100K / "ml-100k.inter", sep="\t")
    inter.columns = [c.split(":")[0] for c in inter.columns]
    t1 = float(np.quantile(inter["timestamp"], args.t1_quantile, method="lower"))
    old_log = work / "old.csv"
    inter[inter["timestamp"] < t1][["user_id", "item_id", "timestamp"]].to_csv(old_log, index=False)
    all_log = work / "all.csv"
    inter[["user_id", "item_id", "timestamp"]].to_csv(all_log, index=False)

    def prepared(name: str, log: Path, split: SplitConfig) -> Path:
        out = work / name
        prepare(PrepareConfig(source=SourceConfig(path=str(log)), output=str(out), overwrite=True,
                              min_sequence_length=1, split=split))
        return out

    old = prepared("old", old_log, SplitConfig(protocol="global_time"))
    new = prepared("new", all_log, SplitConfig(protocol="global_time", valid_quantile=args.valid_quantile,
                                               test_quantile=args.test_quantile))
    splits = json.loads((new / "manifest.json").read_text())["splits"]
    print(f"old log: events before T1 = {pd.Timestamp(t1, unit='s')} ({(inter['timestamp'] < t1).sum():,} events); "
          f"new log: {len(inter):,} events, split {json.dumps(splits)}", flush=True)

    base = TrainConfig(model=ModelConfig(name="sasrec"), loss="ce", epochs=args.epochs, patience=args.patience,
                       seed=args.seed)
    started = time.time()
    old_model = fit(base.replace(data=str(old), output=str(work / "model-old")), use_ray=False)
    print(f"old model: {old_model['epochs']} epochs, {time.time() - started:.0f} s, "
          f"test NDCG@10 {old_model['test']['ndcg@10']:.4f} on its own log", flush=True)

    plain = {"init_from": str(work / "model-old"), "init_shrink": 1.0, "init_perturb": 0.0}
    runs = {"scratch": {}, "warm, optimizer reset": {**plain, "init_optimizer": "reset"},
            "warm, optimizer carried": {**plain, "init_optimizer": "carry"},
            "warm, shrink 0.5 + perturb 0.1": {"init_from": str(work / "model-old"), "init_shrink": 0.5,
                                               "init_perturb": 0.1}}
    results = {}
    for name, extra in runs.items():
        out = work / f"model-new-{len(results)}"
        metrics = fit(base.replace(data=str(new), output=str(out), **extra), use_ray=False)
        seconds, valid = curve(out)
        best = int(np.argmax(valid))
        results[name] = {"dir": out, "best_epoch": best + 1, "epochs": len(valid),
                         "seconds_to_best": float(seconds[best]), "seconds": float(seconds[-1]),
                         "test_ndcg@10": metrics["test"]["ndcg@10"], "test_hr@10": metrics["test"]["hr@10"],
                         "valid_ndcg@10": metrics["valid"]["ndcg@10"]}
        print(name, {k: v for k, v in results[name].items() if k != "dir"}, flush=True)

    budget = min(r["seconds_to_best"] for r in results.values())
    budget_scratch = results["scratch"]["seconds_to_best"]
    print(f"\nML-100K, global time split (new log: valid from {splits['valid_from_iso']}, test from "
          f"{splits['test_from_iso']}, {splits['test_users']} test users); SASRec 64-d x 2, full CE, seed {args.seed}")
    print(f"| run | best epoch | epochs run | s to best | test NDCG@10 | test HR@10 | valid NDCG@10 at {budget:.0f} s "
          f"| valid NDCG@10 at {budget_scratch:.0f} s (scratch's best) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for name, r in results.items():
        row = {k: v for k, v in r.items() if k != "dir"}
        row.update({"run": name, "valid_at_budget": at_time(r["dir"], budget),
                    "valid_at_scratch_best": at_time(r["dir"], budget_scratch)})
        rows.append(row)
        print(f"| {name} | {r['best_epoch']} | {r['epochs']} | {r['seconds_to_best']:.0f} | {r['test_ndcg@10']:.4f} | "
              f"{r['test_hr@10']:.4f} | {row['valid_at_budget']:.4f} | {row['valid_at_scratch_best']:.4f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"splits": splits, "t1": t1, "budget_seconds": budget, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()

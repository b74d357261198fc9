"""Benchmark: accuracy of sasrec and longshort, per loss, on ML-100K and on the synthetic default.

Every run is a real ``raysrec train`` through Ray Train (1 worker) with early stopping on valid
NDCG@10 and scores the best checkpoint on the test targets (leave-one-out, full ranking over the
catalogue, history masked). Results are appended to ``--results`` (JSON lines) as each run ends,
so an interrupted benchmark keeps what it measured; the table is printed from that file.

    python bench/accuracy.py                              # everything (about 1.5 h on 2 cores)
    python bench/accuracy.py --only ml-100k/sasrec/ce --seeds 0 1 2
    python bench/accuracy.py --table-only                 # print the table of what ran

Reference (issue #3): a plain single-process SASRec, full CE, max length 50, Adam 1e-3, on
ML-100K reaches test NDCG@10 0.0436 / HR@10 0.0827.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from raysrec.models.config import ModelConfig
from raysrec.ray_utils import ensure_ray
from raysrec.train.config import TrainConfig
from raysrec.train.run import fit

REPO = Path(__file__).resolve().parents[1]
ML100K = Path(os.environ.get("RAYSREC_ML100K", REPO.parent / "shared" / "data" / "ml-100k"))
REFERENCE = {"ndcg@10": 0.0436, "hr@10": 0.0827}
RUNS = [f"{data}/{model}/{loss}" for data in ("ml-100k", "synthetic") for model in ("sasrec", "longshort")
        for loss in ("ce", "sampled", "gbce", "bce")]


def prepared(kind: str, work: Path) -> Path:
    from raysrec.data.pipeline import PrepareConfig, prepare  # noqa: PLC0415
    from raysrec.data.sources import SourceConfig  # noqa: PLC0415
    from raysrec.data.synth import SynthConfig, write  # noqa: PLC0415

    out = work / kind / "prepared"
    if (out / "manifest.json").is_file():
        return out
    if kind == "ml-100k":
        source = str(ML100K)
    else:
        source = str(write(SynthConfig(output=str(work / kind / "raw"))))
    prepare(PrepareConfig(source=SourceConfig(path=source), output=str(out), overwrite=True))
    return out


def run_options(parser: argparse.ArgumentParser, name: str) -> tuple[argparse.Namespace, Path]:
    """The options every accuracy-style benchmark shares; parses them and returns the results file."""
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / f"raysrec-bench-{name}"))
    parser.add_argument("--results", default=f"bench/results/{name}.jsonl")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("RAYSREC_PROGRESS", "0")
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    return args, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=RUNS, help=f"subset of {RUNS}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="TrainConfig overrides for every run (e.g. lr=0.002 batch_size=256), recorded per row")
    args, results = run_options(parser, "accuracy")
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}

    if not args.table_only:
        ensure_ray(num_cpus=args.num_cpus)
        work = Path(args.workdir)
        for run in args.only:
            data_kind, model, loss = run.split("/")
            data = prepared(data_kind, work)
            for seed in args.seeds:
                tag = "".join(f"-{k}{v}" for k, v in overrides.items())
                cfg = TrainConfig(data=str(data), output=str(work / "runs" / f"{run}{tag}" / f"seed{seed}"),
                                  model=ModelConfig(name=model), loss=loss, seed=seed, epochs=args.epochs,
                                  patience=args.patience, cpus_per_worker=args.num_cpus).replace(**overrides)
                started = time.time()
                metrics = fit(cfg)
                row = {"data": data_kind, "model": model, "loss": loss, "seed": seed,
                       "test_ndcg@10": metrics["test"]["ndcg@10"], "test_hr@10": metrics["test"]["hr@10"],
                       "test_mrr@10": metrics["test"]["mrr@10"], "valid_ndcg@10": metrics["valid"]["ndcg@10"],
                       "epochs": metrics["epochs"], "best_epoch": metrics["best_epoch"],
                       "train_seconds": metrics["train_seconds"], "wall_seconds": round(time.time() - started, 1),
                       "seconds_to_best": seconds_to_best(Path(cfg.output)), "resolved_loss": metrics["loss"],
                       "overrides": overrides}
                with results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    table(results)


def seconds_to_best(model_dir: Path) -> float:
    """Wall seconds of training up to the end of the best epoch (time to accuracy, early stopping's extra
    epochs left out)."""
    history = pd.read_csv(model_dir / "history.csv")
    return round(float(history.loc[history["epoch"] <= history["best_epoch"].iloc[-1], "epoch_seconds"].sum()), 1)


def table(results: Path) -> None:
    frame = pd.read_json(results, lines=True)
    for column, default in (("seconds_to_best", float("nan")), ("overrides", None)):
        if column not in frame:
            frame[column] = default
    frame["recipe"] = frame["loss"] + frame["overrides"].map(
        lambda o: "".join(f" {k}={v}" for k, v in o.items()) if isinstance(o, dict) else "")
    grouped = frame.groupby(["data", "model", "recipe"]).agg(
        loss=("loss", "first"), seeds=("seed", "count"), ndcg=("test_ndcg@10", "mean"),
        ndcg_std=("test_ndcg@10", "std"), hr=("test_hr@10", "mean"), mrr=("test_mrr@10", "mean"),
        epochs=("epochs", "mean"), seconds=("train_seconds", "mean"), to_best=("seconds_to_best", "mean")
    ).reset_index()
    print("\n| data | model | recipe | seeds | test NDCG@10 (mean ± sd) | HR@10 | MRR@10 | epochs | train s | s to best |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in grouped.itertuples():
        sd = f" ± {r.ndcg_std:.4f}" if r.seeds > 1 else ""
        print(f"| {r.data} | {r.model} | {r.recipe} | {r.seeds} | {r.ndcg:.4f}{sd} | {r.hr:.4f} | {r.mrr:.4f} | "
              f"{r.epochs:.0f} | {r.seconds:.0f} | {r.to_best:.0f} |")
    grouped = grouped[grouped.recipe == grouped.loss]          # the comparisons below: default settings only
    ml = grouped[(grouped.data == "ml-100k") & (grouped.model == "sasrec") & (grouped.loss == "ce")]
    if len(ml):
        print(f"\nML-100K sasrec/ce vs the plain reference: NDCG@10 {ml.ndcg.iloc[0] / REFERENCE['ndcg@10']:.2f}x, "
              f"HR@10 {ml.hr.iloc[0] / REFERENCE['hr@10']:.2f}x")
    for data in ("ml-100k", "synthetic"):
        pair = grouped[(grouped.data == data) & (grouped.loss == "ce")].set_index("model")
        if {"sasrec", "longshort"} <= set(pair.index):
            print(f"{data}: longshort / sasrec NDCG@10 = {pair.ndcg['longshort'] / pair.ndcg['sasrec']:.3f}")


if __name__ == "__main__":
    main()

"""Benchmark: item attributes and event types in the model, on the shared real logs (issue #27, step 5).

Each run prepares its data once (cached in the work folder), then trains single-process (``fit(use_ray=False)``,
the loop a Ray Train worker runs) with early stopping on valid NDCG@10 and scores the best checkpoint on the test
targets: leave-one-out, full ranking over the catalogue, the user's history masked. One JSON line per run is
appended to ``--results`` as it ends; the table is printed from that file, with the published figures for
Amazon Sports beside it.

    python bench/features.py --runs sports/ids sports/attributes --seeds 0 1 2
    python bench/features.py --runs taobao/ids taobao/types ml-100k/ids ml-100k/genres
    python bench/features.py --runs taobao/buy-ids taobao/buy-types --seeds 0 1 2
    python bench/features.py --runs sports/ids-sampled4096 sports/ids-gbce --lr 1e-3
    python bench/features.py --table-only

Runs: ``sports/{ids,attributes}`` (S3-Rec's Sports_and_Outdoors with its item2attributes.json, fused by sum;
``attributes-input``: on the input side only; ``ids-ce``/``attributes-ce``: with the full softmax, whatever
loss auto picks; ``ids-{sampled,sampled4096,inbatch,gbce}``: IDs only with the other losses, issue #25's table),
``ml-100k/{ids,genres,users}`` (users: age, gender, occupation), ``taobao/{ids,types}`` (the four behaviour
types as input; next event of any type),
``taobao/{buy-ids,buy-types}`` (next-buy: only buys are targets, the history keeps every behaviour),
``rees46/{ids,types,attributes}`` (brand, category path, price bucket; a 3-hour slice, too small for claims).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from raysrec.data.pipeline import PrepareConfig, prepare
from raysrec.data.sources import SourceConfig
from raysrec.models.config import ModelConfig
from raysrec.ray_utils import ensure_ray
from raysrec.train.config import TrainConfig
from raysrec.train.run import fit

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SPORTS = SHARED / "amazon-sports"
# ../shared/data/amazon-sports/README.md: full ranking, leave-one-out, on exactly these files
PUBLISHED_SPORTS = [("SASRec (BCE, S3-Rec paper)", 0.0350, 0.0192), ("SASRec_F (attributes at the input)", 0.0277, 0.0144),
                    ("S3-Rec", 0.0385, 0.0204), ("SASRec in RecBole (DIF-SR paper)", 0.0526, 0.0233),
                    ("DIF-SR", 0.0556, 0.0264)]

DATA = {
    "sports": lambda: PrepareConfig(source=SourceConfig(
        path=str(SPORTS / "Sports_and_Outdoors.txt"), format="user-lines",
        items_path=str(SPORTS / "Sports_and_Outdoors_item2attributes.json")), item_features=["attributes:multi"]),
    "ml-100k": lambda: PrepareConfig(source=SourceConfig(path=str(SHARED / "ml-100k")),
                                     item_features=["categories:multi"],
                                     user_features=["age:numeric", "gender", "occupation"]),
    "taobao": lambda: PrepareConfig(source=SourceConfig(
        path=str(SHARED / "taobao-sample" / "UserBehavior.csv"),
        columns=["user_id", "item_id", "category_id", "behavior", "timestamp"], type_col="behavior",
        on_bad_row="skip"), item_features=["category_id"]),
    "rees46": lambda: PrepareConfig(source=SourceConfig(
        path=str(SHARED / "rees46-slice" / "2019-Oct-slice.csv"), item_col="product_id", time_col="event_time",
        type_col="event_type", on_bad_row="skip"), item_features=["brand", "category_code:path", "price:numeric"]),
}
# what each variant turns on (model options; target_types is the training option); "ids" is the plain model
VARIANTS = {"ids": {"use_types": False, "use_item_features": False},
            "types": {"use_types": True, "use_item_features": False},
            "attributes": {"use_types": False, "use_item_features": True},
            "genres": {"use_types": False, "use_item_features": True},
            "users": {"use_types": False, "use_item_features": False, "use_user_features": True},
            # next-buy prediction (train.target_types): buys are the only targets; the history keeps every type
            "buy-ids": {"use_types": False, "use_item_features": False, "target_types": ["buy"]},
            "buy-types": {"use_types": True, "use_item_features": False, "target_types": ["buy"]},
            # attributes on the input side only (the output side scores items by their ID rows)
            "attributes-input": {"use_types": False, "use_item_features": True, "features_on_output": False},
            # IDs only with the full softmax instead of what loss auto picks (issue #25's question on Sports)
            "ids-ce": {"use_types": False, "use_item_features": False, "loss": "ce"},
            "attributes-ce": {"use_types": False, "use_item_features": True, "loss": "ce"},
            # issue #25's loss table: IDs only, each loss at the default lr; sampled is 256 shared negatives
            "ids-sampled": {"use_types": False, "use_item_features": False, "loss": "sampled"},
            "ids-sampled4096": {"use_types": False, "use_item_features": False, "loss": "sampled",
                                "num_negatives": 4096},
            "ids-inbatch": {"use_types": False, "use_item_features": False, "loss": "sampled",
                            "in_batch_negatives": True},
            "ids-gbce": {"use_types": False, "use_item_features": False, "loss": "gbce"}}
# the variant keys that are training options, not model options
TRAIN_OPTIONS = ("target_types", "loss", "num_negatives", "in_batch_negatives")


def prepared(name: str, work: Path) -> Path:
    out = work / f"{name}-prepared"
    if not (out / "manifest.json").is_file():
        prepare(DATA[name]().replace(output=str(out), overwrite=True))
    return out


def run(spec: str, seed: int, work: Path, epochs: int, patience: int, lr: float | None = None,
        eval_max_users: int = 0) -> dict:
    name, variant = spec.split("/")
    data = prepared(name, work)
    options = dict(VARIANTS[variant])
    train = {key: options.pop(key) for key in TRAIN_OPTIONS if key in options}
    if lr is not None:
        train["lr"] = lr
    suffix = f"-lr{lr:g}" if lr is not None else ""
    cfg = TrainConfig(data=str(data), output=str(work / f"{name}-{variant}{suffix}-{seed}"), seed=seed, epochs=epochs,
                      patience=patience, eval_max_users=eval_max_users, model=ModelConfig(**options), **train)
    started = time.time()
    metrics = fit(cfg, use_ray=False)
    return {"run": spec + (f"@lr{lr:g}" if lr is not None else ""), "seed": seed, "lr": cfg.lr, "test_ndcg@10": metrics["test"]["ndcg@10"],
            "test_hr@10": metrics["test"]["hr@10"], "valid_ndcg@10": metrics["valid"]["ndcg@10"],
            "best_epoch": metrics["best_epoch"], "epochs": metrics["epochs"], "loss": metrics["loss"],
            "train_seconds": metrics["train_seconds"], "wall_seconds": round(time.time() - started, 1),
            "examples_per_second": metrics["examples_per_second"]}


def table(results: Path) -> str:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.is_file() else []
    by_run: dict[str, list[dict]] = {}
    for r in rows:
        by_run.setdefault(r["run"], []).append(r)
    lines = ["| run | seeds | test NDCG@10 | test HR@10 | best epoch | s to stop | loss |",
             "| --- | --- | --- | --- | --- | --- | --- |"]

    def spread(values: list[float]) -> str:
        mean = statistics.mean(values)
        return f"{mean:.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{mean:.4f}"

    for run_name, rs in by_run.items():
        lines.append(f"| {run_name} | {len(rs)} | {spread([r['test_ndcg@10'] for r in rs])} | "
                     f"{spread([r['test_hr@10'] for r in rs])} | {statistics.mean(r['best_epoch'] for r in rs):.0f} | "
                     f"{statistics.mean(r['train_seconds'] for r in rs):.0f} | {rs[0]['loss']} |")
    lines += ["", "Published on Amazon Sports (full ranking, leave-one-out):", "",
              "| model | HR@10 | NDCG@10 |", "| --- | --- | --- |",
              *[f"| {m} | {hr:.4f} | {ndcg:.4f} |" for m, hr, ndcg in PUBLISHED_SPORTS]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=["sports/ids", "sports/attributes"],
                        help=f"DATA/VARIANT with DATA in {list(DATA)} and VARIANT in {list(VARIANTS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--lr", type=float, default=None, help="every run at this lr (default: the train default); "
                                                                "the run is named VARIANT@lrLR")
    parser.add_argument("--eval-max-users", type=int, default=0,
                        help="users early stopping validates each epoch on (train.eval_max_users); the tables in "
                             "docs/benchmarks.md validate every user (0), as before the default sample of 10,000")
    parser.add_argument("--work", default=None, help="where prepared data and models go (default: a temp folder)")
    parser.add_argument("--results", default=str(REPO / "bench" / "results" / "features.jsonl"))
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    results = Path(args.results)
    if not args.table_only:
        ensure_ray(num_cpus=2)
        results.parent.mkdir(parents=True, exist_ok=True)
        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="raysrec-features-"))
        for seed in args.seeds:
            for spec in args.runs:
                row = run(spec, seed, work, args.epochs, args.patience, args.lr, args.eval_max_users)
                print(json.dumps(row), flush=True)
                with results.open("a") as out:
                    out.write(json.dumps(row) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()

"""Benchmark: language-model item text on ML-100K (titles + genres of ml-100k.item).

1. ``raysrec embed-items`` (Ray Data, packaged all-MiniLM-L6-v2) on the prepared ML-100K folder;
2. warm items: SASRec with and without text fusion, full catalogue (test NDCG@10 / HR@10);
3. cold start: ``--cold`` of the items (seeded) are removed from training histories and from the
   training softmax; test HR@10 / NDCG@10 on the users whose test item is one of them, with and
   without text, next to the random baseline (10 / items) and popularity (0: a cold item has no
   training interactions, so popularity never ranks it).

Each training run is a real Ray Train run (1 worker) with early stopping on valid NDCG@10. Results
are appended to ``--results`` as JSON lines, and the table is printed from that file.

    python bench/text.py [--seeds 0] [--cold 0.2] [--only warm cold] [--id-dropout 0.5]

``--id-dropout`` (text variants only) drops that share of the item ID embeddings at each training
step, so the text path alone has to rank well (DropoutNet): what cold items need.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pandas as pd
from accuracy import prepared, run_options  # same folder

from raysrec.data.storage import PreparedData
from raysrec.evaluation import held_out_items
from raysrec.models.config import ModelConfig
from raysrec.ray_utils import ensure_ray
from raysrec.text.embed import EmbedConfig, embed_items
from raysrec.train.config import TrainConfig
from raysrec.train.run import fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--cold", type=float, default=0.2)
    parser.add_argument("--only", nargs="+", default=["warm", "cold"], choices=["warm", "cold"])
    parser.add_argument("--variants", nargs="+", default=["ids", "text"], choices=["ids", "text"],
                        help="warm ids-only runs equal bench/accuracy.py's ml-100k/sasrec/ce runs of the same "
                             "seed; the table falls back to those when this file has none")
    parser.add_argument("--id-dropout", type=float, default=0.0, help="model.id_dropout of the text variants")
    args, results = run_options(parser, "text")
    if not args.table_only:
        ensure_ray(num_cpus=args.num_cpus)
        work = Path(args.workdir)
        data = work / "ml-100k-text"
        if not (data / "manifest.json").is_file() or "text_embedding" not in json.loads(
                (data / "manifest.json").read_text()):
            shutil.rmtree(data, ignore_errors=True)
            shutil.copytree(prepared("ml-100k", work), data)
            entry = embed_items(EmbedConfig(data=str(data)))
            print(f"embedded {entry['items']} items ({entry['dim']}-d) in {entry['seconds']} s "
                  f"({entry['items_per_second']} items/s)", flush=True)
        for protocol in args.only:
            for text in [v == "text" for v in args.variants]:
                for seed in args.seeds:
                    id_dropout = args.id_dropout if text else 0.0
                    name = f"text{int(text)}" + (f"-iddrop{id_dropout:g}" if id_dropout else "") + f"-s{seed}"
                    cfg = TrainConfig(data=str(data), output=str(work / "runs" / protocol / name),
                                      model=ModelConfig(use_text=text, id_dropout=id_dropout), seed=seed,
                                      epochs=args.epochs,
                                      patience=args.patience, cpus_per_worker=args.num_cpus,
                                      cold_items=args.cold if protocol == "cold" else 0.0)
                    started = time.time()
                    metrics = fit(cfg)
                    row = {"protocol": protocol, "text": text, "id_dropout": id_dropout, "seed": seed,
                           "cold_share": cfg.cold_items,
                           "test_ndcg@10": metrics["test"]["ndcg@10"], "test_hr@10": metrics["test"]["hr@10"],
                           "epochs": metrics["epochs"], "wall_seconds": round(time.time() - started, 1)}
                    if protocol == "cold":
                        for part in ("cold", "warm", "cold_among_cold"):
                            row.update({f"{part}_rows": metrics["cold"][f"test_{part}"]["rows"],
                                        f"{part}_hr@10": metrics["cold"][f"test_{part}"]["hr@10"],
                                        f"{part}_ndcg@10": metrics["cold"][f"test_{part}"]["ndcg@10"]})
                        row["cold_items"] = int(held_out_items(num_items(data), cfg.cold_items, seed).sum())
                    with results.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(json.dumps(row), flush=True)
    table(results, Path(args.workdir) / "ml-100k-text", args.cold)


def content_knn(data: Path, share: float, seed: int, last: int = 5) -> dict[str, float]:
    """A training-free baseline for cold items: cosine of each item's text vector with the mean text vector
    of the user's ``last`` history items; HR/NDCG@10 of the cold test targets, among all items and among
    the held-out ones, ranked by :mod:`raysrec.evaluation` (the same rows, masks and tie rule as the models)."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from raysrec.data.examples import evaluation_examples, history_matrix, subset  # noqa: PLC0415
    from raysrec.evaluation import full_ranking_ranks, metric_sums, without_items  # noqa: PLC0415
    from raysrec.text.embed import text_vectors  # noqa: PLC0415

    prepared = PreparedData.load(data)
    vectors = torch.from_numpy(text_vectors(prepared.items, prepared.num_items)).float()
    cold = held_out_items(prepared.num_items, share, seed)
    examples = evaluation_examples(without_items(prepared.read(), cold), 50, "test")
    rows = np.flatnonzero(cold[examples.targets()])
    examples = subset(examples, rows)
    inputs = torch.from_numpy(examples.input_ids[:, -last:])                            # (R, last), 0-padded
    counts = (inputs > 0).sum(1, keepdim=True).clamp(min=1)
    profile = vectors[inputs].sum(1) / counts                                         # (R, d) mean text vector
    scores = profile @ vectors.T                                                      # (R, N+1)
    targets = torch.from_numpy(examples.targets())
    history = history_matrix(examples, np.arange(len(rows)))
    out = {}
    for part, allowed in (("full", None), ("new", torch.from_numpy(cold))):
        sums = metric_sums(full_ranking_ranks(scores, targets, history, allowed), [10])
        out[f"hr_{part}"] = sums["hr@10"] / max(len(rows), 1)
        out[f"ndcg_{part}"] = sums["ndcg@10"] / max(len(rows), 1)
    return out


NUM_ITEMS = 1682   # ML-100K


def num_items(data: Path) -> int:
    return PreparedData.load(data).num_items


def variant(text: bool, id_dropout: float) -> str:
    return "sasrec" + (" + text" if text else "") + (f", ID dropout {id_dropout:g}" if id_dropout else "")


def table(results: Path, data: Path | None = None, share: float = 0.2) -> None:
    frame = pd.read_json(results, lines=True)
    if "id_dropout" not in frame:
        frame["id_dropout"] = 0.0
    frame["id_dropout"] = frame["id_dropout"].fillna(0.0)
    reference = results.parent / "accuracy.jsonl"
    if reference.is_file() and not ((frame.protocol == "warm") & ~frame.text).any():
        acc = pd.read_json(reference, lines=True)
        acc = acc[(acc.data == "ml-100k") & (acc.model == "sasrec") & (acc["loss"] == "ce")]
        seeds = set(frame[frame.protocol == "warm"].seed)
        acc = acc[acc.seed.isin(seeds)]
        frame = pd.concat([frame, pd.DataFrame({"protocol": "warm", "text": False, "id_dropout": 0.0, "seed": acc.seed,
                                                "test_ndcg@10": acc["test_ndcg@10"], "test_hr@10": acc["test_hr@10"],
                                                "epochs": acc.epochs})], ignore_index=True)
    warm = frame[frame.protocol == "warm"].groupby(["text", "id_dropout"]).agg(
        seeds=("seed", "count"), ndcg=("test_ndcg@10", "mean"), hr=("test_hr@10", "mean"), epochs=("epochs", "mean"))
    if len(warm):
        print("\nWarm (all items in training), ML-100K, full ranking:")
        print("| model | seeds | test NDCG@10 | test HR@10 | epochs |\n| --- | --- | --- | --- | --- |")
        for (text, drop), r in warm.iterrows():
            print(f"| {variant(text, drop)} | {int(r.seeds)} | {r.ndcg:.4f} | {r.hr:.4f} | {r.epochs:.0f} |")
    cold = frame[frame.protocol == "cold"]
    if len(cold):
        share = cold.cold_share.iloc[0]
        n_cold = int(cold.cold_items.dropna().iloc[0]) if "cold_items" in cold and cold.cold_items.notna().any() \
            else round(share * NUM_ITEMS)
        print(f"\nCold start: {share:.0%} of the items ({n_cold}) held out of training; test users whose item is one "
              "of them. Ranked among all items (full), and among the held-out items only (new items):")
        print("| model | seeds | cold rows | full: HR@10 | full: NDCG@10 | new items: HR@10 | new items: NDCG@10 | "
              "warm HR@10 | all-test NDCG@10 |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        print(f"| random | - | - | {10 / NUM_ITEMS:.4f} | - | {10 / n_cold:.4f} | - | - | - |")
        print("| popularity (cold items have no interactions) | - | - | 0.0000 | 0.0000 | = random | - | - | - |")
        if data is not None and (data / "manifest.json").is_file():
            knn = [content_knn(data, share, seed) for seed in sorted(set(cold.seed))]
            mean = {k: sum(m[k] for m in knn) / len(knn) for k in knn[0]}
            print(f"| text kNN (last 5 items, no training) | {len(knn)} | - | {mean['hr_full']:.4f} | "
                  f"{mean['ndcg_full']:.4f} | {mean['hr_new']:.4f} | {mean['ndcg_new']:.4f} | - | - |")
        agg = {"seeds": ("seed", "count"), "rows": ("cold_rows", "mean"), "chr": ("cold_hr@10", "mean"),
               "cndcg": ("cold_ndcg@10", "mean"), "whr": ("warm_hr@10", "mean"), "ndcg": ("test_ndcg@10", "mean")}
        if "cold_among_cold_hr@10" in cold:
            agg.update(nhr=("cold_among_cold_hr@10", "mean"), nndcg=("cold_among_cold_ndcg@10", "mean"))
        for (text, drop), r in cold.groupby(["text", "id_dropout"]).agg(**agg).iterrows():
            new = f"{r.nhr:.4f} | {r.nndcg:.4f}" if "nhr" in r else "- | -"
            print(f"| {variant(text, drop)} | {int(r.seeds)} | {r.rows:.0f} | {r.chr:.4f} | {r.cndcg:.4f} | {new} | "
                  f"{r.whr:.4f} | {r.ndcg:.4f} |")


if __name__ == "__main__":
    main()

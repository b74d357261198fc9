"""Benchmark: exact top-k vs the FAISS HNSW index (``serve.retrieval``) at catalogue scale.

Per catalogue size: index build seconds, recall@10 against exact (the figure ``GET /model`` reports),
and the time of ``Recommender.run`` on batches of 64 requests (8-item histories, seen items excluded,
k=10) with ``--threads`` torch/FAISS threads, exact vs HNSW. The model is SASRec 64-d with random
weights: item vectors without the cluster structure a trained table has, so the recall is a floor.
``--model DIR`` measures a trained model folder instead (histories of 8 items drawn by popularity).

    python bench/ann.py --items 100000 1000000
    python bench/ann.py --model runs/scale-50m/model --ef-search 256 512 1024 2048
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from raysrec.models.sequential import ModelConfig, build_model
from raysrec.serving.recommender import Query, Recommender


def timed(rec: Recommender, batches: list[list[Query]]) -> float:
    rec.run(batches[0])                                    # warm-up
    started = time.perf_counter()
    for batch in batches:
        rec.run(batch)
    return (time.perf_counter() - started) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[128], help="HNSW efSearch values to try")
    parser.add_argument("--model", help="a trained model folder (instead of random weights)")
    parser.add_argument("--json", default="bench/results/ann.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for n in ([0] if args.model else args.items):
        rng = np.random.default_rng(0)
        if args.model:
            exact = Recommender.load(args.model, retrieval="exact")
            n, ids, counts = exact.num_items, exact.item_ids, exact.counts
            p = (counts + 1.0) / (counts + 1.0).sum()
            draw = lambda rng=rng, n=n, ids=ids, p=p: [ids[i].item() for i in rng.choice(n, 8, p=p)]  # noqa: E731
        else:
            torch.manual_seed(0)
            model = build_model(ModelConfig(num_items=n, hidden_dim=64, num_heads=2, num_layers=2, max_length=50))
            ids, counts = np.arange(1, n + 1), np.arange(n, 0, -1, dtype=np.int64)
            draw = lambda rng=rng, n=n: [int(x) for x in rng.integers(1, n + 1, 8)]                   # noqa: E731
            exact = Recommender(model, ids, None, counts, {"version": "bench"}, retrieval="exact")
        batches = [[Query(history=draw(), k=10) for _ in range(64)] for _ in range(args.batches)]
        exact_s = timed(exact, batches)
        del exact
        ann = (Recommender.load(args.model, retrieval="hnsw", threads=args.threads) if args.model else
               Recommender(model, ids, None, counts, {"version": "bench"}, retrieval="hnsw", threads=args.threads))
        build = ann.metadata["retrieval"]["build_seconds"]
        for ef in args.ef_search:
            ann.ann.ef_search = ef
            recall = ann._ann_recall()["recall@10"]
            ann_s = timed(ann, batches)
            row = {"items": n, "model": args.model or "random", "ef_search": ef, "build_seconds": build, "recall@10": recall,
                   "exact_ms_per_batch": round(exact_s * 1e3, 2), "hnsw_ms_per_batch": round(ann_s * 1e3, 2),
                   "exact_requests_per_s": round(64 / exact_s), "hnsw_requests_per_s": round(64 / ann_s)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del ann
    print(f"\n| items | efSearch | HNSW build s | recall@10 | exact ms / batch of 64 | HNSW ms / batch | exact req/s | "
          f"HNSW req/s |  ({args.threads} thread(s))")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['items']:,} | {r['ef_search']} | {r['build_seconds']} | {r['recall@10']} | {r['exact_ms_per_batch']} | "
              f"{r['hnsw_ms_per_batch']} | {r['exact_requests_per_s']:,} | {r['hnsw_requests_per_s']:,} |")
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

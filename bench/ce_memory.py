"""Full cross-entropy at catalogue scale: peak memory and time of one forward + backward, plain vs chunked.

    python bench/ce_memory.py [--items 10000 100000 1000000] [--positions 6400] [--dim 64] [--chunk 8192]

Positions default to one training batch of SASRec's default shape (128 sequences x 50). Each case runs in
its own process, so its peak RSS (``ru_maxrss``) is its own; the baseline is the same process with no loss
computed (the table, the hidden states and their gradients only). Plain CE is skipped where its (positions x
items) logits and their gradient alone would not fit in the machine's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def one_case(items: int, positions: int, dim: int, chunk: int, mode: str) -> dict:
    import torch

    from raysrec.models.losses import softmax_ce

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    table = (torch.randn(items + 1, dim) * 0.1).requires_grad_()
    hidden = torch.randn(positions, dim).requires_grad_()
    allowed = torch.ones(items + 1, dtype=torch.bool)
    allowed[0] = False
    targets = torch.randint(1, items + 1, (positions,))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    if mode == "baseline":
        loss = (hidden.sum() + table.sum()) * 0.0
    else:
        loss = softmax_ce(hidden, table, targets, allowed, chunk_items=chunk if mode == "chunked" else 0)
    loss.backward()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"items": items, "mode": mode, "seconds": round(seconds, 3), "peak_rss_mib": round(peak / 1024),
            "rss_growth_mib": round((peak - base) / 1024), "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--positions", type=int, default=128 * 50)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        items, mode = args.case.split(":")
        print(json.dumps(one_case(int(items), args.positions, args.dim, args.chunk, mode)))
        return
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows = []
    for items in args.items:
        for mode in ("baseline", "plain", "chunked"):
            if mode == "plain" and 2 * args.positions * (items + 1) * 4 > 0.6 * memory:
                rows.append({"items": items, "mode": mode, "skipped": "logits + gradient exceed 60% of RAM"})
                continue
            proc = subprocess.run([sys.executable, __file__, "--case", f"{items}:{mode}",
                                   "--positions", str(args.positions), "--dim", str(args.dim),
                                   "--chunk", str(args.chunk)], capture_output=True, text=True)
            rows.append(json.loads(proc.stdout) if proc.returncode == 0 else
                        {"items": items, "mode": mode, "failed": proc.stderr.strip().splitlines()[-1:]})
    print(f"| items | mode | step s | peak RSS MiB | over baseline MiB | loss |  (positions {args.positions}, "
          f"dim {args.dim}, chunk {args.chunk})")
    print("| --- | --- | --- | --- | --- | --- |")
    base = {r["items"]: r for r in rows if r["mode"] == "baseline" and "peak_rss_mib" in r}
    for r in rows:
        if "peak_rss_mib" not in r:
            print(f"| {r['items']:,} | {r['mode']} | - | - | - | {r.get('skipped') or r.get('failed')} |")
            continue
        over = r["peak_rss_mib"] - base[r["items"]]["peak_rss_mib"] if r["items"] in base else "-"
        print(f"| {r['items']:,} | {r['mode']} | {r['seconds']} | {r['peak_rss_mib']:,} | {over:,} | {r['loss']:.4f} |")


if __name__ == "__main__":
    main()

"""Full cross-entropy at catalogue scale: memory and speed of forward + backward, plain vs chunked vs fused.

    python bench/ce_memory.py [--items 10000 100000 1000000] [--positions 6400] [--dim 64] [--chunk 8192]
    python bench/ce_memory.py --device cuda [--bf16] [--steps 20]      # adds the fused kernel (gpu extra)

Positions default to one training batch of SASRec's default shape (128 sequences x 50). Each case runs in
its own process, so its peak memory is its own: peak RSS (``ru_maxrss``) on CPU, ``max_memory_allocated``
on CUDA. The baseline is the same process with no loss computed (the table, the hidden states and their
gradients only). On CUDA each case times ``--steps`` steps after 3 warm-up steps and reports positions/s.
Plain CE is skipped where its (positions x items) logits and their gradient alone would not fit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MODES = ("baseline", "plain", "chunked", "fused")


def one_case(items: int, positions: int, dim: int, chunk: int, mode: str, device: str, bf16: bool,
             steps: int) -> dict:
    import torch

    from raysrec.models.losses import cce_softmax_ce, softmax_ce

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    dev = torch.device(device)
    table = (torch.randn(items + 1, dim, device=dev) * 0.1).requires_grad_()
    hidden = torch.randn(positions, dim, device=dev).requires_grad_()
    allowed = torch.ones(items + 1, dtype=torch.bool, device=dev)
    allowed[0] = False
    targets = torch.randint(1, items + 1, (positions,), device=dev)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16 and dev.type == "cuda"):
            h = hidden * 1.0            # an autocast-visible producer, as the model's last layer is
            if mode == "baseline":
                loss = (h.sum() + table.sum()) * 0.0
            elif mode == "fused":
                loss = cce_softmax_ce(h, table, targets)
            else:
                loss = softmax_ce(h, table, targets, allowed, chunk_items=chunk if mode == "chunked" else 0)
        loss.backward()
        hidden.grad = table.grad = None
        return loss

    cuda = dev.type == "cuda"
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cuda:
        torch.cuda.synchronize()
        base_gpu = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps if cuda else 1):
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / (steps if cuda else 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    row = {"items": items, "mode": mode, "seconds": round(seconds, 5), "positions_per_s": round(positions / seconds),
           "peak_rss_mib": round(peak / 1024), "rss_growth_mib": round((peak - base) / 1024), "loss": float(loss)}
    if cuda:
        row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        row["gpu_growth_mib"] = round((torch.cuda.max_memory_allocated() - base_gpu) / 2**20)
        row["gpu"] = torch.cuda.get_device_name()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--positions", type=int, default=128 * 50)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per case on CUDA")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        items, mode = args.case.split(":")
        print(json.dumps(one_case(int(items), args.positions, args.dim, args.chunk, mode, args.device, args.bf16,
                                  args.steps)))
        return
    cuda = args.device == "cuda"
    if cuda:
        import torch

        memory = torch.cuda.get_device_properties(0).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows = []
    for items in args.items:
        for mode in MODES:
            if mode == "fused" and not cuda:
                continue
            if mode == "plain" and 2 * args.positions * (items + 1) * 4 > 0.6 * memory:
                rows.append({"items": items, "mode": mode, "skipped": "logits + gradient exceed 60% of memory"})
                continue
            cmd = [sys.executable, __file__, "--case", f"{items}:{mode}", "--positions", str(args.positions),
                   "--dim", str(args.dim), "--chunk", str(args.chunk), "--device", args.device,
                   "--steps", str(args.steps)] + (["--bf16"] if args.bf16 else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            rows.append(json.loads(proc.stdout) if proc.returncode == 0 else
                        {"items": items, "mode": mode, "failed": proc.stderr.strip().splitlines()[-1:]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    memory_col = "peak GPU MiB | over baseline MiB" if cuda else "peak RSS MiB | over baseline MiB"
    device = next((r["gpu"] for r in rows if "gpu" in r), args.device)
    print(f"| items | mode | step s | positions/s | {memory_col} | loss |  ({device}, positions {args.positions}, "
          f"dim {args.dim}, chunk {args.chunk}{', bf16' if args.bf16 else ''})")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    key = "peak_gpu_mib" if cuda else "peak_rss_mib"
    base = {r["items"]: r for r in rows if r["mode"] == "baseline" and key in r}
    for r in rows:
        if key not in r:
            print(f"| {r['items']:,} | {r['mode']} | - | - | - | - | {r.get('skipped') or r.get('failed')} |")
            continue
        over = r[key] - base[r["items"]][key] if r["items"] in base else "-"
        print(f"| {r['items']:,} | {r['mode']} | {r['seconds']} | {r['positions_per_s']:,} | {r[key]:,} | {over:,} "
              f"| {r['loss']:.4f} |")


if __name__ == "__main__":
    main()

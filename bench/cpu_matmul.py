"""Benchmark: the full-CE logits and loss step on CPU with MKL's fp32 GEMM against oneDNN's matmul (``train.bf16``).

Amazon Sports' mean trimmed batch by default: 617 positions, 64-d, 18,359 item rows. Prints, for each route, the
logit matmul into an existing tensor (ms, and its largest difference from an fp64 reference) and one forward +
backward of :func:`softmax_ce` (ms, the median of ``--steps`` steps after 3 warm-up steps), in one process,
so the ratio is measured in the same run:

    python bench/cpu_matmul.py [--positions 617] [--items 18358] [--dim 64] [--steps 40] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from raysrec.models.losses import chunk_items_for, softmax_ce
from raysrec.models.sequential import cpu_training_matmuls


def timed(work, steps: int) -> float:
    for _ in range(3):
        work()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=617)
    parser.add_argument("--items", type=int, default=18_358)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.positions, args.dim, generator=g, requires_grad=True)
    table = (torch.randn(args.items + 1, args.dim, generator=g) * 0.3).requires_grad_()
    targets = torch.randint(1, args.items + 1, (args.positions,), generator=g)
    allowed = torch.ones(args.items + 1, dtype=torch.bool)
    allowed[0] = False
    chunk = chunk_items_for(args.positions, 8192, 128 * 50)
    logits = torch.empty(args.positions, args.items + 1)
    reference = hidden.detach().double() @ table.detach().double().T

    def step():
        softmax_ce(hidden, table, targets, allowed, 0.0, chunk).backward()
        hidden.grad = table.grad = None

    print(f"{args.positions} positions x {args.dim}-d x {args.items + 1:,} items, {args.threads} threads")
    print("| route | logit matmul ms | max abs diff from fp64 | loss forward + backward ms |")
    print("| --- | --- | --- | --- |")
    for name, bf16 in (("MKL fp32 (--no-bf16)", False), ("oneDNN (train.bf16)", True)):
        with cpu_training_matmuls(torch.device("cpu"), bf16), torch.no_grad():
            matmul = timed(lambda: torch.mm(hidden, table.T, out=logits), args.steps)
            diff = float((logits.double() - reference).abs().max())
        with cpu_training_matmuls(torch.device("cpu"), bf16):
            loss = timed(step, args.steps)
        print(f"| {name} | {matmul:.1f} | {diff:.1e} | {loss:.1f} |")


if __name__ == "__main__":
    main()

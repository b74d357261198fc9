"""Benchmark: what DDP all-reduces per step at catalogue scale, dense vs sparse item-table gradients.

The training step of ``raysrec train`` (model, loss, optimizer, batches: raysrec's own code) under
``torch.distributed`` DDP on gloo, as Ray Train's ``prepare_model`` wraps it, with 1 and 2 CPU workers on
this host. Per configuration it reports the step time, examples/s (all workers), and the bytes each worker
sent per step, **measured** on the loopback interface (``/proc/net/dev``, the only traffic between two
workers on one host) next to what the gradients hold: the dense parameters' bytes, and for sparse the
rows a step touched (coalesced) x (4 bytes x hidden + 8 for the index).

    python bench/ddp.py [--items 1000000] [--events 2000000] [--steps 30] [--loss sampled]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def lo_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            fields = rest.split()
            return int(fields[8])        # transmitted bytes (loopback: equal to received)
    return 0


def worker(rank: int, world: int, args: argparse.Namespace, sparse: bool, port: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from raysrec.data.examples import iterate_batches, training_examples
    from raysrec.data.storage import PreparedData
    from raysrec.models.sequential import ModelConfig, build_model
    from raysrec.train.config import TrainConfig
    from raysrec.train.loop import compute_loss
    from raysrec.train.optim import build_optimizer

    torch.set_num_threads(max(1, args.threads // world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    data = PreparedData.load(args.data)
    files = data.shard_files()
    seqs = data.read(files[rank::world])
    examples = training_examples(seqs, 50)
    cfg = TrainConfig(data=args.data, loss=args.loss, num_negatives=args.negatives,
                      model=ModelConfig(num_items=data.num_items, hidden_dim=args.dim))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, model.item_emb, cfg.lr, 0.0, sparse)
    ddp = DDP(model) if world > 1 else model
    pop = torch.tensor(data.item_popularity(), dtype=torch.float64) + 1.0
    pop[0] = 0.0
    log_q = (pop / pop.sum()).log().float() if args.loss == "sampled" else None
    generator = torch.Generator().manual_seed(rank)
    dense_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                      if not (sparse and n == "item_emb.weight"))
    times, positions, rows = [], 0, []
    sent = 0
    for step, batch in enumerate(iterate_batches(examples, args.batch_size, shuffle=True, num_steps=args.steps + 5)):
        if step == 5:
            dist.barrier()
            sent = lo_bytes()
        started = time.perf_counter()
        loss = compute_loss(ddp, batch, cfg, log_q, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sparse:
            grad = model.item_emb.weight.grad
            rows.append(int(grad.coalesce().indices().shape[1]))
        optimizer.step()
        if step >= 5:
            times.append(time.perf_counter() - started)
            positions += int((batch["target_ids"] > 0).sum())
    dist.barrier()
    sent = lo_bytes() - sent
    result = {"rank": rank, "step_ms": 1e3 * float(np.mean(times)), "positions": positions,
              "seconds": float(np.sum(times)), "dense_bytes": dense_bytes,
              "table_rows": float(np.mean(rows)) if rows else 0.0, "dim": args.dim}
    totals = [None] * world
    dist.all_gather_object(totals, result)
    if rank == 0:
        Path(out).write_text(json.dumps({"workers": totals, "lo_bytes": sent}))
    dist.destroy_process_group()


def run(args: argparse.Namespace, world: int, sparse: bool) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        port = 29500 + np.random.default_rng().integers(0, 1000)
        mp.spawn(worker, args=(world, args, sparse, int(port), out.name), nprocs=world, join=True)
        result = json.loads(Path(out.name).read_text())
    workers = result["workers"]
    seconds = max(w["seconds"] for w in workers)
    row_bytes = 4 * args.dim + 8
    return {"workers": world, "item_grads": "sparse" if sparse else "dense",
            "step_ms": max(w["step_ms"] for w in workers),
            "examples_per_second": sum(w["positions"] for w in workers) / seconds,
            "sent_mb_per_step_per_worker": result["lo_bytes"] / args.steps / world / 1e6 if world > 1 else 0.0,
            "gradient_mb": (workers[0]["dense_bytes"] + workers[0]["table_rows"] * row_bytes) / 1e6,
            "table_rows_per_step": workers[0]["table_rows"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a prepared folder (default: a synthetic log with --items / --events)")
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--loss", default="sampled", choices=["sampled", "gbce", "bce"])
    parser.add_argument("--negatives", type=int, default=256)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    args = parser.parse_args()
    if args.data is None:
        import sys  # noqa: PLC0415

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from train import synthetic  # noqa: PLC0415  (bench/train.py)

        from raysrec.ray_utils import ensure_ray  # noqa: PLC0415

        ensure_ray()
        args.data = str(synthetic(Path(args.workdir), args.items, args.events))
        import ray  # noqa: PLC0415

        ray.shutdown()
    rows = [run(args, world, sparse) for sparse in (False, True) for world in (1, 2)]
    print(f"\n{args.loss}, {args.dim}-d, batch {args.batch_size} x 50 per worker, {args.steps} steps, gloo on this host")
    print("| item grads | workers | step ms | examples/s (all) | gradient MB / step | sent MB / step / worker (measured) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['item_grads']} | {r['workers']} | {r['step_ms']:.0f} | {r['examples_per_second']:,.0f} | "
              f"{r['gradient_mb']:.1f} | {r['sent_mb_per_step_per_worker']:.1f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

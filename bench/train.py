"""Benchmark: training throughput of raysrec SASRec through Ray Train vs a plain PyTorch loop.

Three measurements in one run, on the same prepared data (ML-100K by default), model and batches:

1. ``plain``: a hand-written single-process loop (model, full-CE loss, AdamW), no Ray;
2. ``ray x1``: ``raysrec train`` through ``TorchTrainer`` with one worker holding all CPUs;
3. ``ray x2``: two DDP workers splitting the CPUs.

Throughput is training examples (target positions) per second inside the epoch loop, the
median over epochs; the wall time including Ray's worker-group start-up is printed too. On a
GPU box pass ``--use-gpu`` (bf16 autocast) and the plain loop runs on CUDA as well.

    python bench/train.py [--data PREPARED_DIR] [--epochs 3] [--num-cpus N] [--use-gpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from raysrec.data.examples import iterate_batches, training_examples
from raysrec.data.storage import PreparedData
from raysrec.models.losses import full_softmax_ce
from raysrec.models.sequential import ModelConfig, build_model
from raysrec.ray_utils import ensure_ray
from raysrec.train.config import TrainConfig
from raysrec.train.run import fit

REPO = Path(__file__).resolve().parents[1]
ML100K = Path(os.environ.get("RAYSREC_ML100K", REPO.parent / "shared" / "data" / "ml-100k"))


def prepared_ml100k(workdir: Path) -> Path:
    from raysrec.data.pipeline import PrepareConfig, prepare  # noqa: PLC0415
    from raysrec.data.sources import SourceConfig  # noqa: PLC0415

    out = workdir / "ml-100k"
    prepare(PrepareConfig(source=SourceConfig(path=str(ML100K)), output=str(out), overwrite=True))
    return out


def plain_loop(cfg: TrainConfig, device: str) -> list[float]:
    """What a user writes by hand: same model, batches and loss; examples/s per epoch."""
    torch.manual_seed(cfg.seed)
    data = PreparedData.load(cfg.data)
    model_cfg = cfg.model.replace(num_items=data.num_items)
    examples = training_examples(data.read(), model_cfg.max_length, cfg.train_windows)
    model = build_model(model_cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
    use_bf16 = device == "cuda" and cfg.bf16
    rates = []
    for epoch in range(cfg.epochs):
        started, n = time.perf_counter(), 0
        for batch in iterate_batches(examples, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                                     device=torch.device(device)):
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16):
                valid = batch["target_ids"] > 0
                loss = full_softmax_ce(model, model(batch)[valid], batch["target_ids"][valid])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n += int((batch["target_ids"] > 0).sum())
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - started))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a prepared folder (default: ML-100K from ../shared, prepared here)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    os.environ.setdefault("RAYSREC_PROGRESS", "0")

    ensure_ray(num_cpus=args.num_cpus)
    work = Path(tempfile.mkdtemp(prefix="raysrec-bench-train-"))
    data = args.data or str(prepared_ml100k(work))
    device = "cuda" if args.use_gpu else "cpu"
    base = TrainConfig(data=data, model=ModelConfig(), epochs=args.epochs, patience=args.epochs,
                       use_gpu=args.use_gpu, bf16=True)
    torch.set_num_threads(args.num_cpus)
    rows = []
    started = time.perf_counter()
    plain = statistics.median(plain_loop(base, device))
    rows.append(("plain PyTorch loop, 1 process", plain, time.perf_counter() - started))
    for workers in args.workers:
        cfg = base.replace(output=str(work / f"ray{workers}"), num_workers=workers,
                           cpus_per_worker=max(1, args.num_cpus // workers) if not args.use_gpu else 1,
                           gpus_per_worker=1.0 / workers)
        started = time.perf_counter()
        metrics = fit(cfg)
        rows.append((f"raysrec, Ray Train x{workers} worker(s)", metrics["examples_per_second"],
                     time.perf_counter() - started))
    print(f"\nSASRec (64-d, 2 layers, max_length {base.model.max_length}, full CE, batch {base.batch_size}), "
          f"{args.epochs} epochs, device {device}, {args.num_cpus} CPUs")
    print("| run | examples/s (median epoch) | ratio vs plain | wall s incl. start-up + eval |")
    print("| --- | --- | --- | --- |")
    for name, rate, wall in rows:
        print(f"| {name} | {rate:,.0f} | {rate / plain:.2f}x | {wall:.1f} |")
    if len(rows) >= 3:
        print(f"\n{args.workers[1]} workers vs {args.workers[0]}: {rows[2][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()

"""Benchmark: training throughput of raysrec SASRec through Ray Train vs a plain PyTorch loop.

Three measurements in one run, on the same prepared data (ML-100K by default), model and batches:

1. ``plain``: a hand-written single-process loop (model, full-CE loss, AdamW), no Ray;
2. ``ray x1``: ``raysrec train`` through ``TorchTrainer`` with one worker holding all CPUs;
3. ``ray x2``: two DDP workers splitting the CPUs.

Throughput is training examples (target positions) per second inside the epoch loop, the
median over epochs; the wall time including Ray's worker-group start-up is printed too. On a
GPU box pass ``--use-gpu`` (bf16 autocast) and the plain loop runs on CUDA as well; ``--ce`` then
runs the plain loop once per full-CE implementation and reports each one's peak GPU memory: ``plain`` is
PyTorch's own ``F.cross_entropy`` over the whole logit matrix (what a user writes); ``chunked`` is
:class:`ChunkedLogSumExp` scoring ``ce_chunk_items`` items at a time whatever the batch, recomputing the logits in
backward (raysrec before trimmed batches sized it); ``auto`` is what training does (the chunk sized to the
trimmed batch, the softmax kept for backward when the catalogue fits, and on CPU the step's matmuls through
oneDNN: ``cpu_training_matmuls``, which ``--no-bf16`` turns off); ``fused`` is Cut Cross-Entropy. ``--ce``
works on CPU too.
``--synthetic-items N`` trains on a generated log with an N-item catalogue instead of ML-100K; ``--sports`` on
Amazon Sports (../shared/data/amazon-sports, one user per line, converted here to a CSV whose time is the
line position). ``--layouts`` runs the plain loop once per batch layout: ``padded`` (every batch
max_length wide, as before), ``trimmed`` (each batch as wide as its longest row) and ``grouped`` (trimmed,
rows of similar length batched together: ``train.group_by_length``). ``--compile`` runs each plain loop a
second time with the model under ``torch.compile(dynamic=True)`` (trimmed batches vary in width); its first
epoch includes the compilation, so give ``--epochs 3`` and read the median.

    python bench/train.py [--data PREPARED_DIR] [--epochs 3] [--num-cpus N] [--use-gpu]
    python bench/train.py --use-gpu --synthetic-items 1000000 --ce plain chunked fused --workers
    python bench/train.py --sports --layouts padded trimmed grouped --workers --epochs 1
    python bench/train.py --sports --compile --workers --epochs 3
    python bench/train.py --sports --ce plain chunked auto --workers --epochs 1
    python bench/train.py --sports --ce auto --no-bf16 --workers --epochs 1   # MKL's fp32 matmuls on CPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from raysrec.data.examples import iterate_batches, training_examples
from raysrec.data.storage import PreparedData
from raysrec.models.losses import full_softmax_ce
from raysrec.models.sequential import ModelConfig, build_model, cpu_training_matmuls
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


def synthetic(workdir: Path, items: int, events: int) -> Path:
    from raysrec.data.pipeline import PrepareConfig, prepare  # noqa: PLC0415
    from raysrec.data.sources import SourceConfig  # noqa: PLC0415
    from raysrec.data.synth import SynthConfig, write  # noqa: PLC0415

    raw, out = workdir / f"synth-{items}", workdir / f"synth-{items}-prepared"
    write(SynthConfig(output=str(raw), num_users=max(1000, events // 50), num_items=items, num_events=events,
                      seed=0))
    prepare(PrepareConfig(source=SourceConfig(path=str(raw)), output=str(out), overwrite=True))
    return out


LAYOUTS = {"padded": {"trim": False, "group_by_length": 0}, "trimmed": {"trim": True, "group_by_length": 0},
           "grouped": {"trim": True, "group_by_length": 64}}


def sports_csv(workdir: Path) -> Path:
    """Amazon Sports' `user item item ...` lines as user,item,timestamp rows (timestamp = position in the line)."""
    source = REPO.parent / "shared" / "data" / "amazon-sports" / "Sports_and_Outdoors.txt"
    out = workdir / "sports.csv"
    with source.open() as lines, out.open("w") as csv:
        csv.write("user_id,item_id,timestamp\n")
        for line in lines:
            user, *items = line.split()
            csv.writelines(f"{user},{item},{t}\n" for t, item in enumerate(items))
    return out


def prepared_csv(workdir: Path, csv: Path) -> Path:
    from raysrec.data.pipeline import PrepareConfig, prepare  # noqa: PLC0415
    from raysrec.data.sources import SourceConfig  # noqa: PLC0415

    out = workdir / f"{csv.stem}-prepared"
    prepare(PrepareConfig(source=SourceConfig(path=str(csv)), output=str(out), overwrite=True))
    return out


def plain_loop(cfg: TrainConfig, device: str, ce: str = "chunked", layout: str = "grouped", compile: bool = False
               ) -> tuple[list[float], float]:
    """What a user writes by hand: same model, batches and loss; examples/s per epoch and peak GPU MiB."""
    torch.manual_seed(cfg.seed)
    data = PreparedData.load(cfg.data)
    model_cfg = cfg.model.replace(num_items=data.num_items)
    examples = training_examples(data.read(), model_cfg.max_length, cfg.train_windows)
    model = build_model(model_cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
    if compile:
        model = torch.compile(model, dynamic=True)
    use_bf16 = device == "cuda" and cfg.bf16
    kernel = "cce" if ce == "fused" else "torch"
    max_positions = cfg.batch_size * model_cfg.max_length if ce == "auto" else 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rates = []
    for epoch in range(cfg.epochs):
        started, n = time.perf_counter(), 0
        with cpu_training_matmuls(torch.device(device), cfg.bf16 and ce == "auto"):
            for batch in iterate_batches(examples, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                                         device=torch.device(device), **LAYOUTS[layout]):
                step(model, optimizer, batch, cfg, ce, use_bf16, kernel, max_positions)
                n += (batch["target_ids"] > 0).sum()
        n = int(n)                                   # waits for the last step
        rates.append(n / (time.perf_counter() - started))
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    return rates, peak


def step(model, optimizer, batch, cfg: TrainConfig, ce: str, use_bf16: bool, kernel: str, max_positions: int) -> None:
    """One step of the plain loop."""
    device = batch["input_ids"].device.type
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_bf16):
        valid = batch["target_ids"] > 0
        hidden, targets = model(batch).hidden[valid], batch["target_ids"][valid]
        if ce == "plain":
            loss = F.cross_entropy(hidden.float() @ model.item_rows(None, None)[1:].float().T, targets - 1)
        else:
            loss = full_softmax_ce(model, hidden, targets, chunk_items=cfg.ce_chunk_items, kernel=kernel,
                                   max_positions=max_positions)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a prepared folder (default: ML-100K from ../shared, prepared here)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="Ray Train runs (none: plain only)")
    parser.add_argument("--ce", nargs="+", default=["chunked"], choices=["plain", "chunked", "auto", "fused"],
                        help="full-CE implementations for the plain loop")
    parser.add_argument("--synthetic-items", type=int, help="train on a generated log with this many items")
    parser.add_argument("--sports", action="store_true", help="train on Amazon Sports (../shared/data/amazon-sports)")
    parser.add_argument("--layouts", nargs="+", default=["grouped"], choices=list(LAYOUTS),
                        help="batch layouts for the plain loop")
    parser.add_argument("--compile", action="store_true", help="each plain loop once more under torch.compile")
    parser.add_argument("--synthetic-events", type=int, default=2_000_000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=50)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="train.bf16: CUDA autocast; on CPU the auto CE rows and Ray runs' matmuls through oneDNN")
    args = parser.parse_args()
    os.environ.setdefault("RAYSREC_PROGRESS", "0")

    ensure_ray(num_cpus=args.num_cpus)
    work = Path(tempfile.mkdtemp(prefix="raysrec-bench-train-"))
    if args.synthetic_items:
        data = str(synthetic(work, args.synthetic_items, args.synthetic_events))
    elif args.sports:
        data = str(prepared_csv(work, sports_csv(work)))
    else:
        data = args.data or str(prepared_ml100k(work))
    device = "cuda" if args.use_gpu else "cpu"
    model = ModelConfig(hidden_dim=args.hidden, max_length=args.max_length)
    base = TrainConfig(data=data, model=model, epochs=args.epochs, patience=args.epochs,
                       use_gpu=args.use_gpu, bf16=args.bf16)
    torch.set_num_threads(args.num_cpus)
    rows = []
    started = time.perf_counter()
    plain = None
    for ce in args.ce:
        for layout in args.layouts:
            for compiled in ([False, True] if args.compile else [False]):
                started = time.perf_counter()
                rates, peak = plain_loop(base, device, ce, layout, compiled)
                rate = statistics.median(rates)
                plain = plain or rate
                rows.append((f"plain PyTorch loop, 1 process, {ce} CE, {layout} batches"
                             f"{', torch.compile' if compiled else ''} (epochs: {', '.join(f'{r:,.0f}' for r in rates)})",
                             rate, time.perf_counter() - started, peak))
    for workers in args.workers:
        cfg = base.replace(output=str(work / f"ray{workers}"), num_workers=workers,
                           cpus_per_worker=max(1, args.num_cpus // workers) if not args.use_gpu else 1,
                           gpus_per_worker=1.0 / workers)
        started = time.perf_counter()
        metrics = fit(cfg)
        rows.append((f"raysrec, Ray Train x{workers} worker(s)", metrics["examples_per_second"],
                     time.perf_counter() - started, float("nan")))
    items = PreparedData.load(data).num_items
    gpu = f" ({torch.cuda.get_device_name()})" if args.use_gpu else ""
    print(f"\nSASRec ({args.hidden}-d, 2 layers, max_length {base.model.max_length}, full CE, batch "
          f"{base.batch_size}), {items:,} items, {args.epochs} epochs, device {device}{gpu}, {args.num_cpus} CPUs")
    print("| run | examples/s (median epoch) | ratio vs first | peak GPU MiB | wall s incl. start-up + eval |")
    print("| --- | --- | --- | --- | --- |")
    for name, rate, wall, peak in rows:
        print(f"| {name} | {rate:,.0f} | {rate / plain:.2f}x | {peak:,.0f} | {wall:.1f} |")
    ray_rows = [r for r in rows if r[0].startswith("raysrec")]
    if len(ray_rows) >= 2:
        print(f"\n{args.workers[1]} workers vs {args.workers[0]}: {ray_rows[1][1] / ray_rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()

"""Benchmark: the validation cost per epoch, and whether a cheaper validation still finds the best epoch (issue #25,
step 3).

Trains the default recipe single-process (the loop a Ray Train worker runs) for a fixed number of epochs on a real
log (Amazon Sports by default), and after every epoch scores the checkpoint on every user's valid and test target
(full ranking, history masked), keeping each user's NDCG@10. Early stopping is then replayed on those curves for
each way of validating, exactly as the training loop does it (the best valid NDCG@10 so far, strictly; stop after
``--patience`` epochs without a better one):

* every user, every epoch (what ``train.eval_max_users: 0`` does);
* a fixed, seeded sample of N users (``train.eval_max_users: N``, default 10,000; the loop's own sampler), for many
  seeds;
* every user, every k-th epoch (patience counted in epochs).

Each rule's pick is judged by the every-user test NDCG@10 of the epoch it picks, against the every-user rule's,
and by what its validation costs (users scored per epoch x the measured seconds per user). One JSON line per
rule goes to ``--results``; the table is printed at the end.

    python bench/validation_cost.py --work /work/bench-work
    python bench/validation_cost.py --work /work/bench-work --replay-only     # the curves are kept in WORK

Nothing else should run meanwhile: the seconds are wall time on this machine's cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from features import prepared  # noqa: E402  (the benchmark's own data readers and cache)

from raysrec.data.examples import evaluation_examples, sample_rows  # noqa: E402
from raysrec.evaluation import CheckpointEvaluator, iterate_ranks, metric_values  # noqa: E402
from raysrec.ray_utils import ensure_ray  # noqa: E402
from raysrec.train.config import TrainConfig, improves  # noqa: E402
from raysrec.train.loop import LocalSession, train_loop  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class CurveSession(LocalSession):
    """A local session that scores every epoch's checkpoint on every user, valid and test, and keeps each
    user's NDCG@10 (``curves/epoch-NNNN.npz``) with the seconds each split took."""

    def __init__(self, data: Path, curves: Path, scratch: Path) -> None:
        super().__init__(scratch / "best")
        self.data, self.curves = data, curves
        curves.mkdir(parents=True, exist_ok=True)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[Path]) -> None:
        super().report(metrics, checkpoint_dir)
        evaluator = CheckpointEvaluator(self.data, checkpoint_dir)
        arrays, seconds = {}, {}
        for split in ("valid", "test"):
            examples = evaluation_examples(evaluator.seqs, evaluator.model.cfg.max_length, split)
            started = time.perf_counter()
            ranks = torch.cat(list(iterate_ranks(evaluator.model, examples, batch_size=evaluator.cfg.eval_batch_size,
                                                 device=evaluator.device, bf16=evaluator.cfg.bf16,
                                                 chunk_items=evaluator.cfg.eval_chunk_items)))
            seconds[split] = time.perf_counter() - started
            arrays[split] = metric_values(ranks, [10])["ndcg@10"].cpu().numpy()
        np.savez(self.curves / f"epoch-{metrics['epoch']:04d}.npz", **arrays,
                 train_seconds=metrics["epoch_seconds"], **{f"{k}_seconds": v for k, v in seconds.items()})
        print(f"  every user: valid {arrays['valid'].mean():.4f} ({seconds['valid']:.1f} s), "
              f"test {arrays['test'].mean():.4f} ({seconds['test']:.1f} s)", flush=True)


def record(data: Path, work: Path, epochs: int, seed: int) -> None:
    """Train ``epochs`` epochs (no early stopping) and keep the every-user curves. The loop's own validation is
    cut to one user: the rules below are replayed on the curves, not on it."""
    cfg = TrainConfig(data=str(data), output=str(work / "model"), epochs=epochs, patience=epochs, seed=seed,
                      eval_max_users=1, final_eval_max_users=1)
    train_loop(cfg, CurveSession(data, work / "curves", work / "scratch"))


def load(curves: Path) -> dict[str, Any]:
    files = sorted(curves.glob("epoch-*.npz"))
    if not files:
        raise SystemExit(f"{curves}: no curves; run without --replay-only first")
    loaded = [np.load(f) for f in files]
    return {"valid": np.stack([z["valid"] for z in loaded]), "test": np.stack([z["test"] for z in loaded]),
            "train_seconds": np.array([float(z["train_seconds"]) for z in loaded]),
            "valid_seconds": np.array([float(z["valid_seconds"]) for z in loaded])}


def replay(valid: np.ndarray, validated: list[int], patience: int) -> tuple[int, Optional[int]]:
    """The training loop's early stopping over ``valid`` (one figure per epoch, epoch 1 at index 0), validating
    only the 1-based epochs ``validated``: (the best epoch, the epoch it stops at, or None if the curve ends
    first)."""
    best, best_epoch = -1.0, -1
    for epoch in validated:
        if improves(float(valid[epoch - 1]), best):
            best, best_epoch = float(valid[epoch - 1]), epoch
        elif epoch - best_epoch >= patience:
            return best_epoch, epoch
    return best_epoch, None


def rules(curves: dict[str, Any], sizes: list[int], samples: int, every: list[int], patience: int, seed: int):
    valid, test = curves["valid"], curves["test"]
    epochs, users = valid.shape
    per_user = float(np.median(curves["valid_seconds"])) / users
    train_epoch = float(np.median(curves["train_seconds"]))
    test_at = test.mean(1)

    def row(rule: str, picks: list[tuple[int, Optional[int]]], users_scored: int, k: int = 1) -> dict[str, Any]:
        best = [b for b, _ in picks]
        stops = [s for _, s in picks if s is not None]
        validations = [(s or epochs) // k for _, s in picks]      # validated epochs up to the stop
        return {"rule": rule, "draws": len(picks), "users": users_scored,
                "valid_s_per_epoch": users_scored * per_user / k,
                "best_epochs": sorted(set(best)), "best_epoch_mean": statistics.mean(best),
                "test_ndcg@10_mean": float(statistics.mean(test_at[b - 1] for b in best)),
                "test_ndcg@10_min": float(min(test_at[b - 1] for b in best)),
                "stop_epoch_mean": statistics.mean(stops) if stops else None, "ran_past_curve": len(picks) - len(stops),
                "seconds_to_stop_mean": statistics.mean(
                    (s or epochs) * train_epoch + n * users_scored * per_user for (_, s), n in zip(picks, validations))}

    out = [row("every user, every epoch", [replay(valid.mean(1), list(range(1, epochs + 1)), patience)], users)]
    for size in sizes:
        picks = []
        for draw in range(samples):
            rows = sample_rows(users, size, seed + draw)
            picks.append(replay(valid[:, rows].mean(1), list(range(1, epochs + 1)), patience))
        out.append(row(f"{size:,} users, every epoch", picks, min(size, users)))
    for k in every:
        out.append(row(f"every user, every {k} epochs", [replay(valid.mean(1), list(range(k, epochs + 1, k)),
                                                               patience)], users, k))
    return out, {"epochs": epochs, "users": users, "train_s_per_epoch": train_epoch,
                 "valid_s_every_user": float(np.median(curves["valid_seconds"])),
                 "valid_ndcg@10": [round(float(v), 4) for v in valid.mean(1)],
                 "test_ndcg@10": [round(float(v), 4) for v in test_at]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="sports", help="a log of bench/features.py's DATA")
    parser.add_argument("--work", default=str(REPO / "runs" / "bench-validation"), help="prepared data and curves")
    parser.add_argument("--epochs", type=int, default=20, help="epochs recorded (no early stopping)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patience", type=int, default=10, help="the replayed early stopping's, in epochs")
    parser.add_argument("--sizes", nargs="+", type=int, default=[1_000, 2_000, 5_000, 10_000, 20_000])
    parser.add_argument("--samples", type=int, default=50, help="seeded user samples of each size")
    parser.add_argument("--every", nargs="+", type=int, default=[2, 3])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (a 2-CPU worker's)")
    parser.add_argument("--replay-only", action="store_true", help="replay the rules on the curves already in WORK")
    parser.add_argument("--results", default=str(REPO / "bench" / "results" / "validation_cost.jsonl"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    work = Path(args.work) / f"validation-{args.data}-{args.seed}"
    if not args.replay_only:
        ensure_ray(num_cpus=2)
        record(prepared(args.data, Path(args.work)), work, args.epochs, args.seed)
    rows, curve = rules(load(work / "curves"), args.sizes, args.samples, args.every, args.patience, args.seed)
    print(json.dumps({"data": args.data, "seed": args.seed, **curve}), flush=True)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a") as out:
        for r in rows:
            out.write(json.dumps({"data": args.data, "seed": args.seed, **r}) + "\n")
    print(f"\n{args.data}: {curve['users']:,} users, {curve['train_s_per_epoch']:.0f} s of training an epoch, "
          f"{curve['valid_s_every_user']:.1f} s to validate every user\n")
    print("| rule | validation s / epoch | best epochs picked | test NDCG@10 at the pick (mean, worst) | "
          "stops at (mean) | s to stop |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        stop = f"{r['stop_epoch_mean']:.1f}" if r["stop_epoch_mean"] is not None else "-"
        if r["ran_past_curve"]:
            stop += f" ({r['ran_past_curve']} of {r['draws']} past the curve)"
        print(f"| {r['rule']} | {r['valid_s_per_epoch']:.1f} | {', '.join(map(str, r['best_epochs']))} | "
              f"{r['test_ndcg@10_mean']:.4f}, {r['test_ndcg@10_min']:.4f} | {stop} | {r['seconds_to_stop_mean']:,.0f} |")


if __name__ == "__main__":
    main()

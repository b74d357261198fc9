"""``raysrec train``: run the training (Ray Train, or one plain process) and write the output folder.

Output folder: ``checkpoint/`` (the best by valid NDCG@10, self-describing), ``train_config.yaml``,
``metrics.json`` (valid and test metrics, epochs, seconds, examples/s), ``history.csv`` and
``training_curve.png``. Ray's own run folder (all reported checkpoints, for resuming) sits in
``ray_results/`` unless ``storage_path`` points elsewhere.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd

from raysrec.train.config import VALID_METRIC, TrainConfig
from raysrec.train.loop import LocalSession, evaluate_checkpoint, train_loop

CHECKPOINT_DIR = "checkpoint"


def fit(cfg: TrainConfig, use_ray: bool = True) -> dict[str, Any]:
    """Train, pick the best checkpoint, score it on the test targets and write the output folder."""
    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "train_config.yaml")
    started = time.time()
    if use_ray:
        from raysrec.train.ray_train import best_checkpoint, build_trainer, run_state  # noqa: PLC0415

        storage = cfg.storage_path or str(out / "ray_results")
        result = build_trainer(cfg, run_name="train", storage_path=storage).fit()
        state = run_state(result)
        history, workers = list(state.get("history", [])), list(state.get("workers", []))
        if (out / CHECKPOINT_DIR).exists():
            shutil.rmtree(out / CHECKPOINT_DIR)
        best_checkpoint(result).to_directory(str(out / CHECKPOINT_DIR))
    else:
        session = LocalSession(out / CHECKPOINT_DIR)
        state = train_loop(cfg, session)
        history, workers = session.history, list(state.get("workers", []))
    train_seconds = time.time() - started
    device = "cuda" if cfg.use_gpu else "cpu"
    valid = evaluate_checkpoint(cfg.data, out / CHECKPOINT_DIR, split="valid", device=device)
    test = evaluate_checkpoint(cfg.data, out / CHECKPOINT_DIR, split="test", device=device)
    best_row = max(history, key=lambda r: r[VALID_METRIC])
    metrics = {
        "valid": valid, "test": test,
        "epochs": int(history[-1]["epoch"]), "best_epoch": int(best_row["epoch"]),
        "train_seconds": round(train_seconds, 2),
        "examples_per_second": round(float(pd.Series([r["examples_per_second"] for r in history]).median()), 1),
        "model": cfg.model.name, "loss": cfg.loss, "num_workers": cfg.num_workers, "use_gpu": cfg.use_gpu,
        "workers": workers,
    }
    if cfg.cold_items:
        for part in ("cold", "warm"):
            metrics[f"test_{part}"] = evaluate_checkpoint(cfg.data, out / CHECKPOINT_DIR, split="test", device=device,
                                                          targets=part)
        metrics["test_cold_among_cold"] = evaluate_checkpoint(cfg.data, out / CHECKPOINT_DIR, split="test",
                                                              device=device, targets="cold", candidates="cold")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    pd.DataFrame(history).to_csv(out / "history.csv", index=False)
    plot_history(history, out / "training_curve.png", title=f"{cfg.model.name} ({cfg.loss})")
    return metrics


def plot_history(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    frame = pd.DataFrame(history)
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(frame["epoch"], frame["train_loss"], color="tab:blue")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title=title)
    for key, color in (("valid_ndcg@10", "tab:green"), ("valid_hr@10", "tab:orange")):
        ax_metric.plot(frame["epoch"], frame[key], label=key, color=color)
    ax_metric.set(xlabel="epoch", ylabel="valid metric")
    ax_metric.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""``raysrec train``: run the training (Ray Train, or one plain process) and write a model folder.

Output folder: the model folder of :mod:`raysrec.artifact` (``checkpoint/``, the best by valid
NDCG@10; ``train_config.yaml``; ``metrics.json``; ``history.csv``; ``training_curve.png``) and Ray's
own run folder in ``ray_results/`` (the best and the latest reported checkpoint, for resuming)
unless ``storage_path`` points elsewhere.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from raysrec import artifact
from raysrec.errors import ConfigError
from raysrec.train.config import VALID_METRIC, VALID_MODE, TrainConfig
from raysrec.train.loop import LocalSession, train_loop


def fit(cfg: TrainConfig, use_ray: bool = True, source: str = "train") -> dict[str, Any]:
    """Train, take the best checkpoint, score it on the valid and test targets and write the model folder."""
    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg.replace(data=_absolute(cfg.data))
    cfg.save(out / artifact.CONFIG_FILE)
    started = time.time()
    if use_ray:
        from raysrec.train.ray_train import (  # noqa: PLC0415
            build_trainer,
            clear_user_error,
            raise_user_error,
            run_history,
            score_in_task,
            user_error_location,
        )

        storage = cfg.storage_path or str(out / "ray_results")
        clear_user_error(user_error_location(storage, "train"))
        result = build_trainer(cfg, run_name="train", storage_path=storage).fit()
        raise_user_error(result, user_error_location(storage, "train"))
        best = result.get_best_checkpoint(metric=VALID_METRIC, mode=VALID_MODE)
        if best is None:
            raise RuntimeError(f"the training run at {result.path} reported no checkpoint")
        history = run_history(result)
        train_seconds = time.time() - started
        scores = score_in_task(best, cfg.data, cfg)
        with best.as_directory() as folder:   # downloads when storage is remote
            return artifact.write_model(out, folder, cfg.data, source=source, history=history,
                                        train_seconds=train_seconds, scores=scores)
    with tempfile.TemporaryDirectory(prefix="raysrec-best-") as best_dir:
        if cfg.use_gpu and not torch.cuda.is_available():
            raise ConfigError("train.use_gpu is set but this machine has no CUDA device")
        session = LocalSession(Path(best_dir) / "best", device="cuda" if cfg.use_gpu else "cpu")
        train_loop(cfg, session)
        return artifact.write_model(out, session.best_dir, cfg.data, source=source, history=session.history,
                                    train_seconds=time.time() - started, device=session.device.type)


def _absolute(location: str) -> str:
    """Workers do not share the driver's working directory: local paths travel absolute."""
    return location if "://" in location or not location else str(Path(location).resolve())

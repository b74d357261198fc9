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
from raysrec.config import redact
from raysrec.errors import CheckpointError, ConfigError
from raysrec.evaluation import final_scores
from raysrec.train.config import BEST_SCORE, NOT_BEST, TrainConfig
from raysrec.train.loop import LocalSession, train_loop


def run_storage(cfg: TrainConfig) -> str:
    """Where Ray Train keeps this output's runs: ``storage_path``, else ``OUTPUT/ray_results``."""
    return cfg.storage_path or str(Path(cfg.output or ".").resolve() / "ray_results")


def fit(cfg: TrainConfig, use_ray: bool = True, source: str = "train") -> dict[str, Any]:
    """Train, take the best checkpoint, score it on the valid and test targets and write the model folder.

    Every call is a new Ray Train run (named ``train-<time>-<hex>``) unless ``cfg.resume`` asks to continue the
    newest run in the run storage; ``cfg.resume_from`` starts a new run from a checkpoint's weights and state.
    """
    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg.replace(data=_absolute(cfg.data))
    if cfg.resume_from and "://" not in cfg.resume_from:
        cfg = cfg.replace(resume_from=str(artifact.resolve(cfg.resume_from).checkpoint))
    if cfg.resume and not use_ray:
        raise ConfigError("train.resume continues a Ray Train run; without Ray, continue a checkpoint with "
                          "--resume-from")
    started = time.time()
    if use_ray:
        from raysrec.train.ray_train import (  # noqa: PLC0415
            build_trainer,
            clear_user_error,
            latest_run,
            new_run_name,
            raise_user_error,
            run_history,
            score_in_task,
            user_error_location,
        )

        storage = run_storage(cfg)
        if cfg.resume:
            found = latest_run(storage)
            if found is None:
                raise ConfigError(f"train.resume: no Ray Train run to resume in {redact(storage)}")
            run_name, epoch = found
            print(f"resuming Ray Train run {run_name} in {redact(storage)} after its epoch {epoch}", flush=True)
        else:
            run_name = new_run_name()
        cfg.save(out / artifact.CONFIG_FILE)
        clear_user_error(user_error_location(storage, run_name))
        result = build_trainer(cfg, run_name=run_name, storage_path=storage).fit()
        raise_user_error(result, user_error_location(storage, run_name))
        best = result.get_best_checkpoint(metric=BEST_SCORE, mode="max")
        if best is None:
            raise RuntimeError(f"the training run at {result.path} reported no checkpoint")
        history = run_history(result)
        train_seconds = time.time() - started
        best_score = next(m for c, m in result.best_checkpoints if c.path == best.path).get(BEST_SCORE, NOT_BEST)
        if best_score == NOT_BEST:      # no epoch of this run beat the checkpoint it resumed from
            checkpoint = _resumed_best(cfg, history)
            return artifact.write_model(out, checkpoint, source=source, history=history,
                                        train_seconds=train_seconds, scores=final_scores(checkpoint, cfg.data))
        scores = score_in_task(best, cfg.data, cfg)
        with best.as_directory() as folder:   # downloads when storage is remote
            return artifact.write_model(out, folder, source=source, history=history,
                                        train_seconds=train_seconds, scores=scores)
    cfg.save(out / artifact.CONFIG_FILE)
    with tempfile.TemporaryDirectory(prefix="raysrec-best-") as best_dir:
        if cfg.use_gpu and not torch.cuda.is_available():
            raise ConfigError("train.use_gpu is set but this machine has no CUDA device")
        session = LocalSession(Path(best_dir) / "best", device="cuda" if cfg.use_gpu else "cpu")
        history = train_loop(cfg, session)["history"]      # a resumed run's earlier epochs included, as with Ray
        checkpoint = session.best_dir if session.best_dir.is_dir() else _resumed_best(cfg, history)
        return artifact.write_model(out, checkpoint, source=source, history=history,
                                    train_seconds=time.time() - started,
                                    scores=final_scores(checkpoint, cfg.data, session.device.type))


def _resumed_best(cfg: TrainConfig, history: list[dict[str, Any]]) -> Path:
    """The checkpoint a run resumed from, when no epoch after it was better: it is then the best (its own state
    says it was its run's best epoch), and the run's model is that checkpoint."""
    if not cfg.resume_from:
        raise RuntimeError("the training run reported no best checkpoint")
    # a local folder is used in place; a URI is downloaded into a folder of its own (it becomes the model)
    located, _ = artifact.fetch(cfg.resume_from, Path(tempfile.gettempdir()) / f"raysrec-resumed-{time.time_ns()}")
    state = artifact.verify_checkpoint(located.checkpoint)
    best_epoch = history[-1]["best_epoch"] if history else state.get("best_epoch")
    if state.get("epoch") != best_epoch:
        raise CheckpointError(f"{redact(cfg.resume_from)}: no epoch after it improved valid NDCG@10, and it is not "
                              f"its run's best epoch ({best_epoch}) itself; resume from the run's model folder "
                              "(its checkpoint/ is the best epoch), or with --resume")
    return located.checkpoint


def _absolute(location: str) -> str:
    """Workers do not share the driver's working directory: local paths travel absolute."""
    return location if "://" in location or not location else str(Path(location).resolve())

"""``raysrec tune``: Ray Tune + Optuna (TPE) + ASHA over full Ray Train runs, and the best-model export.

The pattern is the one Ray 2.60 documents for Tune with Train V2: the ``Tuner`` runs a small
driver function per trial, which builds a ``TorchTrainer`` for that trial's config and fits it;
per-epoch metrics reach Tune through ``TuneReportCallback``, so ASHA can stop weak trials and
Optuna sees every result. The driver itself takes no CPU; each trial's workers hold the real
resources, and ``max_concurrent`` defaults to what the cluster can run at once.

Output folder::

    DIR/tune_config.yaml   the search's own config
    DIR/ray_results/       Tune's experiment (resumable; TensorBoard: `tensorboard --logdir DIR/ray_results`)
    DIR/trials.csv         every trial at its best epoch (Ray's ResultGrid.get_dataframe), with status and params
    DIR/best/              a model folder (raysrec.artifact) of the best trial, or of its refit
    DIR/report.png         valid NDCG@10 per trial (and best so far) + Optuna parameter importances
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import pyarrow.fs as pafs

from raysrec import artifact
from raysrec.config import redact
from raysrec.errors import ConfigError
from raysrec.files import filesystem, join
from raysrec.train.config import BEST_SCORE, VALID_METRIC, VALID_MODE, TrainConfig
from raysrec.tuning.config import SearchConfig
from raysrec.tuning.placement import held_groups, release_after_search, release_callback
from raysrec.tuning.report import plot_report
from raysrec.tuning.space import Param, apply_overrides, load_space, space_path, to_tune

EXPERIMENT = "search"
__all__ = ["SearchConfig", "run_search", "space_path"]


def _trial(config: dict[str, Any], base: dict[str, Any], storage: str) -> None:
    """One Tune trial: a full Ray Train run of ``base`` + this trial's overrides."""
    from ray import tune  # noqa: PLC0415
    from ray.tune.integration.ray_train import TuneReportCallback  # noqa: PLC0415

    from raysrec.train.ray_train import build_trainer, raise_user_error, user_error_location  # noqa: PLC0415

    cfg = apply_overrides(TrainConfig.from_dict(base), config)
    trial_id = tune.get_context().get_trial_id()
    result = build_trainer(cfg, run_name=f"train-{trial_id}", storage_path=storage,
                           callbacks=[TuneReportCallback()]).fit()
    raise_user_error(result, user_error_location(storage, f"train-{trial_id}"))


def _defaults_in_space(params: list[Param], base: TrainConfig) -> Optional[dict[str, Any]]:
    """The base config's value of every searched field, if all lie inside the space."""
    point = {}
    flat = base.to_dict()
    for p in params:
        node: Any = flat
        for part in p.path.split("."):
            node = node[part]
        if p.kind == "choice" and node not in p.args:
            return None
        if p.kind in ("uniform", "loguniform", "quniform", "randint") and not (p.args[0] <= node <= p.args[1]):
            return None
        if p.kind != "fixed":
            point[p.path] = node
    return point


def _storage(cfg: SearchConfig) -> tuple[str, Any, str]:
    """The run storage (``storage_path``, else ``OUTPUT/ray_results``), its filesystem and its path there; Tune
    keeps the search's experiment in ``<path>/search``."""
    storage = cfg.storage_path or str(Path(cfg.output).resolve() / "ray_results")
    storage_fs, storage_root = filesystem(storage)
    return storage, storage_fs, storage_root


def check_output(cfg: SearchConfig, resume: bool) -> None:
    """A new search into an output that holds one is refused (the CLI calls this before Ray starts)."""
    storage, storage_fs, storage_root = _storage(cfg)
    if not resume and storage_fs.get_file_info(f"{storage_root}/{EXPERIMENT}").type != pafs.FileType.NotFound:
        raise ConfigError(f"{redact(join(storage, EXPERIMENT))} already holds a search: pass --resume to continue "
                          "it, or choose another --output")


def run_search(cfg: SearchConfig, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) the search, then export trials.csv, best/ and report.png."""
    import ray  # noqa: PLC0415
    from ray import tune  # noqa: PLC0415
    from ray.tune.schedulers import ASHAScheduler  # noqa: PLC0415
    from ray.tune.search.optuna import OptunaSearch  # noqa: PLC0415

    check_output(cfg, resume)
    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    space_file = space_path(cfg.space)
    params = load_space(space_file)
    shutil.copyfile(space_file, out / "space.yaml")
    cfg.save(out / "tune_config.yaml")
    data = cfg.data if "://" in cfg.data else str(Path(cfg.data).resolve())   # workers do not share our cwd
    base = cfg.train.replace(data=data, output="", epochs=cfg.epochs)
    storage, storage_fs, storage_root = _storage(cfg)
    experiment = f"{storage_root}/{EXPERIMENT}"
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base.to_dict(), storage=join(storage, "train_runs")),
        # The trial only waits on its TorchTrainer; a token of memory (no CPU) gives Tune a non-empty bundle
        # while the Train workers hold the real CPUs/GPUs.
        {"CPU": 0, "memory": 64 * 1024 * 1024})
    shown = redact(join(storage, EXPERIMENT))
    before = held_groups()   # the caller's own groups: the cleanup spares them
    started = time.time()
    if resume and tune.Tuner.can_restore(experiment, storage_filesystem=storage_fs):
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=storage_fs)
    else:
        if resume:
            print(f"nothing to resume at {shown}; starting a new search")
        per_trial = base.num_workers * (base.cpus_per_worker if not base.use_gpu else 0)
        cpus = ray.cluster_resources().get("CPU", 1)
        gpus = ray.cluster_resources().get("GPU", 0)
        fit_cpu = int(cpus // per_trial) if per_trial else cfg.num_samples
        fit_gpu = int(gpus // (base.num_workers * base.gpus_per_worker)) if base.use_gpu else cfg.num_samples
        max_concurrent = cfg.max_concurrent or max(1, min(fit_cpu, fit_gpu))
        default_point = _defaults_in_space(params, base) if cfg.evaluate_default else None
        searcher = OptunaSearch(metric=VALID_METRIC, mode=VALID_MODE, seed=cfg.seed,
                                points_to_evaluate=[default_point] if default_point else None)
        scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.epochs, grace_period=cfg.grace_period,
                                  reduction_factor=cfg.reduction_factor) if cfg.scheduler == "asha" else None
        tuner = tune.Tuner(
            trainable, param_space=to_tune(params),
            tune_config=tune.TuneConfig(metric=VALID_METRIC, mode=VALID_MODE, search_alg=searcher, scheduler=scheduler,
                                        num_samples=cfg.num_samples, max_concurrent_trials=max_concurrent),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=storage_root, storage_filesystem=storage_fs,
                                      callbacks=[release_callback(before)],
                                      failure_config=tune.FailureConfig(max_failures=1)),
        )
        print(f"search: {cfg.num_samples} trials x <= {cfg.epochs} epochs, {max_concurrent} at a time, "
              f"space {space_file}; TensorBoard: tensorboard --logdir {redact(storage)}")
    grid = tuner.fit()
    for group in release_after_search(before):   # a stopped trial's group can outlive the search
        print(f"released placement group {group[:12]} left behind by a stopped trial", flush=True)
    summary = export(grid, params, base, out, storage_fs, wall_seconds=time.time() - started)
    if cfg.refit_epochs:
        summary = refit(cfg, base, summary, out)
    return summary


def refit(cfg: SearchConfig, base: TrainConfig, summary: dict[str, Any], out: Path) -> dict[str, Any]:
    """Train the best trial's parameters to convergence and make that model ``best/``.

    ``best/metrics.json`` is the refitted model's (what gets served); the search trial's own figures stay
    under ``search.trial_metrics``.
    """
    from raysrec.train.run import fit  # noqa: PLC0415

    search = dict(summary["search"])
    refit_cfg = apply_overrides(base, search["params"], where="refit").replace(
        epochs=cfg.refit_epochs, output=str(out / "refit"),
        storage_path=join(cfg.storage_path, "refit") if cfg.storage_path else None)   # every node reaches it
    print(f"refit: the best parameters {search['params']} for <= {cfg.refit_epochs} epochs", flush=True)
    fit(refit_cfg, source="refit")
    search["trial_metrics"] = {k: summary[k] for k in ("valid", "test", "best_epoch")}
    return artifact.copy_model(out / "refit", out / "best", search=search)


def _text(value: Any) -> Optional[str]:
    """A path read from a results table, or None where the table has none (pandas fills a gap with NaN)."""
    return value if isinstance(value, str) and value else None


def chosen_checkpoint(chosen: dict[str, Any], in_memory: dict[str, Any], kept: list[str]) -> Optional[str]:
    """The checkpoint of the epoch a trial chose: the path reported with that epoch's result on disk
    (``chosen``), else the one in Tune's in-memory table, else one Tune kept for that epoch. A restored
    trial's in-memory row can lack it (NaN), and NaN is truthy: it must never win over a real path."""
    return _text(chosen.get("checkpoint_path")) or _text(in_memory.get("checkpoint_path")) or \
        (kept[0] if kept else None)


def trial_table(grid, params: list[Param]) -> pd.DataFrame:
    """One row per trial, at its best epoch (Ray's ``ResultGrid.get_dataframe``), with its status."""
    searched = [p.path for p in params if p.kind != "fixed"]
    # the epoch the trial's loop chose (a tie keeps the earlier), whose checkpoint Ray kept (BEST_SCORE)
    best_rows = grid.get_dataframe(filter_metric=BEST_SCORE, filter_mode="max")
    by_id = {row["trial_id"]: row for row in best_rows.to_dict("records")} if "trial_id" in best_rows else {}
    rows = []
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        best = by_id.get(trial_id, {})
        history = result.metrics_dataframe
        if history is not None and BEST_SCORE in history and len(history):
            # the trial's own results on disk: complete even for a trial restored after a killed driver, whose
            # in-memory metrics (what get_dataframe reads) can miss its last results. idxmax: the first of equal
            # scores, the earlier epoch, as the loop chose
            chosen = history.loc[history[BEST_SCORE].astype(float).idxmax()].to_dict()
            kept = [c.path for c, m in (result.best_checkpoints or []) if m.get("epoch") == chosen.get("epoch")]
            best = {**chosen, "checkpoint_path": chosen_checkpoint(chosen, best, kept)}
        row: dict[str, Any] = {"trial_id": trial_id, "status": "ERROR" if result.error else "TERMINATED",
                               **{f"param.{k}": result.config.get(k) for k in searched},
                               "epochs": int(history["epoch"].max()) if history is not None and "epoch" in history
                               else 0,
                               "best_epoch": best.get("epoch"), VALID_METRIC: best.get(VALID_METRIC, float("nan")),
                               "valid_hr@10": best.get("valid_hr@10"), "checkpoint_path": _text(best.get("checkpoint_path"))}
        rows.append(row)
    return pd.DataFrame(rows)


def export(grid, params: list[Param], base: TrainConfig, out: Path, storage_fs, wall_seconds: float
           ) -> dict[str, Any]:
    """``trials.csv``, ``report.png`` and ``best/`` (the winning trial's best checkpoint as a model folder)."""
    from ray.train import Checkpoint  # noqa: PLC0415

    table = trial_table(grid, params).sort_values(VALID_METRIC, ascending=False, na_position="last")
    table.drop(columns=["checkpoint_path"]).to_csv(out / "trials.csv", index=False)
    plot_report(table, params, out / "report.png")
    if table[VALID_METRIC].isna().all():
        raise ConfigError(f"no trial of {out} reported a metric; see {out / 'ray_results'}")
    winner = grid.get_best_result(metric=VALID_METRIC, mode=VALID_MODE, scope="all")
    best = table.set_index("trial_id").loc[winner.metrics["trial_id"]]
    history = winner.metrics_dataframe
    search = {"trial_id": winner.metrics["trial_id"],
              "params": {k[len("param."):]: _plain(v) for k, v in best.items() if k.startswith("param.")},
              "num_trials": int(len(table)), "trials_errored": int((table["status"] == "ERROR").sum()),
              "epochs_total": int(table["epochs"].sum()), "wall_seconds": round(wall_seconds, 1)}
    from raysrec.train.ray_train import score_in_task  # noqa: PLC0415

    if not _text(best["checkpoint_path"]):
        raise RuntimeError(f"trial {search['trial_id']}: no checkpoint of its best epoch ({best['best_epoch']}) "
                           f"was found in its results under {out / 'ray_results'}")
    checkpoint = Checkpoint(best["checkpoint_path"], filesystem=storage_fs)
    scores = score_in_task(checkpoint, base.data, base)
    with checkpoint.as_directory() as folder:
        keys = json.loads((Path(folder) / artifact.STATE_FILE).read_text())["history"][0].keys()
        return artifact.write_model(out / "best", folder, source="tune",
                                    history=history[[k for k in keys if k in history]].to_dict("records"),
                                    search=search, scores=scores)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value

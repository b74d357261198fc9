"""``raysrec tune``: Ray Tune + Optuna (TPE) + ASHA over full Ray Train runs, and the best-model export.

The pattern is the one Ray 2.60 documents for Tune with Train V2: the ``Tuner`` runs a small
driver function per trial, which builds a ``TorchTrainer`` for that trial's config and fits it;
per-epoch metrics reach Tune through ``TuneReportCallback``, so ASHA can stop weak trials and
Optuna sees every result. The driver itself takes no CPU; each trial's workers hold the real
resources, and ``max_concurrent`` defaults to what the cluster can run at once.

Output folder::

    DIR/tune_config.yaml   the search's own config
    DIR/ray_results/       Tune's experiment (resumable; TensorBoard: `tensorboard --logdir DIR/ray_results`)
    DIR/trials.csv         every trial: id, status, params, epochs, best valid metrics
    DIR/best/              checkpoint/ of the best trial + train_config.yaml + metrics.json (valid, test)
    DIR/report.png         valid NDCG@10 per trial (and best so far) + Optuna parameter importances
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Literal, Optional

import pandas as pd

from raysrec.config import Config, check
from raysrec.errors import ConfigError
from raysrec.train.config import VALID_METRIC, TrainConfig
from raysrec.tuning.space import Param, apply_overrides, load_space, to_tune

EXPERIMENT = "search"
REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class SearchConfig(Config):
    """The tuning stage's config; ``train`` is the base every trial starts from."""

    data: str = ""
    output: str = ""
    space: str = "default"            # a YAML file, or a name looked up in tune/<name>.yaml
    num_samples: int = 16
    max_concurrent: Optional[int] = None
    epochs: int = 30                  # per trial (ASHA's max_t)
    grace_period: int = 3             # ASHA: epochs every trial gets before it can be stopped
    reduction_factor: int = 3
    seed: int = 0
    evaluate_default: bool = True     # first trial = the base config, as a reference point
    scheduler: Literal["asha", "fifo"] = "asha"   # fifo: every trial runs to its own early stop
    # Train the winning parameters again for up to this many epochs (early stopping as in ``train``) and
    # export that model: trials are cut to ``epochs`` to compare many configs, the final model is not.
    refit_epochs: Optional[int] = None
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def validate(self) -> None:
        check(self.data != "" and self.output != "", "tune: data and output are required")
        check(self.num_samples >= 1, "tune.num_samples must be >= 1")
        check(self.epochs >= 1 and 1 <= self.grace_period <= self.epochs, "tune: need 1 <= grace_period <= epochs")
        check(self.reduction_factor >= 2, "tune.reduction_factor must be >= 2")
        check(self.max_concurrent is None or self.max_concurrent >= 1, "tune.max_concurrent must be >= 1")
        check(self.refit_epochs is None or self.refit_epochs >= 1, "tune.refit_epochs must be >= 1")


def space_path(name: str) -> Path:
    """``tune/<name>.yaml`` (working directory first, then the checkout raysrec runs from) or a path."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        candidates = [Path(name)]
    else:
        candidates = [Path("tune") / f"{name}.yaml", REPO / "tune" / f"{name}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"search space '{name}' not found (tried {', '.join(str(c) for c in candidates)})")


def _trial(config: dict[str, Any], base: dict[str, Any], storage: str) -> None:
    """One Tune trial: a full Ray Train run of ``base`` + this trial's overrides."""
    from ray import tune  # noqa: PLC0415
    from ray.tune.integration.ray_train import TuneReportCallback  # noqa: PLC0415

    from raysrec.train.ray_train import build_trainer  # noqa: PLC0415

    cfg = apply_overrides(TrainConfig.from_dict(base), config)
    trial_id = tune.get_context().get_trial_id()
    build_trainer(cfg, run_name=f"train-{trial_id}", storage_path=storage, callbacks=[TuneReportCallback()]).fit()


def release_leaked_train_groups(min_age_s: float = 10.0, address: Optional[str] = None) -> list[str]:
    """Remove Ray Train placement groups nothing uses any more; returns their ids.

    When a scheduler (ASHA) stops a trial, Tune ends the trial's actor; with Train V2 the trial's
    TrainController then goes, but the workers' placement group can outlive it (ray-project/ray#54305),
    holding its CPUs/GPUs so the next trial's workers never start. A group is released when it was
    created by this job, holds CPUs or GPUs (Train worker bundles; Tune's own trial bundles hold
    none), is older than ``min_age_s``, and no live or pending actor is placed in it.
    """
    import ray  # noqa: PLC0415
    from ray.util.placement_group import PlacementGroup  # noqa: PLC0415
    from ray.util.state import list_actors, list_placement_groups  # noqa: PLC0415

    address = address or ray.get_runtime_context().gcs_address
    job = ray.get_runtime_context().get_job_id()
    groups = list_placement_groups(address=address, filters=[("state", "=", "CREATED")], detail=True,
                                   raise_on_missing_output=False)
    used = {a.placement_group_id for a in list_actors(address=address, filters=[("state", "!=", "DEAD")],
                                                      detail=True, limit=10_000, raise_on_missing_output=False)}
    now_ns = time.time_ns()
    released = []
    for group in groups:
        holds = any(b["unit_resources"].get("CPU", 0) or b["unit_resources"].get("GPU", 0) for b in group.bundles)
        created = int((group.stats or {}).get("creation_request_received_ns") or now_ns)
        if (group.creator_job_id != job or not holds or group.placement_group_id in used
                or now_ns - created < min_age_s * 1e9):
            continue
        from ray._raylet import PlacementGroupID  # noqa: PLC0415

        ray.util.remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(group.placement_group_id))))
        released.append(group.placement_group_id)
    return released


def _release_callback():
    """A Tune callback that runs :func:`release_leaked_train_groups` after trials end and every 30 s."""
    from ray import tune  # noqa: PLC0415

    class ReleaseStoppedTrialResources(tune.Callback):
        def __init__(self) -> None:
            self._last = 0.0

        def _sweep(self) -> None:
            self._last = time.time()
            try:
                for group in release_leaked_train_groups():
                    print(f"released placement group {group[:12]} left behind by a stopped trial", flush=True)
            except Exception as exc:  # the state API is best effort (e.g. no dashboard on this cluster)
                print(f"could not check for leaked placement groups: {exc}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._sweep()

        def on_trial_error(self, iteration, trials, trial, **info):
            self._sweep()

        def on_step_begin(self, iteration, trials, **info):
            if time.time() - self._last > 30:
                self._sweep()

    return ReleaseStoppedTrialResources()


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


def run_search(cfg: SearchConfig, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) the search, then export trials.csv, best/ and report.png."""
    import ray  # noqa: PLC0415
    from ray import tune  # noqa: PLC0415
    from ray.tune.schedulers import ASHAScheduler  # noqa: PLC0415
    from ray.tune.search.optuna import OptunaSearch  # noqa: PLC0415

    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    space_file = space_path(cfg.space)
    params = load_space(space_file)
    shutil.copyfile(space_file, out / "space.yaml")
    cfg.save(out / "tune_config.yaml")
    base = cfg.train.replace(data=str(Path(cfg.data).resolve()), output="", epochs=cfg.epochs)
    storage = str(out / "ray_results")
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base.to_dict(), storage=str(out / "ray_results" / "train_runs")),
        # The trial only waits on its TorchTrainer; a token of memory (no CPU) gives Tune a non-empty bundle
        # while the Train workers hold the real CPUs/GPUs.
        {"CPU": 0, "memory": 64 * 1024 * 1024})
    experiment = Path(storage) / EXPERIMENT
    started = time.time()
    if resume and tune.Tuner.can_restore(str(experiment)):
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        if resume:
            print(f"nothing to resume at {experiment}; starting a new search")
        elif experiment.exists():
            raise ConfigError(f"{experiment} already holds a search: pass --resume to continue it, "
                              "or choose another --output")
        per_trial = base.num_workers * (base.cpus_per_worker if not base.use_gpu else 0)
        cpus = ray.cluster_resources().get("CPU", 1)
        gpus = ray.cluster_resources().get("GPU", 0)
        fit_cpu = int(cpus // per_trial) if per_trial else cfg.num_samples
        fit_gpu = int(gpus // (base.num_workers * base.gpus_per_worker)) if base.use_gpu else cfg.num_samples
        max_concurrent = cfg.max_concurrent or max(1, min(fit_cpu, fit_gpu))
        default_point = _defaults_in_space(params, base) if cfg.evaluate_default else None
        searcher = OptunaSearch(metric=VALID_METRIC, mode="max", seed=cfg.seed,
                                points_to_evaluate=[default_point] if default_point else None)
        scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.epochs, grace_period=cfg.grace_period,
                                  reduction_factor=cfg.reduction_factor) if cfg.scheduler == "asha" else None
        tuner = tune.Tuner(
            trainable, param_space=to_tune(params),
            tune_config=tune.TuneConfig(metric=VALID_METRIC, mode="max", search_alg=searcher, scheduler=scheduler,
                                        num_samples=cfg.num_samples, max_concurrent_trials=max_concurrent),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=storage, callbacks=[_release_callback()],
                                      failure_config=tune.FailureConfig(max_failures=1)),
        )
        print(f"search: {cfg.num_samples} trials x <= {cfg.epochs} epochs, {max_concurrent} at a time, "
              f"space {space_file}; TensorBoard: tensorboard --logdir {storage}")
    grid = tuner.fit()
    summary = export(grid, params, cfg, out, wall_seconds=time.time() - started)
    if cfg.refit_epochs:
        summary = refit(cfg, base, summary, out)
    return summary


def refit(cfg: SearchConfig, base: TrainConfig, summary: dict[str, Any], out: Path) -> dict[str, Any]:
    """Train the best trial's parameters to convergence and make that model ``best/``.

    ``best/metrics.json`` keeps the search trial's figures under ``search``; ``valid``/``test`` are the
    refitted model's, which is what gets served.
    """
    from raysrec.train.run import fit  # noqa: PLC0415

    refit_cfg = apply_overrides(base, summary["params"], where="refit").replace(
        epochs=cfg.refit_epochs, output=str(out / "refit"))
    print(f"refit: the best parameters {summary['params']} for <= {cfg.refit_epochs} epochs", flush=True)
    metrics = fit(refit_cfg)
    best_dir = out / "best"
    shutil.rmtree(best_dir / "checkpoint")
    shutil.copytree(out / "refit" / "checkpoint", best_dir / "checkpoint")
    refit_cfg.save(best_dir / "train_config.yaml")
    search = {k: summary[k] for k in ("valid", "test", "best_epoch")}
    summary = {**summary, "valid": metrics["valid"], "test": metrics["test"], "best_epoch": metrics["best_epoch"],
               "refit": {"epochs": metrics["epochs"], "train_seconds": metrics["train_seconds"]}, "search": search}
    (best_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def trial_table(grid, params: list[Param]) -> pd.DataFrame:
    """One row per trial (each trial once, whatever restarts happened)."""
    rows = []
    searched = [p.path for p in params if p.kind != "fixed"]
    for result in grid:
        history = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        row: dict[str, Any] = {"trial_id": trial_id, "status": "ERROR" if result.error else "TERMINATED"}
        row.update({f"param.{k}": result.config.get(k) for k in searched})
        if VALID_METRIC in history:
            best = history.loc[history[VALID_METRIC].idxmax()]
            row.update({"epochs": int(history["epoch"].max()), "best_epoch": int(best["epoch"]),
                        VALID_METRIC: float(best[VALID_METRIC]), "valid_hr@10": float(best["valid_hr@10"]),
                        "checkpoint_path": best.get("checkpoint_path")})
        else:
            row.update({"epochs": 0, VALID_METRIC: math.nan})
        rows.append(row)
    return pd.DataFrame(rows)


def export(grid, params: list[Param], cfg: SearchConfig, out: Path, wall_seconds: float) -> dict[str, Any]:
    from raysrec.train.loop import evaluate_checkpoint  # noqa: PLC0415

    table = trial_table(grid, params).sort_values(VALID_METRIC, ascending=False, na_position="last")
    table.drop(columns=["checkpoint_path"], errors="ignore").to_csv(out / "trials.csv", index=False)
    done = table.dropna(subset=[VALID_METRIC])
    if done.empty:
        raise ConfigError(f"no trial of {out} reported a metric; see {out / 'ray_results'}")
    best = done.iloc[0]
    best_dir = out / "best"
    if best_dir.exists():
        shutil.rmtree(best_dir)
    best_dir.mkdir()
    from ray.train import Checkpoint  # noqa: PLC0415

    Checkpoint(str(best["checkpoint_path"])).to_directory(str(best_dir / "checkpoint"))
    overrides = {k[len("param."):]: v for k, v in best.items() if k.startswith("param.")}
    train_cfg = TrainConfig.load(best_dir / "checkpoint" / "train_config.yaml")
    train_cfg.save(best_dir / "train_config.yaml")
    device = "cuda" if train_cfg.use_gpu else "cpu"
    metrics = {
        "trial_id": best["trial_id"], "params": _plain(overrides), "best_epoch": int(best["best_epoch"]),
        "valid": evaluate_checkpoint(cfg.data, best_dir / "checkpoint", split="valid", device=device),
        "test": evaluate_checkpoint(cfg.data, best_dir / "checkpoint", split="test", device=device),
        "num_trials": int(len(table)), "trials_errored": int((table["status"] == "ERROR").sum()),
        "epochs_total": int(table["epochs"].sum()), "wall_seconds": round(wall_seconds, 1),
    }
    (best_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_report(table, params, out / "report.png")
    return metrics


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in values.items()}


def importances(table: pd.DataFrame, params: list[Param]) -> dict[str, float]:
    """Optuna's parameter importances (PED-ANOVA) from the finished trials."""
    import optuna  # noqa: PLC0415

    searched = [p for p in params if p.kind != "fixed"]
    done = table.dropna(subset=[VALID_METRIC])
    if len(done) < 3 or not searched:
        return {}
    dists = {}
    for p in searched:
        if p.kind == "choice":
            dists[p.path] = optuna.distributions.CategoricalDistribution(p.args)
        elif p.kind == "randint":
            dists[p.path] = optuna.distributions.IntDistribution(p.args[0], p.args[1] - 1)
        else:
            dists[p.path] = optuna.distributions.FloatDistribution(p.args[0], p.args[1], log=p.kind == "loguniform")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for _, row in done.iterrows():
        values = {p.path: _plain({"v": row[f"param.{p.path}"]})["v"] for p in searched}
        study.add_trial(optuna.trial.create_trial(params=values, distributions=dists, value=float(row[VALID_METRIC])))
    try:
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()  # no scikit-learn needed
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    except (RuntimeError, ValueError):  # e.g. every trial has the same value
        return {}


def plot_report(table: pd.DataFrame, params: list[Param], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    order = table.sort_values("trial_id")
    values = order[VALID_METRIC].to_numpy()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    xs = range(1, len(values) + 1)
    ax1.scatter(xs, values, label="trial (best epoch)", color="tab:blue")
    ax1.plot(xs, pd.Series(values).cummax(), label="best so far", color="tab:green")
    ax1.set(xlabel="trial", ylabel=VALID_METRIC, title="search progress")
    ax1.legend()
    imp = importances(table, params)
    if imp:
        names = list(imp)[::-1]
        ax2.barh(names, [imp[n] for n in names], color="tab:orange")
        ax2.set(xlabel="importance (Optuna PED-ANOVA)", title="what mattered")
    else:
        ax2.text(0.5, 0.5, "too few finished trials\nfor importances", ha="center", va="center")
        ax2.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

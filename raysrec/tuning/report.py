"""The search report: valid NDCG@10 per trial (and the best so far) and Optuna's parameter importances."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from raysrec.train.config import VALID_METRIC
from raysrec.tuning.space import Param


def _plain(value):
    return value.item() if hasattr(value, "item") else value


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
        values = {p.path: _plain(row[f"param.{p.path}"]) for p in searched}
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

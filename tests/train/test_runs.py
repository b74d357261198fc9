"""What a run is: every `raysrec train` is a new run unless --resume asks to continue one, the exported model is
the epoch the loop chose as best (ties keep the earlier epoch, in the loop, in Ray's retention and in the export),
and resuming a run that no later epoch improves exports the checkpoint it resumed from."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from raysrec.models.config import ModelConfig
from raysrec.train.config import TrainConfig
from raysrec.train.run import fit

SMALL = ModelConfig(hidden_dim=32, num_heads=2, num_layers=1, max_length=20)
# An AdamW step of 1e-12 is below fp32 resolution for these weights: the model, and so valid NDCG@10, stays
# exactly the same every epoch. Every epoch after the first ties with it.
FROZEN = 1e-12


def _saved(out):
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    return json.loads((out / "metrics.json").read_text()), state, pd.read_csv(out / "history.csv")


def test_runs_into_one_output_are_new_runs_and_ties_keep_the_earlier_epoch(ray_local, synth_prepared, tmp_path, capfd):
    out = tmp_path / "model"
    base = TrainConfig(data=str(synth_prepared), output=str(out), model=SMALL, num_workers=1, cpus_per_worker=1)
    first = fit(base.replace(epochs=3, patience=1, lr=FROZEN))
    metrics, state, history = _saved(out)
    assert history["valid_ndcg@10"].nunique() == 1 and metrics["epochs"] == 2      # two tied epochs
    # the loop keeps epoch 1 on a tie; Ray kept (and the export took) epoch 2 before
    assert first["best_epoch"] == metrics["best_epoch"] == state["epoch"] == state["best_epoch"] == 1

    # a second command into the same output, with other settings: its own run, not the first one continued
    second = fit(base.replace(epochs=1, patience=5, lr=2e-3))
    metrics, state, history = _saved(out)
    assert second["epochs"] == 1 and list(history["epoch"]) == [1]
    assert TrainConfig.load(out / "train_config.yaml").lr == 2e-3
    assert TrainConfig.load(out / "checkpoint" / "train_config.yaml").lr == 2e-3
    assert state["epoch"] == metrics["best_epoch"] == history["valid_ndcg@10"].idxmax() + 1
    runs = sorted(p.name for p in (out / "ray_results").iterdir() if p.name.startswith("train-"))
    assert len(runs) == 2

    # --resume continues the newest run (the second), and says so
    capfd.readouterr()
    third = fit(base.replace(epochs=2, patience=5, lr=2e-3, resume=True))
    assert f"resuming Ray Train run {runs[-1]} in {out / 'ray_results'} after its epoch 1" in capfd.readouterr().out
    metrics, state, history = _saved(out)
    assert third["epochs"] == 2 and list(history["epoch"]) == [1, 2]
    assert len([p for p in (out / "ray_results").iterdir() if p.name.startswith("train-")]) == 2


def test_resume_with_no_better_epoch_exports_the_checkpoint_it_resumed_from(synth_prepared, tmp_path):
    """A run that stopped early, resumed from its model folder (which --resume-from accepts): no later epoch
    improves, so the model is the resumed checkpoint (it failed with FileNotFoundError before)."""
    base = TrainConfig(data=str(synth_prepared), model=SMALL, lr=FROZEN, patience=1)
    fit(base.replace(output=str(tmp_path / "first"), epochs=5), use_ray=False)
    metrics, state, _ = _saved(tmp_path / "first")
    assert metrics["epochs"] == 2 and state["epoch"] == 1              # stopped early: epoch 2 tied with 1

    resumed = fit(base.replace(output=str(tmp_path / "resumed"), epochs=5, resume_from=str(tmp_path / "first")),
                  use_ray=False)
    metrics, state, history = _saved(tmp_path / "resumed")
    assert resumed["best_epoch"] == state["epoch"] == 1 and resumed["epochs"] == 2
    assert list(history["epoch"]) == [1, 2]
    first_weights = (tmp_path / "first" / "checkpoint" / "model.pt").read_bytes()
    assert (tmp_path / "resumed" / "checkpoint" / "model.pt").read_bytes() == first_weights


def test_resume_without_a_run_is_refused(synth_prepared, tmp_path, capsys):
    from raysrec.cli import main
    from raysrec.errors import ConfigError

    assert main(["train", "--data", str(synth_prepared), "-o", str(tmp_path / "m"), "--resume"]) == 2
    assert f"train.resume: no Ray Train run to resume in {tmp_path / 'm' / 'ray_results'}" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="without Ray"):
        fit(TrainConfig(data=str(synth_prepared), output=str(tmp_path / "m"), model=SMALL, resume=True), use_ray=False)
    with pytest.raises(ConfigError, match="excludes"):
        TrainConfig(resume=True, resume_from="x").validate()

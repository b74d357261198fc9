"""A tiny real search (Ray Tune + Optuna + ASHA over Ray Train runs). Its resume after a killed driver is in
tests/reliability/test_faults.py."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from raysrec.models.sequential import ModelConfig
from raysrec.train.config import TrainConfig
from raysrec.tuning.search import SearchConfig, run_search

SMALL = ModelConfig(hidden_dim=16, num_heads=1, num_layers=1, max_length=20)


@pytest.fixture()
def space_file(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"model.dropout": {"uniform": [0.0, 0.5]}, "lr": {"loguniform": [1e-3, 1e-2]},
                                    "model.num_layers": {"choice": [1, 2]}}))
    return path


def search_config(data, out, space, samples):
    # FIFO: with 1-epoch trials ASHA could only stop a trial at the moment it ends anyway, and a
    # trial stopped by Tune ends its Train run ungracefully (see the README's tune notes).
    return SearchConfig(data=str(data), output=str(out), space=str(space), num_samples=samples, epochs=1,
                        grace_period=1, max_concurrent=2, scheduler="fifo",
                        train=TrainConfig(model=SMALL, cpus_per_worker=1, loss="sampled", num_negatives=20))


def test_tiny_search_exports_the_best_trial(ray_local, synth_prepared, tmp_path, space_file):
    out = tmp_path / "search"
    summary = run_search(search_config(synth_prepared, out, space_file, 4))
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 4 and trials["trial_id"].is_unique and (trials["status"] == "TERMINATED").all()
    assert {"param.model.dropout", "param.lr", "param.model.num_layers", "valid_ndcg@10"} <= set(trials.columns)
    best = trials.loc[trials["valid_ndcg@10"].idxmax()]
    saved = json.loads((out / "best" / "metrics.json").read_text())
    assert saved["search"]["trial_id"] == best["trial_id"] == summary["search"]["trial_id"]
    assert saved["source"] == "tune" and saved["search"]["num_trials"] == 4
    # the exported checkpoint is that trial's: same params, and it re-scores to the trial's valid metric
    assert saved["valid"]["ndcg@10"] == pytest.approx(best["valid_ndcg@10"], abs=1e-6)
    cfg = TrainConfig.load(out / "best" / "train_config.yaml")
    assert cfg.model.num_layers == best["param.model.num_layers"]
    assert cfg.lr == pytest.approx(best["param.lr"])
    assert (out / "report.png").stat().st_size > 10_000
    # the first trial is the base config (dropout 0.2, lr 1e-3, 1 layer): a reference point
    assert ((trials["param.model.dropout"] - 0.2).abs() < 1e-9).any()
    # serve can load best/ directly
    from raysrec.serving.recommender import Recommender
    assert Recommender.load(out / "best").num_items == 200


def test_asha_stopped_trials_do_not_starve_the_next_ones(ray_local, synth_prepared, tmp_path, space_file):
    """ASHA stops weak trials mid-run. Each trial's workers take both CPUs, so a placement group left
    behind by a stopped trial would keep every later trial from starting (ray-project/ray#54305);
    raysrec releases such groups, and the search finishes."""
    cfg = SearchConfig(data=str(synth_prepared), output=str(tmp_path / "asha"), space=str(space_file), num_samples=3,
                       epochs=3, grace_period=1, reduction_factor=2, max_concurrent=1, scheduler="asha", seed=1,
                       train=TrainConfig(model=SMALL, cpus_per_worker=2, loss="sampled", num_negatives=20))
    summary = run_search(cfg)
    trials = pd.read_csv(tmp_path / "asha" / "trials.csv")
    assert len(trials) == 3 and (trials["status"] == "TERMINATED").all()
    assert trials["epochs"].min() < 3, "ASHA stopped no trial early: the test does not test anything"
    assert summary["search"]["num_trials"] == 3
    # and nothing a stopped trial held outlives the search: the next stage (deploy) gets the CPUs
    import time

    import ray
    deadline = time.time() + 20
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == 2, ray.util.placement_group_table()

"""A tiny real search (Ray Tune + Optuna + ASHA over Ray Train runs). A FIFO search, killed mid-way, resumed and
exported (trials.csv, best/, report.png) is in tests/reliability/test_faults.py."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from raysrec.models.config import ModelConfig
from raysrec.train.config import TrainConfig
from raysrec.tuning.search import SearchConfig, run_search

SMALL = ModelConfig(hidden_dim=16, num_heads=1, num_layers=1, max_length=20)


@pytest.fixture()
def space_file(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"model.dropout": {"uniform": [0.0, 0.5]}, "lr": {"loguniform": [1e-3, 1e-2]},
                                    "model.num_layers": {"choice": [1, 2]}}))
    return path


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


def test_the_chosen_epochs_checkpoint_is_a_real_path_never_a_gap():
    """A trial restored after a killed driver can have NaN where Tune's in-memory table keeps its checkpoint;
    the path reported on disk with the chosen epoch wins, and a gap never passes for a path."""
    from raysrec.tuning.search import chosen_checkpoint

    on_disk = {"epoch": 2, "checkpoint_path": "/runs/train-a/checkpoint_2"}
    assert chosen_checkpoint(on_disk, {"checkpoint_path": float("nan")}, []) == "/runs/train-a/checkpoint_2"
    assert chosen_checkpoint({"epoch": 2, "checkpoint_path": float("nan")},
                             {"checkpoint_path": "/runs/train-a/checkpoint_2"}, []) == "/runs/train-a/checkpoint_2"
    assert chosen_checkpoint({"epoch": 2}, {"checkpoint_path": float("nan")}, ["/kept/2"]) == "/kept/2"
    assert chosen_checkpoint({"epoch": 2}, {"checkpoint_path": float("nan")}, []) is None

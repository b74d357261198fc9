"""Training for real: Ray Train with two DDP workers, resume, checkpoint integrity, evaluate."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from raysrec.errors import CheckpointError
from raysrec.models.sequential import ModelConfig
from raysrec.train import checkpoint as ckpt
from raysrec.train.config import TrainConfig
from raysrec.train.loop import LocalSession, evaluate_checkpoint, train_loop
from raysrec.train.run import fit

SMALL = ModelConfig(hidden_dim=32, num_heads=2, num_layers=1, max_length=20)


def test_ray_train_two_workers_writes_a_complete_output(ray_local, synth_prepared, tmp_path):
    cfg = TrainConfig(data=str(synth_prepared), output=str(tmp_path / "out"), model=SMALL, epochs=2,
                      num_workers=2, cpus_per_worker=1)
    metrics = fit(cfg)
    out = tmp_path / "out"
    for name in ("metrics.json", "train_config.yaml", "history.csv", "training_curve.png", "checkpoint/model.pt",
                 "checkpoint/items.parquet", "checkpoint/train_config.yaml"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved) >= {"valid", "test", "epochs", "train_seconds", "examples_per_second"}
    assert saved["epochs"] == 2 and 0 < saved["test"]["ndcg@10"] <= saved["test"]["hr@10"] <= 1
    # A random ranking of 200 items scores HR@10 ~ 0.05; two epochs already beat it clearly.
    assert saved["test"]["hr@10"] > 0.1
    # `raysrec evaluate` re-scores the same checkpoint to the same figures.
    again = evaluate_checkpoint(synth_prepared, out / "checkpoint")
    assert again["ndcg@10"] == pytest.approx(metrics["test"]["ndcg@10"], abs=1e-9)


def test_resume_from_a_checkpoint_continues_like_the_uninterrupted_run(synth_prepared, tmp_path):
    torch.set_num_threads(1)
    base = TrainConfig(data=str(synth_prepared), model=SMALL, epochs=4, patience=10, loss="sampled", num_negatives=20)
    runs = {}
    for name, epochs, resume in (("straight", 4, None), ("first", 2, None), ("resumed", 4, tmp_path / "first-last")):
        session = LocalSession(tmp_path / f"{name}-best", last_dir=tmp_path / f"{name}-last", resume_from=resume)
        session.verbose = False
        train_loop(base.replace(epochs=epochs), session)
        runs[name] = session.history
    assert [m["epoch"] for m in runs["resumed"]] == [3, 4]
    for key in ("train_loss", "valid_ndcg@10"):
        assert [round(m[key], 6) for m in runs["resumed"]] == [round(m[key], 6) for m in runs["straight"][2:]]


def test_corrupt_or_truncated_checkpoints_are_refused(synth_prepared, tmp_path):
    session = LocalSession(tmp_path / "best")
    session.verbose = False
    train_loop(TrainConfig(data=str(synth_prepared), model=SMALL, epochs=1), session)
    model_file = tmp_path / "best" / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        ckpt.load_checkpoint(tmp_path / "best")
    (tmp_path / "best" / "state.json").unlink()
    with pytest.raises(CheckpointError, match="not a raysrec checkpoint"):
        ckpt.load_checkpoint(tmp_path / "best")


def test_cli_evaluate_reports_sampled_and_full_protocols(synth_prepared, tmp_path):
    session = LocalSession(tmp_path / "best")
    session.verbose = False
    train_loop(TrainConfig(data=str(synth_prepared), model=SMALL, epochs=1), session)
    results = {}
    for protocol in ("full", "sampled"):
        proc = subprocess.run([sys.executable, "-m", "raysrec.cli", "evaluate", "--data", str(synth_prepared),
                               "--model", str(tmp_path / "best"), "--protocol", protocol],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        results[protocol] = json.loads(proc.stdout)
    # Ranking among 101 candidates is easier than among the whole catalogue.
    assert results["sampled"]["hr@10"] > results["full"]["hr@10"]
    proc = subprocess.run([sys.executable, "-m", "raysrec.cli", "evaluate", "--data", str(synth_prepared),
                           "--model", str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "checkpoint folder not found" in proc.stderr

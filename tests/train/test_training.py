"""Training for real: Ray Train with two DDP workers, resume, checkpoint integrity, evaluate."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from raysrec import artifact as ckpt
from raysrec.errors import CheckpointError, ConfigError
from raysrec.evaluation import CheckpointEvaluator
from raysrec.models.config import ModelConfig
from raysrec.train.config import TrainConfig
from raysrec.train.loop import LocalSession, train_loop
from raysrec.train.run import fit

SMALL = ModelConfig(hidden_dim=32, num_heads=2, num_layers=1, max_length=20)


def test_ray_train_two_workers_writes_a_complete_output(ray_local, synth_prepared, tmp_path):
    """Two DDP workers (gloo) with the sampled softmax: the item table's gradient is sparse, DDP all-reduces the
    rows, lazy Adam applies them. (Dense gradients across workers: the two-node job, tests/pipeline.)"""
    cfg = TrainConfig(data=str(synth_prepared), output=str(tmp_path / "out"), model=SMALL, epochs=2,
                      num_workers=2, cpus_per_worker=1, loss="sampled", num_negatives=50)
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
    assert saved == metrics and saved["source"] == "train" and saved["best_epoch"] in (1, 2)
    # both workers reported where they ran, and the saved checkpoint is the best epoch's
    assert [w["rank"] for w in saved["workers"]] == [0, 1] and saved["item_grads"] == "sparse"
    history = pd.read_csv(out / "history.csv")
    assert saved["valid"]["ndcg@10"] == pytest.approx(history["valid_ndcg@10"].max(), abs=1e-6)
    # the final scoring ran in a Ray task with a worker's resources, not on the driver
    from ray.util.state import list_tasks

    deadline = time.time() + 30             # the state API catches up with a finished task after a moment
    while True:
        scored = list_tasks(address=ray_local.get_runtime_context().gcs_address, filters=[("name", "=", "_score")],
                            raise_on_missing_output=False)
        if any(t.state == "FINISHED" for t in scored) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert any(t.state == "FINISHED" for t in scored), scored


@pytest.mark.parametrize("item_grads", ["sparse", "dense"])
def test_resume_from_a_checkpoint_continues_like_the_uninterrupted_run(synth_prepared, tmp_path, item_grads):
    torch.set_num_threads(1)
    base = TrainConfig(data=str(synth_prepared), model=SMALL, epochs=4, patience=10, loss="sampled", num_negatives=20,
                       item_grads=item_grads)
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
    assert proc.returncode == 2 and "model folder not found" in proc.stderr


def test_final_figures_on_a_user_sample_carry_their_interval_and_every_user_is_one_option_away(synth_prepared, tmp_path,
                                                                                               capsys):
    """metrics.json's valid/test figures of a run with more users than train.final_eval_max_users are on a seeded
    sample, with users_total and 95 % half-widths, and the CLI says so; 0 scores every user, and the sampled
    figure lies within its interval's reach of that one."""
    from raysrec.cli import main

    args = ["train", "--data", str(synth_prepared), "--epochs", "1", "--hidden-dim", "16", "--no-ray"]
    assert main([*args, "-o", str(tmp_path / "sampled"), "--final-eval-max-users", "120"]) == 0
    printed = capsys.readouterr().out
    assert "valid and test figures on a seeded sample of 120 of 300 users: test ndcg@10" in printed
    assert "--final-eval-max-users 0 scores every user" in printed
    sampled = json.loads((tmp_path / "sampled" / "metrics.json").read_text())
    for split in ("valid", "test"):
        assert sampled[split]["rows"] == 120 and sampled[split]["users_total"] == 300
        assert 0 < sampled[split]["ci95_ndcg@10"] < 0.2 and 0 < sampled[split]["ci95_hr@10"] < 0.2
    assert main([*args, "-o", str(tmp_path / "every"), "--final-eval-max-users", "0"]) == 0
    assert "seeded sample" not in capsys.readouterr().out
    every = json.loads((tmp_path / "every" / "metrics.json").read_text())
    assert every["test"]["rows"] == 300 and "users_total" not in every["test"] and "ci95_ndcg@10" not in every["test"]
    # the same seeded run, so the same model: the sample's figure estimates the every-user one
    assert abs(sampled["test"]["hr@10"] - every["test"]["hr@10"]) <= 2 * sampled["test"]["ci95_hr@10"]


class _FailingSession(LocalSession):
    """Resumes from a checkpoint it hands over in the loop's scratch folder, then fails at the first report."""

    def __init__(self, best_dir, resume_source):
        super().__init__(best_dir)
        self.verbose = False
        self.resume_source = resume_source
        self.scratch = None

    def latest_checkpoint(self, into):
        import shutil

        self.scratch = into
        return Path(shutil.copytree(self.resume_source, into / "resume"))

    def report(self, metrics, checkpoint_dir):
        raise RuntimeError("the report failed")


def test_eval_max_users_validates_the_epochs_on_a_fixed_sample_and_metrics_json_on_its_own_bound(synth_prepared,
                                                                                                    tmp_path):
    """One process: every epoch is validated on the same seeded sample of eval_max_users users (the best epoch's
    figure is the best checkpoint's on that sample), while metrics.json scores final_eval_max_users users
    (default 50,000: all 300 here); 0 validates every user."""
    torch.set_num_threads(1)
    cfg = TrainConfig(data=str(synth_prepared), output=str(tmp_path / "out"), model=SMALL, epochs=2, patience=5,
                      eval_max_users=150)
    saved = fit(cfg, use_ray=False)
    assert saved["valid"]["rows"] == saved["test"]["rows"] == 300 and "ci95_ndcg@10" not in saved["valid"]
    history = pd.read_csv(tmp_path / "out" / "history.csv")
    on_sample = CheckpointEvaluator(synth_prepared, tmp_path / "out").score(split="valid", max_users=150)
    assert on_sample["rows"] == 150 and on_sample["users_total"] == 300
    assert on_sample["ndcg@10"] == pytest.approx(history["valid_ndcg@10"].max(), abs=1e-6)
    assert on_sample["ndcg@10"] != pytest.approx(saved["valid"]["ndcg@10"], abs=1e-6)

    everyone = fit(cfg.replace(output=str(tmp_path / "all"), eval_max_users=0, epochs=1), use_ray=False)
    history = pd.read_csv(tmp_path / "all" / "history.csv")
    assert everyone["valid"]["ndcg@10"] == pytest.approx(history["valid_ndcg@10"].max(), abs=1e-6)


def test_a_failing_run_leaves_no_scratch_files_behind(synth_prepared, tmp_path, monkeypatch):
    session = LocalSession(tmp_path / "first")
    session.verbose = False
    cfg = TrainConfig(data=str(synth_prepared), model=SMALL, epochs=1)
    train_loop(cfg, session)
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    failing = _FailingSession(tmp_path / "best", tmp_path / "first")
    with pytest.raises(RuntimeError, match="the report failed"):
        train_loop(cfg.replace(epochs=2), failing)
    assert failing.scratch is not None and str(failing.scratch).startswith(str(scratch_root))
    assert list(scratch_root.iterdir()) == []     # checkpoints, items.parquet and the resume copy: all gone


def test_a_user_mistake_in_evaluate_is_one_line_and_exit_2(synth_prepared, tmp_path):
    session = LocalSession(tmp_path / "best")
    session.verbose = False
    train_loop(TrainConfig(data=str(synth_prepared), model=SMALL, epochs=1), session)
    proc = subprocess.run([sys.executable, "-m", "raysrec.cli", "evaluate", "--data", str(synth_prepared),
                           "--model", str(tmp_path / "best"), "--targets", "cold"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "cold_items > 0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_evaluate_max_users_scores_a_sample_with_intervals_or_every_user(synth_prepared, tmp_path):
    session = LocalSession(tmp_path / "best")
    session.verbose = False
    train_loop(TrainConfig(data=str(synth_prepared), model=SMALL, epochs=1), session)
    base = [sys.executable, "-m", "raysrec.cli", "evaluate", "--data", str(synth_prepared), "--model",
            str(tmp_path / "best")]
    sample = json.loads(subprocess.run(base + ["--max-users", "120"], capture_output=True, text=True, timeout=300,
                                       check=True).stdout)
    assert sample["rows"] == 120 and sample["users_total"] == 300 and sample["ci95_ndcg@10"] > 0
    every = json.loads(subprocess.run(base + ["--max-users", "0"], capture_output=True, text=True, timeout=300,
                                      check=True).stdout)
    assert every["rows"] == 300 and "ci95_ndcg@10" not in every
    evaluator = CheckpointEvaluator(synth_prepared, tmp_path / "best")
    assert every == evaluator.score(max_users=0)
    with pytest.raises(ConfigError, match="max_users must be >= 0"):                  # the Python API says so too
        evaluator.score(max_users=-1)
    proc = subprocess.run(base + ["--max-users", "-1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--max-users" in proc.stderr


def test_verbose_turns_ray_train_report_lines_back_on():
    import logging

    from raysrec.train.ray_train import _REPORT_LOGGERS, quiet_report_logs

    quiet_report_logs(verbose=False)
    assert all(logging.getLogger(name).level == logging.WARNING for name in _REPORT_LOGGERS)
    quiet_report_logs(verbose=True)
    assert all(logging.getLogger(name).level == logging.INFO for name in _REPORT_LOGGERS)


def test_a_corrupt_shard_ends_the_run_once_in_one_line(ray_local, synth_prepared, tmp_path):
    """A worker finds it (the driver only reads the manifest): every worker agrees, the run stops without
    FailureConfig's retries, and the CLI prints one line and exits 2. The CLI joins the session's Ray through
    RAY_ADDRESS, as a driver on a cluster does."""
    import os
    import shutil

    data = tmp_path / "prepared"
    shutil.copytree(synth_prepared, data)
    shard = sorted((data / "sequences").glob("part-*.parquet"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])     # truncated: no Parquet footer
    proc = subprocess.run([sys.executable, "-m", "raysrec.cli", "train", "--data", str(data), "-o", str(tmp_path / "o"),
                           "--num-workers", "2", "--cpus-per-worker", "1", "--epochs", "1", "--hidden-dim", "16",
                           "--num-heads", "1", "--num-layers", "1", "--max-length", "20"],
                          env={**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("raysrec train: error:")]
    assert len(error_lines) == 1 and shard.name in error_lines[0] and "unreadable sequence shard" in error_lines[0]
    # no traceback of the driver (lines Ray forwards from its own actors carry a "(Actor pid=...)" prefix)
    assert not any(line.startswith("Traceback") for line in proc.stderr.splitlines()), proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    # one attempt: each of the 2 workers joined the process group at most once (a FailureConfig retry starts a new
    # group; worker log lines can be lost when the driver exits, never added)
    assert output.count("Setting up process group") <= 2, output[-3000:]


@pytest.mark.parametrize("limit,expected,grads", [(10**9, "ce", "dense"), (0, "sampled", "sparse")])
def test_loss_auto_is_decided_by_the_catalogue_and_saved_resolved(synth_prepared, tmp_path, monkeypatch, limit,
                                                                   expected, grads):
    from raysrec.models import losses

    monkeypatch.setitem(losses.CE_MAX_ITEMS, "cpu", limit)       # the rule's threshold, either side of 200 items
    session = LocalSession(tmp_path / "best")
    session.verbose = False
    state = train_loop(TrainConfig(data=str(synth_prepared), model=SMALL, epochs=1, loss="auto", num_negatives=20),
                       session)
    _, saved_cfg, saved_state = ckpt.load_checkpoint(tmp_path / "best")
    assert saved_cfg.loss == expected and state["item_grads"] == saved_state["item_grads"] == grads


def test_train_bf16_on_cpu_sends_the_training_steps_matmuls_to_onednn_and_no_bf16_keeps_them_fp32(synth_prepared,
                                                                                                   tmp_path,
                                                                                                   onednn_matmuls):
    """``train.bf16`` (the default) on CPU: the training steps' matmuls run in oneDNN, bf16 allowed (oneDNN's
    own log says so); ``--no-bf16`` leaves every one to MKL's fp32 GEMM; evaluation is fp32 either way and the
    process's setting is back as it was after the run."""
    model = ModelConfig(hidden_dim=64, num_heads=2, num_layers=1, max_length=20)
    logged = {}
    for bf16 in (True, False):
        session = LocalSession(tmp_path / f"bf16-{bf16}")
        session.verbose = False
        cfg = TrainConfig(data=str(synth_prepared), model=model, epochs=1, loss="ce", bf16=bf16)
        logged[bf16] = onednn_matmuls(lambda cfg=cfg, session=session: train_loop(cfg, session))
        assert torch.backends.mkldnn.matmul.fp32_precision == "none"
    assert len(logged[True]) > 50 and all("attr-fpmath:bf16" in line for line in logged[True])
    assert any(line.split(",")[-2].endswith(":64x201") for line in logged[True])       # the loss: every item
    assert logged[False] == []

"""Search-space parsing: pure, no Ray."""

from __future__ import annotations

import pytest

from raysrec.errors import ConfigError
from raysrec.train.config import TrainConfig
from raysrec.tuning.search import space_path
from raysrec.tuning.space import apply_overrides, load_space, parse_space


def test_default_space_covers_the_architecture_and_optimiser():
    params = {p.path: p for p in load_space(space_path("default"))}
    assert {"model.num_layers", "model.num_heads", "model.dropout", "model.hidden_dim", "lr",
            "model.max_length"} <= set(params)
    for p in params.values():
        if p.kind == "choice" and p.path == "model.hidden_dim":
            heads = params["model.num_heads"].args
            assert all(h % n == 0 for h in p.args for n in heads), "every hidden_dim must fit every num_heads"


@pytest.mark.parametrize("raw,match", [
    ({"model.layers": {"choice": [1, 2]}}, "not a TrainConfig field"),
    ({"lr": {"gaussian": [0, 1]}}, "exactly one of"),
    ({"lr": {"loguniform": [0.0, 1.0]}}, "low > 0"),
    ({"model.dropout": {"uniform": [0.5, 0.1]}}, "low < high"),
    ({"model.num_layers": {"choice": []}}, "non-empty list"),
    ({"model.num_layers": {"choice": ["two"]}}, "integer"),
    ({"loss": "hinge"}, "expected one of"),
    ({"data": "/elsewhere"}, "cannot be searched"),
    ({}, "non-empty mapping"),
])
def test_bad_spaces_fail_before_any_trial_naming_the_field(raw, match):
    with pytest.raises(ConfigError, match=match):
        parse_space(raw)


def test_overrides_reach_nested_fields_and_are_type_checked():
    cfg = apply_overrides(TrainConfig(), {"model.num_layers": 3, "lr": 0.004, "model.dropout": 0.1})
    assert cfg.model.num_layers == 3 and cfg.lr == 0.004 and cfg.model.dropout == 0.1
    with pytest.raises(ConfigError, match="multiple of"):
        apply_overrides(TrainConfig(), {"model.hidden_dim": 30, "model.num_heads": 4})


@pytest.mark.parametrize("extra,message", [
    (["--space", "/no/such/space.yaml"], "search space '/no/such/space.yaml' not found (tried /no/such/space.yaml)"),
    (["--space", "nope"], "tune/nope.yaml"),
])
def test_tune_cli_names_a_missing_space(extra, message, tmp_path, capsys):
    from raysrec.cli import main

    assert main(["tune", "--data", str(tmp_path), "-o", str(tmp_path / "out"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_the_default_space_and_the_serve_template_ship_in_the_wheel(tmp_path, monkeypatch):
    """`raysrec tune` without --space and `raysrec config serve-deploy` work from an installed package."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(repo), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("raysrec-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"raysrec/tuning/spaces/default.yaml", "raysrec/serving/deploy.yaml"} <= names
    monkeypatch.chdir(tmp_path)                        # no tune/ folder here: the packaged space is found
    assert space_path("default").read_text() == (repo / "tune" / "default.yaml").read_text()
    proc = subprocess.run([sys.executable, "-m", "raysrec.cli", "config", "serve-deploy"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and "import_path: raysrec.serving.app:build_app" in proc.stdout

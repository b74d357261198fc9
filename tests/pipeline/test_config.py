"""The pipeline config: one file, stage paths derived from ``output``, strict about typos (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from raysrec.errors import ConfigError
from raysrec.pipeline import PipelineConfig

REPO = Path(__file__).resolve().parents[2]


def test_paths_between_stages_derive_from_output(tmp_path):
    cfg = PipelineConfig.from_dict({"output": str(tmp_path / "run")})
    root = str(tmp_path / "run")
    assert cfg.synth.output == f"{root}/raw"
    assert cfg.prepare.source.path == f"{root}/raw"       # no source given: the synthetic log
    assert cfg.prepare.output == cfg.train.data == f"{root}/prepared"
    assert cfg.train.output == f"{root}/model"
    assert cfg.serve.model_dir == f"{root}/best"
    assert cfg.tune is None and cfg.embed is None


@pytest.mark.parametrize("data", [{"train": {"model": {"use_text": True}}},
                                  {"stage": "tune", "tune": {"train": {"model": {"use_text": True}}}},
                                  {"embed": {"batch_size": 32}}])
def test_a_model_that_reads_text_gets_an_embed_step_on_the_prepared_data(tmp_path, data):
    cfg = PipelineConfig.from_dict({"output": str(tmp_path), **data})
    assert cfg.embed is not None and cfg.embed.data == f"{tmp_path}/prepared"


def test_given_paths_are_kept_and_relative_output_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = PipelineConfig.from_dict({"output": "rel", "prepare": {"source": {"path": "/data/log.csv"}},
                                    "train": {"output": "/elsewhere/model"}})
    assert cfg.prepare.source.path == "/data/log.csv"
    assert cfg.train.output == "/elsewhere/model"
    assert cfg.train.data == str(tmp_path / "rel" / "prepared")   # Ray workers do not share the driver's cwd


def test_tune_trials_start_from_the_train_section(tmp_path):
    cfg = PipelineConfig.from_dict({"output": str(tmp_path), "stage": "tune",
                                    "train": {"epochs": 4, "model": {"hidden_dim": 32}},
                                    "tune": {"num_samples": 3}})
    assert cfg.tune is not None and cfg.tune.num_samples == 3
    assert cfg.tune.train.epochs == 4 and cfg.tune.train.model.hidden_dim == 32
    assert cfg.tune.output == f"{tmp_path}/tune" and cfg.tune.data == f"{tmp_path}/prepared"


@pytest.mark.parametrize("data, message", [
    ({"trian": {}}, "unknown field(s) ['trian']"),
    ({"train": {"lr": "fast"}}, "PipelineConfig.train.lr: expected a number"),
    ({"stage": "serve"}, "PipelineConfig.stage: expected one of ['train', 'tune']"),
    ({"serve": {"port": 0}}, "serve.port must be in [1, 65535]"),
    ({"smoke_k": 0}, "pipeline.smoke_k must be >= 1"),
    ([1, 2], "expected a mapping"),
])
def test_bad_pipeline_configs_name_the_field(data, message):
    with pytest.raises(ConfigError) as err:
        PipelineConfig.from_dict(data)
    assert message in str(err.value)


def test_the_example_config_loads():
    cfg = PipelineConfig.load(REPO / "jobs" / "pipeline.yaml")
    assert cfg.stage == "train" and cfg.tune is not None and cfg.deploy
    assert cfg.serve.host == "127.0.0.1"

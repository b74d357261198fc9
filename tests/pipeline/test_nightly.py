"""A nightly retrain as one pipeline config: warm start from yesterday's model, everyone's top-k offline."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from raysrec.pipeline import PipelineConfig

SMALL = {"epochs": 1, "model": {"hidden_dim": 16, "num_heads": 1, "num_layers": 1, "max_length": 20}}


def test_recommend_section_derives_its_paths(tmp_path):
    cfg = PipelineConfig.from_dict({"output": str(tmp_path), "recommend": {"k": 7}})
    assert cfg.recommend.model == f"{tmp_path}/best" and cfg.recommend.data == f"{tmp_path}/prepared"
    assert cfg.recommend.output == f"{tmp_path}/recommendations" and cfg.recommend.k == 7
    assert PipelineConfig.from_dict({"output": str(tmp_path)}).recommend is None


@pytest.mark.slow
def test_second_night_warm_starts_and_writes_everyones_recommendations(ray_local, tmp_path):
    from raysrec.pipeline import run_pipeline

    first = {"output": str(tmp_path / "night1"), "deploy": False, "train": SMALL,
             "synth": {"num_users": 150, "num_items": 90, "num_events": 5000, "num_categories": 6, "seed": 1}}
    run_pipeline(PipelineConfig.from_dict(first), log=lambda *a, **k: None)
    second = {"output": str(tmp_path / "night2"), "deploy": False,
              "train": {**SMALL, "init_from": str(tmp_path / "night1" / "best")},
              "synth": {"num_users": 160, "num_items": 100, "num_events": 6000, "num_categories": 6, "seed": 2},
              "recommend": {"k": 5}}
    lines: list[str] = []
    summary = run_pipeline(PipelineConfig.from_dict(second), log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert any("[4/4] recommend: top-5" in line for line in lines), lines

    state = json.loads((tmp_path / "night2" / "best" / "checkpoint" / "state.json").read_text())
    warm = state["init_from"]
    assert warm["model"] == str(tmp_path / "night1" / "best")
    assert warm["known_items"] + warm["new_items"] == summary["data"]["num_items"]
    assert warm["known_items"] > 0 and warm["new_items"] > 0         # ids up to 90 known, 91..100 new
    recs = pd.read_parquet(tmp_path / "night2" / "recommendations" / "recommendations")
    assert summary["recommend"]["rows"] == len(recs) == summary["data"]["num_users"]
    assert recs["item_ids"].map(len).eq(5).all()

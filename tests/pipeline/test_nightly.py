"""A nightly retrain as one pipeline config: warm start from yesterday's model, everyone's top-k offline."""

from __future__ import annotations

from raysrec.pipeline import PipelineConfig


def test_recommend_section_derives_its_paths(tmp_path):
    cfg = PipelineConfig.from_dict({"output": str(tmp_path), "recommend": {"k": 7}})
    assert cfg.recommend.model == f"{tmp_path}/best" and cfg.recommend.data == f"{tmp_path}/prepared"
    assert cfg.recommend.output == f"{tmp_path}/recommendations" and cfg.recommend.k == 7
    assert PipelineConfig.from_dict({"output": str(tmp_path)}).recommend is None


def test_store_section_is_the_apps_live_state_and_feeds_prepare(tmp_path):
    cfg = PipelineConfig.from_dict({"output": str(tmp_path), "store": {"url": "redis://h:6379/0",
                                                                       "event_log": "s3://bucket/log"}})
    assert cfg.serve.store.url == "redis://h:6379/0" and cfg.prepare.event_log == "s3://bucket/log"
    alone = PipelineConfig.from_dict({"output": str(tmp_path)})
    assert alone.serve.store.url == f"sqlite:///{tmp_path}/state/events.db" and alone.prepare.event_log is None


# The second night (warm start, everyone's recommendations, deploy) runs on a live system in test_live_loop.py.

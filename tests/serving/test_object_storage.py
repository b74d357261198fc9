"""Models served straight from object storage (a real S3 API on 127.0.0.1): downloaded once, sha256-checked."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest
import requests

from raysrec import artifact
from raysrec.cli import main
from raysrec.errors import CheckpointError
from raysrec.files import publish
from raysrec.serving.recommender import Query, Recommender


@pytest.fixture(scope="module")
def model_uri(trained_model, s3):
    return publish(trained_model, s3("runs/1/model"))


def test_a_model_loads_from_s3_like_from_disk(trained_model, model_uri):
    local, remote = Recommender.load(trained_model), Recommender.load(model_uri)
    query = [Query(history=[local.original_id(i) for i in (3, 9, 27)], k=10)]
    assert remote.run(query)[0].items == local.run(query)[0].items
    assert remote.metadata["version"] == local.metadata["version"] == f"model@{local.metadata['version'][6:]}"
    assert "test:test" not in json.dumps(remote.metadata)          # credentials never reach /model


def test_a_modified_object_is_refused(trained_model, s3):
    uri = publish(trained_model, s3("runs/2/model"))
    fs, path = pafs.FileSystem.from_uri(uri)
    weights = f"{path}/checkpoint/{artifact.MODEL_FILE}"
    with fs.open_input_stream(weights) as handle:
        data = handle.read()
    with fs.open_output_stream(weights) as handle:
        handle.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        Recommender.load(uri)


def test_serve_names_a_wrong_uri_in_one_line_without_credentials(s3, capsys):
    assert main(["serve", "--model", s3("runs/none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no raysrec model here" in err and "test:test" not in err


def test_a_serve_deployment_answers_from_s3(endpoint, model_uri, serve_port):
    from ray import serve

    from raysrec.serving.app import run
    from raysrec.serving.config import ServeConfig

    cfg = ServeConfig(model_dir=model_uri, port=serve_port, app_name="from-s3", route_prefix="/s3")
    run(cfg)
    try:
        url = f"http://127.0.0.1:{serve_port}/s3"
        answer = requests.post(f"{url}/recommend", json={"history": [], "k": 3}, timeout=60).json()
        assert len(answer["items"]) == 3 and answer["model"].startswith("model@")
        meta = requests.get(f"{url}/model", timeout=30).json()
        assert meta["source"].startswith("s3://***@bucket/runs/1/model")
    finally:
        serve.delete(cfg.app_name)

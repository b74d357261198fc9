"""Security defaults: loopback, size limits, no code from checkpoints or configs, no secrets written."""

from __future__ import annotations

import json
import pickle

import pytest
import yaml

from raysrec import artifact as ckpt
from raysrec.config import redact
from raysrec.errors import CheckpointError
from raysrec.files import sha256_file
from raysrec.models.config import ModelConfig
from raysrec.pipeline import PipelineConfig
from raysrec.serving.config import ServeConfig
from raysrec.train.config import TrainConfig
from raysrec.train.loop import LocalSession, train_loop


def test_serving_defaults_are_loopback_and_bounded():
    cfg = ServeConfig(model_dir="x")
    assert cfg.host == "127.0.0.1" and cfg.max_request_bytes == 1 << 20


class _Payload:
    """Unpickling this runs code: what a malicious checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_carrying_code_is_refused_without_running_it(synth_prepared, tmp_path):
    session = LocalSession(tmp_path / "ckpt")
    session.verbose = False
    train_loop(TrainConfig(data=str(synth_prepared), model=ModelConfig(hidden_dim=16, num_heads=1, num_layers=1,
                                                                       max_length=10), epochs=1), session)
    folder, marker = tmp_path / "ckpt", tmp_path / "pwned"
    (folder / ckpt.MODEL_FILE).write_bytes(pickle.dumps({"weights": _Payload(marker)}))
    state = json.loads((folder / ckpt.STATE_FILE).read_text())   # an attacker can fix the digests too
    state["files"][ckpt.MODEL_FILE] = sha256_file(folder / ckpt.MODEL_FILE)
    (folder / ckpt.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="cannot load the weights"):
        ckpt.load_checkpoint(folder)
    assert not marker.exists()


@pytest.mark.parametrize("uri, secret", [
    ("s3://AKIAXXXX:wJalrSECRET@bucket/run", "wJalrSECRET"),
    ("s3://bucket/run?region=eu-west-1&access_key=AKIAXXXX&secret_key=wJalrSECRET", "wJalrSECRET"),
    ("https://user:hunter2@minio.local/run?X-Amz-Signature=abcdef123", "hunter2"),
])
def test_credentials_in_storage_uris_never_reach_saved_configs(tmp_path, uri, secret):
    assert secret not in redact(uri) and "***" in redact(uri)
    cfg = PipelineConfig.from_dict({"output": str(tmp_path), "storage_path": uri,
                                    "train": {"storage_path": uri}})
    cfg.save(tmp_path / "pipeline_config.yaml")
    text = (tmp_path / "pipeline_config.yaml").read_text()
    assert secret not in text
    assert yaml.safe_load(text)["storage_path"].startswith(uri.split(":")[0] + "://")
    TrainConfig(storage_path=uri).save(tmp_path / "train_config.json")
    assert secret not in (tmp_path / "train_config.json").read_text()


def test_plain_paths_and_uris_are_left_alone():
    for value in ("/data/run", "s3://bucket/run", "gs://b/p?region=eu", "file:///tmp/x"):
        assert redact(value) == value

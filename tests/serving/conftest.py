"""A trained checkpoint and a live Serve endpoint on 127.0.0.1, shared by the serving tests."""

from __future__ import annotations

import time

import pytest
import requests

from raysrec.models.config import ModelConfig
from raysrec.train.config import TrainConfig
from raysrec.train.run import fit

TINY = ModelConfig(hidden_dim=32, num_heads=2, num_layers=1, max_length=20)


@pytest.fixture(scope="session")
def trained_model(synth_prepared, tmp_path_factory):
    """A real training output folder (2 epochs, single process) on the small synthetic data."""
    out = tmp_path_factory.mktemp("served") / "model"
    fit(TrainConfig(data=str(synth_prepared), output=str(out), model=TINY, epochs=2), use_ray=False)
    return out


def wait_healthy(url: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not become healthy in {timeout} s")


@pytest.fixture(scope="module")
def endpoint(ray_local, trained_model, serve_port, tmp_path_factory):
    """The batched deployment of ``trained_model``, answering on http://127.0.0.1:<port>, with its live state in
    a SQLite file of its own."""
    from ray import serve

    from raysrec.online.events import StoreConfig
    from raysrec.serving.app import run
    from raysrec.serving.config import ServeConfig

    state = tmp_path_factory.mktemp("state")
    cfg = ServeConfig(model_dir=str(trained_model), port=serve_port, max_batch_size=16, batch_wait_timeout_s=0.01,
                      max_request_bytes=64 * 1024, app_name="test-endpoint",
                      store=StoreConfig(url=f"sqlite:///{state}/events.db", max_history=30,
                                        event_log=str(state / "log"), flush_interval_s=1.0))
    run(cfg)
    url = f"http://127.0.0.1:{serve_port}"
    wait_healthy(url)
    yield url
    serve.delete(cfg.app_name)

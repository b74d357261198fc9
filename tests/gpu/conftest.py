"""Fixtures of the GPU tests: a local Ray that sees the GPU, and a model trained on it."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def ray_gpu(ray_local):
    """The session's local Ray (2 CPUs) with the machine's GPU in its resources."""
    if ray_local.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("Ray sees no GPU")
    return ray_local


@pytest.fixture(scope="session")
def trained_model(synth_prepared, tmp_path_factory):
    """A model trained for 2 epochs on the GPU (single process, bf16)."""
    from raysrec.models.config import ModelConfig
    from raysrec.train.config import TrainConfig
    from raysrec.train.run import fit

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    out = tmp_path_factory.mktemp("gpu-model") / "model"
    fit(TrainConfig(data=str(synth_prepared), output=str(out), epochs=2, use_gpu=True,
                    model=ModelConfig(hidden_dim=32, num_heads=2, num_layers=1, max_length=20)), use_ray=False)
    return out

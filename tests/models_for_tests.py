"""A tiny real checkpoint for the tests that need a servable model but not a trained one."""

from __future__ import annotations

from pathlib import Path


def tiny_model(root: Path, seed: int = 0) -> Path:
    """A model folder at ``root`` (``checkpoint/`` + ``items.parquet``): SASRec 16-d over items ``it1``..``it50``
    with random weights drawn from ``seed``; returns ``root``."""
    import numpy as np
    import pandas as pd
    import torch

    from raysrec import artifact
    from raysrec.models.sequential import ModelConfig, build_model
    from raysrec.train.config import TrainConfig

    root.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig(num_items=50, hidden_dim=16, num_heads=2, num_layers=1, max_length=10)
    items = pd.DataFrame({"item_index": np.arange(1, 51, dtype=np.int32), "item_id": [f"it{i}" for i in range(1, 51)],
                          "count": np.arange(50, 0, -1, dtype=np.int64)})
    items.to_parquet(root / "items.parquet", index=False)
    torch.manual_seed(seed)
    artifact.save_checkpoint(root / "checkpoint", build_model(cfg), TrainConfig(model=cfg), {"epoch": 1},
                             items_file=root / "items.parquet")
    return root

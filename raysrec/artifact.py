"""Self-describing checkpoint folders: weights, optimizer, state, config and item index.

Layout: ``model.pt`` (state dict), ``optimizer.pt``, ``state.json`` (epoch, best metric, history,
sha256 of every file), ``train_config.yaml``, ``items.parquet``. Folders are written under a
temporary name and renamed, and loading checks every hash first, so a truncated or corrupt
checkpoint is refused with a clear error instead of being half-loaded. Loading never executes
code: ``torch.load(weights_only=True)`` and safe YAML.
"""

from __future__ import annotations

import json
import pickle
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

import torch

from raysrec.errors import CheckpointError
from raysrec.files import publish_dir, sha256_file
from raysrec.models.sequential import SequentialRecommender, build_model
from raysrec.train.config import TrainConfig

MODEL_FILE, OPTIM_FILE, STATE_FILE, CONFIG_FILE, ITEMS_FILE = (
    "model.pt", "optimizer.pt", "state.json", "train_config.yaml", "items.parquet")


def save_checkpoint(folder: str | Path, model: SequentialRecommender, cfg: TrainConfig, state: dict[str, Any],
                    optimizer: Optional[torch.optim.Optimizer] = None, items_file: Optional[str | Path] = None) -> Path:
    """Write a checkpoint folder atomically (temporary sibling, then rename)."""
    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp / MODEL_FILE)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIM_FILE)
        cfg.save(tmp / CONFIG_FILE)
        if items_file is not None:
            shutil.copyfile(items_file, tmp / ITEMS_FILE)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        (tmp / STATE_FILE).write_text(json.dumps({**state, "files": files}, indent=2))
        publish_dir(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def verify_checkpoint(folder: str | Path) -> dict[str, Any]:
    """Check presence and hashes of every file; returns the state. Raises :class:`CheckpointError`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{folder}: not a raysrec checkpoint ({STATE_FILE} missing)")
    try:
        state = json.loads(state_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{state_path}: corrupt ({exc})") from None
    for name in (MODEL_FILE, CONFIG_FILE):
        if name not in state.get("files", {}):
            raise CheckpointError(f"{folder}: {name} is not listed in {STATE_FILE}")
    for name, digest in state["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the checkpoint")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path}: checksum mismatch (truncated or modified); refusing to load it")
    return state


def load_checkpoint(folder: str | Path, map_location: str | torch.device = "cpu"
                    ) -> tuple[SequentialRecommender, TrainConfig, dict[str, Any]]:
    """Verified model (eval mode), its training config and state."""
    folder = Path(folder)
    state = verify_checkpoint(folder)
    cfg = TrainConfig.load(folder / CONFIG_FILE)
    model = build_model(cfg.model)
    try:
        weights = torch.load(folder / MODEL_FILE, map_location=map_location, weights_only=True)
        model.load_state_dict(weights)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        # weights_only refuses anything but tensors and plain containers: a pickle carrying code ends here.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{folder / MODEL_FILE}: cannot load the weights ({first})") from None
    model.eval()
    return model, cfg, state


def load_optimizer_state(folder: str | Path, optimizer: torch.optim.Optimizer) -> None:
    path = Path(folder) / OPTIM_FILE
    if path.is_file():
        try:
            optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path}: cannot load the optimizer state ({first})") from None

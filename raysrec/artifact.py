"""Model artifacts, written and read here only: the checkpoint folder and the servable model folder.

Checkpoint folder (one per reported epoch, and the one inside every model folder): ``model.pt``
(state dict), ``optimizer.pt``, ``state.json`` (epoch, best metric, history, workers, sha256 of
every file), ``train_config.yaml``, ``items.parquet`` (the item index). Folders are written under
a temporary name and renamed, and loading checks every hash first, so a truncated or corrupt
checkpoint is refused with a clear error instead of being half-loaded. Loading never executes
code: ``torch.load(weights_only=True)`` and safe YAML.

Model folder (what ``train``, ``tune`` and the pipeline write; what ``evaluate``, ``serve`` and
the benchmarks read)::

    DIR/checkpoint/          the chosen checkpoint (best valid NDCG@10)
    DIR/train_config.yaml    its training config
    DIR/history.csv          its run's per-epoch metrics, and DIR/training_curve.png
    DIR/metrics.json         :class:`ModelMetrics`, one schema for every producer; written last

:func:`resolve` is the one resolver: it accepts a model folder, a tune output (``best/``) or a bare
checkpoint folder.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import statistics
import uuid
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from raysrec.config import Config
from raysrec.errors import CheckpointError
from raysrec.files import publish_dir, sha256_file
from raysrec.models.sequential import SequentialRecommender, build_model
from raysrec.train.config import TrainConfig

MODEL_FILE, OPTIM_FILE, STATE_FILE, CONFIG_FILE, ITEMS_FILE = (
    "model.pt", "optimizer.pt", "state.json", "train_config.yaml", "items.parquet")
CHECKPOINT_DIR, METRICS_FILE, HISTORY_FILE, CURVE_FILE = "checkpoint", "metrics.json", "history.csv", "training_curve.png"


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


def read_optimizer_state(folder: str | Path) -> Optional[dict[str, Any]]:
    """The checkpoint's optimizer ``state_dict`` (``None`` when it has none); a corrupt file is a CheckpointError."""
    path = Path(folder) / OPTIM_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot load the optimizer state ({first})") from None


def load_optimizer_state(folder: str | Path, optimizer: torch.optim.Optimizer) -> None:
    saved = read_optimizer_state(folder)
    if saved is not None:
        try:
            optimizer.load_state_dict(saved)
        except (RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{Path(folder) / OPTIM_FILE}: cannot load the optimizer state ({first})") from None


def item_table(folder: str | Path) -> pd.DataFrame:
    """The checkpoint's item index (``item_index`` 1..N, ``item_id``, ``count``, ...), in index order."""
    path = Path(folder) / ITEMS_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: {ITEMS_FILE} missing; cannot map item ids")
    return pq.read_table(path).to_pandas().sort_values("item_index", ignore_index=True)


def item_ids(folder: str | Path) -> np.ndarray:
    """Original item ids in index order: ``item_ids(folder)[i - 1]`` is the id of model index ``i``."""
    return item_table(folder)["item_id"].to_numpy()


# ---------------------------------------------------------------- the servable model folder
@dataclasses.dataclass
class ModelMetrics(Config):
    """``metrics.json`` of a model folder: the same fields whoever wrote it."""

    source: Literal["train", "tune", "refit"] = "train"
    valid: dict[str, float] = dataclasses.field(default_factory=dict)   # the saved checkpoint, valid targets
    test: dict[str, float] = dataclasses.field(default_factory=dict)    # ... and test targets
    epochs: int = 0                      # epochs the run trained (early stopping may end it before train.epochs)
    best_epoch: int = 0                  # the epoch of the saved checkpoint
    train_seconds: float = 0.0           # wall seconds of the run (tune: the trial's epoch seconds added up)
    examples_per_second: float = 0.0     # median over epochs
    model: str = ""
    loss: str = ""
    item_grads: str = ""                 # sparse or dense item-table updates (train.item_grads)
    num_workers: int = 1
    use_gpu: bool = False
    workers: list[dict[str, Any]] = dataclasses.field(default_factory=list)   # where each worker ran
    # cold-start protocol (train.cold_items > 0): test_cold, test_warm, test_cold_among_cold
    cold: Optional[dict[str, dict[str, float]]] = None
    # tune exports: trial_id, params, num_trials, trials_errored, epochs_total, wall_seconds (and, after a refit,
    # the search trial's own valid/test/best_epoch under trial_metrics)
    search: Optional[dict[str, Any]] = None


@dataclasses.dataclass(frozen=True)
class ModelFolder:
    """A resolved model location: its folder and the checkpoint inside it."""

    root: Path
    checkpoint: Path

    def metrics(self) -> Optional[dict[str, Any]]:
        path = self.root / METRICS_FILE
        return json.loads(path.read_text()) if path.is_file() else None


def resolve(path: str | Path) -> ModelFolder:
    """A model folder, a tune output (its ``best/``) or a bare checkpoint folder -> :class:`ModelFolder`."""
    path = Path(path).resolve()
    for checkpoint in (path / CHECKPOINT_DIR, path / "best" / CHECKPOINT_DIR, path):
        if (checkpoint / STATE_FILE).is_file():
            return ModelFolder(checkpoint.parent if checkpoint.name == CHECKPOINT_DIR else checkpoint, checkpoint)
    if not path.exists():
        raise CheckpointError(f"{path}: model folder not found")
    raise CheckpointError(f"{path}: no raysrec model here (expected {CHECKPOINT_DIR}/{STATE_FILE}, "
                          f"best/{CHECKPOINT_DIR}/{STATE_FILE} or {STATE_FILE})")


def locate(location: str | Path) -> str:
    """:func:`resolve` for a local path or a URI, without downloading: the model folder's location (for a URI,
    the folder holding ``checkpoint/``, or the bare checkpoint folder). What the CLI checks before starting Ray."""
    text = str(location)
    if "://" not in text:
        return str(resolve(text).root)
    import pyarrow.fs as pafs  # noqa: PLC0415

    from raysrec.files import filesystem  # noqa: PLC0415

    fs, path = filesystem(text)
    base, sep, query = text.partition("?")
    for sub in ("", "/best"):
        for inner in (f"/{CHECKPOINT_DIR}", ""):
            if fs.get_file_info(f"{path}{sub}{inner}/{STATE_FILE}").type == pafs.FileType.File:
                return f"{base.rstrip('/')}{sub}{sep}{query}"
    raise CheckpointError(f"{_redacted(text)}: no raysrec model here (expected {CHECKPOINT_DIR}/{STATE_FILE}, "
                          f"best/{CHECKPOINT_DIR}/{STATE_FILE} or {STATE_FILE})")


def fetch(location: str | Path, into: str | Path) -> tuple[ModelFolder, str]:
    """A model folder from a local path (used in place) or a URI (downloaded into ``into``, once), and where it
    was found (:func:`locate`). Loading the checkpoint then checks every file's sha256 against ``state.json``,
    so a partial download is refused."""
    text = str(location)
    if "://" not in text:
        located = resolve(text)
        return located, str(located.root)
    import pyarrow.fs as pafs  # noqa: PLC0415

    from raysrec.files import filesystem  # noqa: PLC0415

    source = locate(text)
    fs, path = filesystem(source)
    into = Path(into)
    into.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(into), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return resolve(into), source


def _redacted(text: str) -> str:
    from raysrec.config import redact  # noqa: PLC0415

    return redact(text)


def write_model(dest: str | Path, checkpoint: str | Path, *, source: Literal["train", "tune", "refit"],
                scores: dict[str, Any], history: Optional[list[dict[str, Any]]] = None,
                train_seconds: Optional[float] = None, search: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Make ``dest`` a model folder around a copy of ``checkpoint``, with its ``scores``
    (:func:`raysrec.evaluation.final_scores`; Ray runs compute them in a task, see ``train.ray_train``).

    ``history`` is the whole run's per-epoch metrics (default: the checkpoint's own, which ends at its epoch).
    ``dest`` may hold other things (Ray's run folder); ``metrics.json`` is written last.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".{CHECKPOINT_DIR}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(checkpoint, tmp)
        verify_checkpoint(tmp)
        (dest / METRICS_FILE).unlink(missing_ok=True)    # the folder is incomplete until the new one is written
        publish_dir(tmp, dest / CHECKPOINT_DIR)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    folder = dest / CHECKPOINT_DIR
    state = json.loads((folder / STATE_FILE).read_text())
    cfg = TrainConfig.load(folder / CONFIG_FILE)
    cfg.save(dest / CONFIG_FILE)
    history = list(history if history is not None else state.get("history", []))
    if history:
        pd.DataFrame(history).to_csv(dest / HISTORY_FILE, index=False)
        plot_history(history, dest / CURVE_FILE, title=f"{cfg.model.name} ({cfg.loss})")

    speeds = [float(r["examples_per_second"]) for r in history if "examples_per_second" in r]
    metrics = ModelMetrics(
        source=source, valid=scores["valid"], test=scores["test"],
        epochs=int(max((r["epoch"] for r in history), default=state.get("epoch", 0))),
        best_epoch=int(state.get("best_epoch", state.get("epoch", 0))),
        train_seconds=round(float(train_seconds if train_seconds is not None
                                  else sum(float(r.get("epoch_seconds", 0.0)) for r in history)), 2),
        examples_per_second=round(statistics.median(speeds), 1) if speeds else 0.0,
        model=cfg.model.name, loss=cfg.loss, item_grads=str(state.get("item_grads", "")),
        num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
        workers=list(state.get("workers", [])), cold=scores.get("cold"), search=search)
    _write_json(dest / METRICS_FILE, metrics.to_dict())
    return metrics.to_dict()


def copy_model(source: str | Path, dest: str | Path, **updates: Any) -> dict[str, Any]:
    """Copy a model folder to ``dest`` (replacing it atomically); ``updates`` change fields of its metrics."""
    model = resolve(source)
    metrics = model.metrics()
    if metrics is None:
        raise CheckpointError(f"{model.root}: {METRICS_FILE} missing; not a complete model folder")
    dest = Path(dest).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(model.checkpoint, tmp / CHECKPOINT_DIR)
        for name in (CONFIG_FILE, HISTORY_FILE, CURVE_FILE):
            if (model.root / name).is_file():
                shutil.copyfile(model.root / name, tmp / name)
        metrics = ModelMetrics.from_dict({**metrics, **updates}).to_dict()
        _write_json(tmp / METRICS_FILE, metrics)
        publish_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metrics


def _write_json(path: Path, value: Any) -> None:
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(json.dumps(value, indent=2, default=str))
    tmp.rename(path)


def plot_history(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Training loss and valid NDCG@10 / HR@10 per epoch."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    frame = pd.DataFrame(history)
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(frame["epoch"], frame["train_loss"], color="tab:blue")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title=title)
    for key, color in (("valid_ndcg@10", "tab:green"), ("valid_hr@10", "tab:orange")):
        ax_metric.plot(frame["epoch"], frame[key], label=key, color=color)
    ax_metric.set(xlabel="epoch", ylabel="valid metric")
    ax_metric.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Ray Train (V2) adapter: a thin shell that runs :func:`raysrec.train.loop.train_loop` per worker."""

from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from raysrec.train.config import BEST_SCORE, TrainConfig
from raysrec.train.loop import format_epoch, worker_info

FATAL_ERROR = "raysrec_user_error"
USER_ERROR_FILE = "raysrec_user_error.txt"


RUN_PREFIX = "train-"


def new_run_name() -> str:
    """A fresh Ray Train run name, ``train-YYYYmmdd-HHMMSS-xxxxxx``: Ray restores a run whose name it finds in the
    storage, so reusing one name would silently continue the last run (its epoch, patience and best so far)."""
    import time  # noqa: PLC0415
    import uuid  # noqa: PLC0415

    return f"{RUN_PREFIX}{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def latest_run(storage_path: str) -> Optional[tuple[str, int]]:
    """The newest run in ``storage_path`` that has a checkpoint (names sort by their start time), with the epoch of
    its latest checkpoint; ``None`` when there is none. What ``train --resume`` continues."""
    import pyarrow.fs as pafs  # noqa: PLC0415

    from raysrec.files import filesystem  # noqa: PLC0415

    fs, root = filesystem(storage_path)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return None
    runs = sorted((i for i in fs.get_file_info(pafs.FileSelector(root)) if i.type == pafs.FileType.Directory
                   and i.base_name.startswith(RUN_PREFIX)), key=lambda i: i.base_name, reverse=True)
    for run in runs:
        epochs = []
        for entry in fs.get_file_info(pafs.FileSelector(run.path)):
            state = f"{entry.path}/state.json"
            if entry.type == pafs.FileType.Directory and fs.get_file_info(state).type == pafs.FileType.File:
                with fs.open_input_stream(state) as handle:
                    epochs.append(int(json.loads(handle.read().decode()).get("epoch", 0)))
        if epochs:
            return run.base_name, max(epochs)
    return None


def user_error_location(storage_path: str, run_name: str) -> str:
    """Where a run's user error is written: in the run's storage, which every node and the driver reach."""
    from raysrec.files import join  # noqa: PLC0415

    return join(storage_path, run_name, USER_ERROR_FILE)


def clear_user_error(location: str) -> None:
    """Forget the error of an earlier run of the same name (a re-run into the same storage)."""
    import pyarrow.fs as pafs  # noqa: PLC0415

    from raysrec.files import filesystem  # noqa: PLC0415

    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def raise_user_error(result, location: str) -> None:
    """Raise the user error a run stopped on (see :meth:`RaySession.stop_with_user_error`), if any."""
    import pyarrow.fs as pafs  # noqa: PLC0415

    from raysrec.errors import InputError  # noqa: PLC0415
    from raysrec.files import filesystem  # noqa: PLC0415

    message = (result.metrics or {}).get(FATAL_ERROR)
    fs, path = filesystem(location)
    if not message and fs.get_file_info(path).type == pafs.FileType.File:
        with fs.open_input_stream(path) as handle:   # the run can end before its last report is consumed
            message = handle.read().decode()
    if message:
        raise InputError(message)


class RaySession:
    """What a Ray Train worker needs: rank, device, DDP, all-reduce, report and checkpoints."""

    def __init__(self, user_error_file: Optional[str] = None) -> None:
        import ray.train  # noqa: PLC0415
        import ray.train.torch  # noqa: PLC0415

        self._train = ray.train
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.user_error_file = user_error_file

    def wrap_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch  # noqa: PLC0415

        return ray.train.torch.prepare_model(model)

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if self.world_size == 1:
            return values
        tensor = torch.from_numpy(values).to(self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.cpu().numpy()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Optional[Path]) -> None:
        if self.rank == 0:
            # Reaches the driver as "(RayTrainWorker pid=...) epoch ...". Not print(): Train V2 patches it
            # to also log through the root logger, which shows every line twice.
            sys.stdout.write(format_epoch(metrics) + "\n")
            sys.stdout.flush()
        checkpoint = self._train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=checkpoint)

    def workers(self) -> list[dict[str, Any]]:
        """Every worker's placement (node id, host, pid, device), gathered on all ranks."""
        import ray  # noqa: PLC0415

        return self.gather(worker_info(self.rank, self.device, ray.get_runtime_context().get_node_id()))

    def gather(self, value: Any) -> list[Any]:
        if self.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, value)
        return gathered

    def stop_with_user_error(self, message: str) -> None:
        """Rank 0 writes the error to the run's storage, every worker reports it and returns: the run *finishes*
        (no FailureConfig retry, which is for crashes), and the driver raises it (:func:`raise_user_error`)."""
        if self.rank == 0 and self.user_error_file:
            from raysrec.files import filesystem  # noqa: PLC0415

            fs, path = filesystem(self.user_error_file)
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with fs.open_output_stream(path) as handle:
                handle.write(message.encode())
        self._train.report({FATAL_ERROR: message})

    def latest_checkpoint(self, into: Path) -> Optional[Path]:
        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            return None
        return Path(checkpoint.to_directory(str(into / "resume")))


# Ray Train V2 logs two long INFO lines per report on every worker ("Reporting training result ...",
# "Checkpoint successfully created at ..."); raysrec prints its own epoch line instead, and shows Ray's
# with ``verbose``. The loggers are Ray's internal ones (context.py names its logger after its file).
_REPORT_LOGGERS = ("ray.train.v2._internal.execution.context", "ray.train.v2._internal.execution.storage")


def quiet_report_logs(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    for module_name in _REPORT_LOGGERS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:   # another Ray layout: leave its logging as it is
            continue
        for name in (module_name, getattr(module, "__file__", None)):
            if name:
                logging.getLogger(name).setLevel(level)


def train_func(config: dict[str, Any]) -> None:
    """The Ray Train worker entry point (``train_loop_per_worker``)."""
    from raysrec.train.loop import train_loop  # noqa: PLC0415

    cfg = TrainConfig.from_dict(config["train_config"])
    quiet_report_logs(cfg.verbose)
    if not cfg.use_gpu:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    train_loop(cfg, RaySession(config.get("user_error_file")))


def process_group_backend(cfg: TrainConfig) -> str:
    """NCCL for GPU workers, each on a GPU of its own; gloo on CPU and where GPU workers share a GPU
    (``gpus_per_worker < 1``): NCCL refuses two ranks on one device ("Duplicate GPU detected"), seen on an
    H100 with 2 workers at 0.5. Gloo all-reduces CUDA tensors through host memory: slower, but it runs."""
    if cfg.use_gpu and (cfg.gpus_per_worker >= 1 or cfg.num_workers == 1):
        return "nccl"
    return "gloo"


def build_trainer(cfg: TrainConfig, run_name: str, storage_path: str, callbacks: Optional[list] = None):
    """A ``TorchTrainer`` for ``cfg``: scaling, failure handling and best-checkpoint retention.

    ``callbacks`` are Train ``UserCallback``s, e.g. ``TuneReportCallback`` when a Tune trial runs it.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # noqa: PLC0415
    from ray.train.torch import TorchConfig, TorchTrainer  # noqa: PLC0415

    from raysrec.files import filesystem  # noqa: PLC0415

    # Ray gets the filesystem and its path, not a URI string: options (endpoint, region) and credentials
    # inside a URI stay with the filesystem, and every node opens the same storage.
    storage_fs, storage_root = filesystem(storage_path)
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    return TorchTrainer(
        train_func,
        torch_config=TorchConfig(backend=process_group_backend(cfg)),
        train_loop_config={"train_config": cfg.to_dict(),
                           "user_error_file": user_error_location(storage_path, run_name)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_root,
            storage_filesystem=storage_fs,
            callbacks=callbacks or None,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            # Keeps the checkpoint of the epoch the loop chose as best (BEST_SCORE: its valid NDCG@10 on the
            # epochs that improved it, -1 on the others, so a tie keeps the earlier epoch, as the loop does) and,
            # whatever its score, the latest one (Ray never deletes the latest), which is what a restarted worker
            # resumes from: at most two on storage.
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=BEST_SCORE,
                                               checkpoint_score_order="max"),
        ),
    )


def run_history(result) -> list[dict[str, Any]]:
    """Every epoch's metrics and where the workers ran, from the latest checkpoint's ``state.json`` (Ray's own
    ``metrics_dataframe`` keeps a row per report too, but not the placement). Only that file is read, through
    the checkpoint's filesystem: the weights and optimizer state stay where they are."""
    if result.checkpoint is None:
        return []
    checkpoint = result.checkpoint
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/state.json") as handle:
        return list(json.loads(handle.read().decode()).get("history", []))


def score_in_task(checkpoint, data: str, cfg: TrainConfig) -> dict[str, Any]:
    """:func:`raysrec.evaluation.final_scores` of a reported checkpoint, run in a Ray task that holds what one training
    worker holds (its GPU on a GPU run): the driver, often a head node without a GPU, never loads the model or
    reads the data, and never touches CUDA."""
    import ray  # noqa: PLC0415

    options: dict[str, Any] = {"num_cpus": cfg.cpus_per_worker}
    if cfg.use_gpu:
        options["num_gpus"] = cfg.gpus_per_worker
    task = ray.remote(_score).options(**options, max_retries=0)
    return ray.get(task.remote(checkpoint, data, "cuda" if cfg.use_gpu else "cpu", int(cfg.cpus_per_worker)))


def _score(checkpoint, data: str, device: str, threads: int) -> dict[str, Any]:
    from raysrec.evaluation import final_scores  # noqa: PLC0415

    torch.set_num_threads(max(1, threads))
    with checkpoint.as_directory() as folder:   # downloads when the run's storage is remote
        return final_scores(folder, data, device)

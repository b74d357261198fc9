"""The training stage's config; saved as ``train_config.yaml`` and inside every checkpoint."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from raysrec.config import Config, check
from raysrec.models.sequential import ModelConfig

VALID_METRIC = "valid_ndcg@10"


@dataclasses.dataclass
class TrainConfig(Config):
    data: str = ""
    output: str = ""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: Literal["ce", "sampled", "bce"] = "ce"
    num_negatives: int = 256
    negative_sampling: Literal["uniform", "popularity"] = "popularity"
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    aux_loss_weight: float = 0.0
    grad_clip: Optional[float] = None
    epochs: int = 200
    patience: int = 10
    train_windows: Literal["all", "last"] = "all"
    eval_batch_size: int = 256
    metric_ks: list[int] = dataclasses.field(default_factory=lambda: [5, 10, 20])
    seed: int = 0
    # Cold-start protocol: this share of the items (seeded) is removed from training histories and
    # from the training softmax; metrics.json then also reports test metrics on targets among them.
    cold_items: float = 0.0
    # Ray Train
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 2.0
    gpus_per_worker: float = 1.0
    bf16: bool = True
    max_failures: int = 3
    storage_path: Optional[str] = None
    resume_from: Optional[str] = None

    def validate(self) -> None:
        check(self.loss in ("ce", "sampled", "bce"), "train.loss must be ce, sampled or bce")
        check(self.batch_size >= 1 and self.eval_batch_size >= 1, "train batch sizes must be >= 1")
        check(self.lr > 0, "train.lr must be > 0")
        check(self.epochs >= 1 and self.patience >= 1, "train.epochs and train.patience must be >= 1")
        check(self.num_workers >= 1, "train.num_workers must be >= 1")
        check(10 in self.metric_ks, "train.metric_ks must include 10 (early stopping uses valid NDCG@10)")
        check(self.num_negatives >= 1, "train.num_negatives must be >= 1")
        check(0.0 <= self.cold_items < 1.0, "train.cold_items must be in [0, 1)")
        check(self.cold_items == 0.0 or self.loss == "ce",
              "train.cold_items (the cold-start protocol) needs loss ce, which can leave the cold items out")

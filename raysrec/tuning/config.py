"""The tuning stage's config (Ray-free: loading it imports nothing of Ray)."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from raysrec.config import Config, check, option
from raysrec.train.config import TrainConfig


@dataclasses.dataclass
class SearchConfig(Config):
    """The tuning stage's config; ``train`` is the base every trial starts from."""

    data: str = option("", 'a folder written by `raysrec prepare`')
    output: str = option("", 'search folder: trials.csv, best/, report.png, ray_results/')
    space: str = option("default", 'search space: a YAML path, or a name: tune/<name>.yaml, else one packaged with raysrec')
    num_samples: int = option(16, 'trials')
    max_concurrent: Optional[int] = option(None, "trials at once (default: as many as the cluster's CPUs/GPUs fit)")
    epochs: int = option(30, 'max epochs per trial (ASHA max_t)')
    grace_period: int = option(3, 'ASHA: epochs every trial gets before it can be stopped')
    reduction_factor: int = 3
    seed: int = option(0, 'Optuna seed')
    evaluate_default: bool = True     # first trial = the base config, as a reference point
    scheduler: Literal["asha", "fifo"] = option("asha", 'asha stops weak trials early; fifo runs each to its own early stop')
    storage_path: Optional[str] = option(None, "the Tune experiment and the trials' Ray Train runs: a folder every "
                                         "node sees or a URI (default: OUTPUT/ray_results)")
    # Train the winning parameters again for up to this many epochs (early stopping as in ``train``) and
    # export that model: trials are cut to ``epochs`` to compare many configs, the final model is not.
    refit_epochs: Optional[int] = option(None, 'retrain the winner for up to N epochs (early stopping) and export that model')
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def validate(self) -> None:
        check(self.data != "" and self.output != "", "tune: data and output are required")
        check(self.num_samples >= 1, "tune.num_samples must be >= 1")
        check(self.epochs >= 1 and 1 <= self.grace_period <= self.epochs, "tune: need 1 <= grace_period <= epochs")
        check(self.reduction_factor >= 2, "tune.reduction_factor must be >= 2")
        check(self.max_concurrent is None or self.max_concurrent >= 1, "tune.max_concurrent must be >= 1")
        check(self.refit_epochs is None or self.refit_epochs >= 1, "tune.refit_epochs must be >= 1")

"""The training stage's config; saved as ``train_config.yaml`` and inside every checkpoint."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from raysrec.config import Config, check, option
from raysrec.models.config import ModelConfig

# What "best" means, everywhere: early stopping, the checkpoint kept, the exported model, the winning trial.
VALID_METRIC = "valid_ndcg@10"
VALID_MODE: Literal["max"] = "max"


# Reported every epoch: VALID_METRIC on the epochs that improved the best so far, NOT_BEST on the others. Ray keeps
# checkpoints by it, so the checkpoint Ray keeps, the one exported and metrics.json's best_epoch are the epoch the
# loop chose (by VALID_METRIC alone, Ray keeps the later of two tied epochs and deletes the earlier, chosen one).
BEST_SCORE = "best_checkpoint_score"
NOT_BEST = -1.0


def improves(value: float, best: float) -> bool:
    """Whether a validation ``value`` beats the ``best`` so far (strictly: a tie keeps the earlier epoch)."""
    return value > best


@dataclasses.dataclass
class TrainConfig(Config):
    data: str = option("", 'a folder written by `raysrec prepare` (local path or URI)')
    output: str = option("", 'output folder (a model folder)')
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: Literal["auto", "ce", "sampled", "bce", "gbce"] = option(
        "auto", "auto: ce up to a catalogue size, sampled above (docs/benchmarks.md, 'Choosing the loss'); ce: full softmax; sampled: "
              "sampled softmax with logQ correction; bce: one negative (SASRec paper); gbce: gSASRec's generalised BCE")
    num_negatives: int = 256        # sampled: negatives shared by the batch; gbce: per position (from a pool of 4x)
    in_batch_negatives: bool = False  # sampled: the batch's other targets are negatives too
    gbce_t: float = 0.75            # gbce calibration (0: plain BCE, 1: fully calibrated)
    negative_sampling: Literal["uniform", "popularity"] = "popularity"
    batch_size: int = option(128, 'sequences per step and worker')
    # 4e-3, not the usual 1e-3: on ML-100K (sasrec, full CE, 3 seeds) test NDCG@10 0.1039 vs 0.0986 and best epoch
    # reached in 71 s instead of 159 s (bench/accuracy.py; docs/benchmarks.md "Choosing the loss and the learning rate")
    lr: float = option(4e-3, 'AdamW learning rate')
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    ce_chunk_items: int = option(8192, "full CE: a full batch (batch_size x max_length positions) scores the "
                                       "catalogue this many items at a time, recomputing logits in backward "
                                       "(memory O(positions x chunk)); a trimmed batch scores more items in the "
                                       "same memory, and keeps the softmax for backward when the whole catalogue "
                                       "fits; 0: all at once")
    ce_kernel: Literal["torch", "cce"] = option(
        "torch", "full CE implementation: torch (chunked, exact) or cce, the fused Cut Cross-Entropy kernel "
                 "(CUDA, bf16, the gpu extra; 2x faster on an H100, less precise d(hidden))")
    item_grads: Literal["auto", "dense", "sparse"] = option(
        "auto", "item table updates: sparse touches only the rows of the batch (lazy Adam; 8x faster steps at 1M "
                "items on CPU, and DDP all-reduces those rows, not the table); auto: sparse for the sampled losses "
                "on CPU workers")
    aux_loss_weight: float = 0.0
    grad_clip: Optional[float] = None
    epochs: int = option(200, 'maximum epochs')
    patience: int = option(10, 'stop after this many epochs without a better valid NDCG@10')
    target_types: list[str] = option([], "predict only events of these types (e.g. buy: next-buy prediction; names "
                                         "of the prepared data's event_types): training targets and the held-out "
                                         "valid/test targets are of these types, the history keeps every type; "
                                         "empty: every event is a target")
    train_windows: Literal["all", "last"] = "all"
    group_by_length: int = option(64, "training batches hold rows of similar length: rows are sorted by length "
                                      "within windows of this many shuffled batches, and the batches shuffled "
                                      "(0: plain shuffle); every batch is trimmed to its longest row either way")
    eval_batch_size: int = 256
    eval_max_users: Optional[int] = option(10_000, "early stopping validates every epoch on a fixed, seeded "
                                                   "sample of this many users (0 or null: every user); on Amazon "
                                                   "Sports 10,000 of 35,598 users pick as good an epoch as every "
                                                   "user (bench/validation_cost.py), and validating 200k users over "
                                                   "a million-item catalogue took 15 minutes an epoch on 2 CPUs. With "
                                                   "several workers, each validates its share of the sample among "
                                                   "the users it reads")
    final_eval_max_users: int = option(50_000, "the run's final valid and test figures (metrics.json) on a fixed, "
                                               "seeded sample of this many users when there are more, each with "
                                               "the half-width of its 95-percent confidence interval (0: every "
                                               "user); full ranking of 200k users over a million items takes "
                                               "minutes per split on CPU")
    eval_chunk_items: int = option(65536, "evaluation scores the catalogue this many items at a time: it never "
                                          "holds more than eval_batch_size x this many scores")
    metric_ks: list[int] = dataclasses.field(default_factory=lambda: [5, 10, 20])
    seed: int = option(0, 'random seed')
    # from the training softmax; metrics.json then also reports test metrics on targets among them.
    cold_items: float = option(0.0, 'cold-start protocol: hold this share of the items out of training (loss ce)')
    num_workers: int = option(1, 'Ray Train workers (DDP)')
    use_gpu: bool = option(False, 'one GPU (or gpus_per_worker) per worker')
    cpus_per_worker: float = option(2.0, 'CPUs per Ray Train worker')
    gpus_per_worker: float = option(1.0, 'GPUs per worker; fractions share a GPU')
    bf16: bool = option(True, 'mixed precision: bf16 autocast on CUDA; on CPU, training matmuls through oneDNN, which may multiply in bf16 with fp32 sums (no-bf16: fp32 throughout)')
    max_failures: int = 3
    storage_path: Optional[str] = option(None, 'Ray Train storage: a folder every node sees or a URI (s3://...)')
    resume: bool = option(False, "continue the newest Ray Train run in the run storage (output/ray_results or "
                                 "storage_path), with its epoch, patience and best so far; without it every run "
                                 "is a new one")
    resume_from: Optional[str] = option(None, 'continue from this checkpoint or model folder (local path or URI)')
    init_from: Optional[str] = option(None, 'warm start: a model trained on an older log (same architecture); '
                                            'known items keep their rows, new items start fresh')
    # shrink and perturb (Ash & Adams, NeurIPS 2020); bench/warm_start.py: on ML-100K's time split it reached a
    # better valid/test NDCG@10 than the plain copy (1.0, 0.0: known rows bit for bit) in fewer epochs
    init_shrink: float = option(0.5, "with init_from: scale the learned weights (1: as learned)")
    init_perturb: float = option(0.1, "with init_from: add this times a fresh initialisation (0: none)")
    init_optimizer: Literal["reset", "carry"] = option("reset", "with init_from: start AdamW afresh, or carry the "
                                                               "checkpoint's moments (item rows matched by id)")
    verbose: bool = option(False, "also print Ray Train's per-report lines")

    def validate(self) -> None:
        check(self.loss in ("auto", "ce", "sampled", "bce", "gbce"), "train.loss must be auto, ce, sampled, bce or gbce")
        check(0.0 <= self.gbce_t <= 1.0, "train.gbce_t must be in [0, 1]")
        check(self.batch_size >= 1 and self.eval_batch_size >= 1, "train batch sizes must be >= 1")
        check(self.lr > 0, "train.lr must be > 0")
        check(self.epochs >= 1 and self.patience >= 1, "train.epochs and train.patience must be >= 1")
        check(self.num_workers >= 1, "train.num_workers must be >= 1")
        check(10 in self.metric_ks, "train.metric_ks must include 10 (early stopping uses valid NDCG@10)")
        check(self.num_negatives >= 1, "train.num_negatives must be >= 1")
        check(self.group_by_length >= 0, "train.group_by_length must be >= 0 (0: plain shuffle)")
        check(self.eval_chunk_items >= 1, "train.eval_chunk_items must be >= 1")
        check(self.ce_chunk_items >= 0, "train.ce_chunk_items must be >= 0 (0: the whole catalogue at once)")
        check(0.0 <= self.label_smoothing < 1.0, "train.label_smoothing must be in [0, 1)")
        check(0.0 <= self.cold_items < 1.0, "train.cold_items must be in [0, 1)")
        check(self.max_failures >= 0, "train.max_failures must be >= 0")
        check(0.0 < self.init_shrink <= 1.0 and self.init_perturb >= 0.0,
              "train.init_shrink must be in (0, 1] and train.init_perturb >= 0")
        check(not (self.resume and (self.resume_from or self.init_from)),
              "train.resume (continue the newest run) excludes train.resume_from and train.init_from")
        check(not (self.init_from and self.resume_from), "train.init_from and train.resume_from exclude each other "
              "(resume continues a run on the same data; init_from starts a new one)")
        check(self.ce_kernel != "cce" or (self.use_gpu and self.bf16 and not self.label_smoothing
                                          and not self.cold_items),
              "train.ce_kernel cce needs use_gpu and bf16, and works without label_smoothing and cold_items")
        if self.item_grads == "sparse":
            check(self.loss != "ce", "train.item_grads sparse needs a sampled loss (sampled, gbce or bce): the full "
                                     "softmax gives every item row a gradient")
            check(self.weight_decay == 0.0 and not self.grad_clip,
                  "train.item_grads sparse works without weight_decay and grad_clip (lazy Adam updates only the "
                  "rows of the batch)")
            check(not (self.use_gpu and self.num_workers > 1),
                  "train.item_grads sparse with several GPU workers: NCCL has no sparse all-reduce; use dense")
        check(self.eval_max_users is None or self.eval_max_users >= 0,
              "train.eval_max_users must be >= 0 (0: every user)")
        check(self.final_eval_max_users >= 0, "train.final_eval_max_users must be >= 0 (0: every user)")
        check(len(set(self.target_types)) == len(self.target_types), "train.target_types: a type is named twice")
        check(self.cold_items == 0.0 or self.loss in ("ce", "auto"),
              "train.cold_items (the cold-start protocol) needs loss ce, which can leave the cold items out")

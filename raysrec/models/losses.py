"""Next-item losses over the positions that have a target (``target_ids > 0``).

``id_keep`` is the training step's ID-dropout mask (returned by the model's forward), so the output
side drops the same items as the input side.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

from raysrec.models.sequential import SequentialRecommender

LossName = Literal["ce", "sampled", "bce"]


def full_softmax_ce(model: SequentialRecommender, hidden: torch.Tensor, targets: torch.Tensor,
                    label_smoothing: float = 0.0, excluded: Optional[torch.Tensor] = None,
                    id_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-entropy over the whole catalogue (Klenitskiy & Vasilev, RecSys 2023): the default.

    ``excluded`` (N+1,) bool marks items outside the training catalogue (cold-start protocol): they
    take no part in the softmax, so training never learns anything about them.
    """
    logits = hidden @ model.item_vectors(id_keep).T                                   # (P, N+1)
    logits[:, 0] = float("-inf")
    if excluded is not None:
        logits = logits.masked_fill(excluded, float("-inf"))
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def sampled_softmax(model: SequentialRecommender, hidden: torch.Tensor, targets: torch.Tensor,
                    negatives: torch.Tensor, log_q: Optional[torch.Tensor] = None,
                    id_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax over the target and N negatives shared by the batch, with logQ correction.

    ``negatives`` (N,) are drawn from a proposal q (``log_q`` (num_items+1,) its log-probabilities;
    uniform when ``None``); subtracting log q makes the estimate consistent for popularity
    sampling. Negatives equal to a row's target are masked (accidental hits).
    """
    pos = (hidden * model.item_rows(targets, id_keep)).sum(-1, keepdim=True)            # (P, 1)
    neg = hidden @ model.item_rows(negatives, id_keep).T                                  # (P, N)
    if log_q is not None:
        pos = pos - log_q[targets].unsqueeze(-1)
        neg = neg - log_q[negatives].unsqueeze(0)
    neg = neg.masked_fill(negatives.unsqueeze(0) == targets.unsqueeze(-1), float("-inf"))
    logits = torch.cat([pos, neg], dim=-1).float()
    return F.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.long, device=targets.device))


def bce_one_negative(model: SequentialRecommender, hidden: torch.Tensor, targets: torch.Tensor,
                     negatives: torch.Tensor, id_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The original SASRec / KerasRS loss: binary CE on the positive and one negative per position."""
    pos = (hidden * model.item_rows(targets, id_keep)).sum(-1).float()
    neg = (hidden * model.item_rows(negatives, id_keep)).sum(-1).float()
    return F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos)) + \
        F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg))

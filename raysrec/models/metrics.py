"""Ranking metrics, batched on the training device.

Full ranking: every item is scored; items already in the user's history are masked except the
target (which is never masked). Sampled (the SASRec paper's protocol): the target against 100
items drawn uniformly from those the user never touched. Ties count against the target.
"""

from __future__ import annotations

from typing import Optional

import torch


def full_ranking_ranks(scores: torch.Tensor, targets: torch.Tensor, history: Optional[torch.Tensor],
                       allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """0-based rank of each target; ``scores`` (B, N+1), ``targets`` (B,), ``history`` (B, H) 0-padded.

    ``allowed`` (N+1,) bool restricts the candidates (e.g. to new items); the target always competes.
    """
    scores = scores.float().clone()
    target_score = scores.gather(1, targets[:, None])                          # (B, 1)
    if allowed is not None:
        scores.masked_fill_(~allowed.to(scores.device), float("-inf"))
    if history is not None:
        scores.scatter_(1, history, float("-inf"))
    scores[:, 0] = float("-inf")
    scores.scatter_(1, targets[:, None], target_score)
    return (scores > target_score).sum(1)


def sampled_candidates(targets: torch.Tensor, history: Optional[torch.Tensor], num_items: int, num_negatives: int,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, 1 + n) candidates: the target first, then n distinct items the user never touched."""
    seen = torch.zeros(len(targets), num_items + 1, dtype=torch.bool, device=targets.device)
    if history is not None:
        seen.scatter_(1, history, True)
    seen[:, 0] = True
    seen.scatter_(1, targets[:, None], True)
    weights = (~seen).float()
    n = min(num_negatives, int(weights.sum(1).min().item()))
    negatives = torch.multinomial(weights.cpu(), n, replacement=False, generator=generator).to(targets.device)
    return torch.cat([targets[:, None], negatives], dim=1)


def sampled_ranks(candidate_scores: torch.Tensor) -> torch.Tensor:
    """0-based rank of column 0 (the target) among the candidates."""
    return (candidate_scores[:, 1:].float() > candidate_scores[:, :1].float()).sum(1)


def metric_sums(ranks: torch.Tensor, ks: list[int]) -> dict[str, float]:
    """Sums (not means) of NDCG@K, HR@K and MRR@K, so workers can all-reduce them before dividing."""
    out: dict[str, float] = {}
    ranks = ranks.double()
    for k in ks:
        hit = ranks < k
        out[f"ndcg@{k}"] = float((hit / torch.log2(ranks + 2.0)).sum())
        out[f"hr@{k}"] = float(hit.sum())
        out[f"mrr@{k}"] = float((hit / (ranks + 1.0)).sum())
    return out

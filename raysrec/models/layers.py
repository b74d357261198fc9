"""Transformer building blocks shared by SASRec and the long/short-term model.

Attention goes through ``F.scaled_dot_product_attention`` so GPUs get fused (flash /
memory-efficient) kernels. Masks are boolean, ``True`` = may attend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def causal_mask(padding_mask: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(B, 1, L, L) mask: position i attends to j <= i (and j > i - window), real keys only.

    Every row may attend to itself, so rows of padding never become all-masked (which would
    give NaNs); their outputs are ignored by the losses and metrics.
    """
    length = padding_mask.shape[1]
    idx = torch.arange(length, device=padding_mask.device)
    allowed = idx[None, :] <= idx[:, None]                           # (L, L) j <= i
    if window is not None:
        allowed &= idx[None, :] > idx[:, None] - window
    mask = allowed[None] & padding_mask[:, None, :]                  # (B, L, L)
    mask |= torch.eye(length, dtype=torch.bool, device=padding_mask.device)[None]
    return mask[:, None]                                             # (B, 1, L, L)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_dim {dim} must be divisible by num_heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, L, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, length, dim))


class Block(nn.Module):
    """Self-attention + position-wise feed-forward, with residuals; pre-LN when ``norm_first``."""

    def __init__(self, dim: int, heads: int, dropout: float, norm_first: bool, ffn_mult: int = 1,
                 activation: str = "gelu") -> None:
        super().__init__()
        self.norm_first = norm_first
        self.attn = SelfAttention(dim, heads, dropout)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU() if activation == "gelu" else nn.ReLU(),
                                 nn.Dropout(dropout), nn.Linear(ffn_mult * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            x = x + self.drop(self.attn(self.ln1(x), mask))
            return x + self.drop(self.ffn(self.ln2(x)))
        x = self.ln1(x + self.drop(self.attn(x, mask)))
        return self.ln2(x + self.drop(self.ffn(x)))


class Encoder(nn.Module):
    """A stack of blocks with a final LayerNorm (the SASRec ``log2feats`` body)."""

    def __init__(self, dim: int, heads: int, layers: int, dropout: float, norm_first: bool, ffn_mult: int,
                 activation: str) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, dropout, norm_first, ffn_mult, activation) for _ in range(layers))
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask)
        return self.final_norm(x)

"""SASRec and the long/short-term interest model: pure PyTorch, no Ray, no data loading.

Both map a left-padded batch to one hidden vector per position, ``(B, L, d)``; scores are dot
products with the item embedding table, which is shared between input and output (as in
SASRec). The models own only the math: sampling, losses and metrics live elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysrec.config import check
from raysrec.models.config import ModelConfig
from raysrec.models.layers import Encoder, causal_mask


class SequentialRecommender(nn.Module):
    """Shared pieces: item table (tied with the output), learned positions, scoring."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        check(cfg.num_items > 0, "model.num_items must be set from the data")
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.num_items + 1, cfg.hidden_dim, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_length, cfg.hidden_dim)
        self.emb_drop = nn.Dropout(cfg.dropout if cfg.emb_dropout is None else cfg.emb_dropout)
        self.type_emb = nn.Embedding(len(cfg.type_names) + 1, cfg.hidden_dim, padding_idx=0) \
            if cfg.type_names else None                              # row 0: padding, or a type not known
        # one table and one LayerNorm per attribute; its tokens per item are a buffer, like the text vectors, so a
        # checkpoint carries every item's attributes (an item never seen in training still has them)
        self.feature_emb = nn.ModuleList([nn.Embedding(len(v) + 1, cfg.hidden_dim, padding_idx=0)
                                          for v in cfg.feature_vocab.values()])
        self.feature_norm = nn.ModuleList([nn.LayerNorm(cfg.hidden_dim) for _ in cfg.feature_vocab])
        for i, name in enumerate(cfg.feature_vocab):
            self.register_buffer(f"feature_tokens_{i}",
                                 torch.zeros(cfg.num_items + 1, max(1, cfg.feature_width.get(name, 1)), dtype=torch.long))
        # user attributes arrive with each row of the input (``user_tokens_{i}``): the model keeps no user table
        self.user_feature_emb = nn.ModuleList([nn.Embedding(len(v) + 1, cfg.hidden_dim, padding_idx=0)
                                               for v in cfg.user_feature_vocab.values()])
        self.user_feature_norm = nn.ModuleList([nn.LayerNorm(cfg.hidden_dim) for _ in cfg.user_feature_vocab])
        if cfg.use_text:
            check(cfg.text_dim > 0, "model.text_dim must be set from the item text vectors")
            # A buffer, not a parameter: frozen, but saved in the state dict, so a checkpoint carries the
            # vectors of every item, including items never seen in training (cold start).
            self.register_buffer("text_vectors", torch.zeros(cfg.num_items + 1, cfg.text_dim))
            self.text_proj = nn.Linear(cfg.text_dim, cfg.hidden_dim, bias=False)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=self.cfg.hidden_dim ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
            if self.type_emb is not None:
                self.type_emb.weight[0].zero_()
            for norm in [*self.feature_norm, *self.user_feature_norm]:   # on the scale of an ID embedding row
                norm.weight.fill_(self.cfg.hidden_dim ** -0.5)
            if self.cfg.use_text:
                # With text, the ID embedding is a residual learned on top of the text vector: it starts
                # at zero, so an item without interactions is represented by its text alone.
                self.item_emb.weight.zero_()

    def set_item_features(self, tables: dict[str, np.ndarray]) -> None:
        """Load each attribute's ``(num_items + 1, M)`` token indices (0-padded; row 0 = padding), by name."""
        check(list(tables) == list(self.cfg.feature_vocab), f"item attributes {list(tables)} do not fit this model "
              f"({list(self.cfg.feature_vocab)})")
        for i, tokens in enumerate(tables.values()):
            buffer = getattr(self, f"feature_tokens_{i}")
            check(tuple(tokens.shape) == tuple(buffer.shape), f"item attribute tokens of shape {tokens.shape} do not "
                  f"fit this model ({tuple(buffer.shape)})")
            with torch.no_grad():
                buffer.copy_(torch.as_tensor(tokens, dtype=torch.long))

    def set_text_vectors(self, vectors: torch.Tensor) -> None:
        """Load the frozen ``(num_items + 1, text_dim)`` item text vectors (row 0 = padding)."""
        check(self.cfg.use_text and tuple(vectors.shape) == tuple(self.text_vectors.shape),
              f"text vectors of shape {tuple(vectors.shape)} do not fit this model")
        with torch.no_grad():
            self.text_vectors.copy_(vectors)
            self.text_vectors[0].zero_()

    def item_rows(self, item_ids: Optional[torch.Tensor] = None, id_keep: Optional[torch.Tensor] = None,
                  side: Literal["input", "output"] = "output") -> torch.Tensor:
        """(...) item indices -> (..., d) item representations (ID embedding [+ projected text] [+ attributes]); without
        ``item_ids`` the whole table (N+1, d). Input and output side are tied; ``side`` matters only with
        ``features_on_output`` off, where the output side leaves the attributes out.

        ``id_keep`` (N+1, 1): the ID-dropout mask of this training step (see :meth:`id_dropout_mask`).
        """
        whole = item_ids is None
        rows = self.item_emb.weight if whole else self.item_emb(item_ids)
        if self.cfg.use_text:
            if id_keep is not None:
                rows = rows * (id_keep if whole else id_keep[item_ids])
            rows = rows + self.text_proj(self.text_vectors if whole else self.text_vectors[item_ids])
        if side == "output" and not self.cfg.features_on_output:
            return rows
        for i, (emb, norm) in enumerate(zip(self.feature_emb, self.feature_norm)):
            tokens = getattr(self, f"feature_tokens_{i}")
            tokens = tokens if whole else tokens[item_ids]                                # (..., M)
            flat = tokens.reshape(-1, tokens.shape[-1])
            pooled = F.embedding_bag(flat, emb.weight, mode="mean", padding_idx=0)          # (P, d); none: 0
            part = norm(pooled) * (flat > 0).any(-1, keepdim=True)                         # no value: nothing
            rows = rows + part.reshape(*tokens.shape[:-1], -1)
        return rows

    def id_dropout_mask(self) -> Optional[torch.Tensor]:
        """(N+1, 1) 0/1: the items whose ID embedding this training step keeps; ``None`` outside training.

        Drawn once per forward and returned with its outputs, so the loss's output-side table drops the
        same items as the input side.
        """
        if not (self.training and self.cfg.id_dropout > 0):
            return None
        keep = torch.rand(self.cfg.num_items + 1, 1, device=self.item_emb.weight.device) >= self.cfg.id_dropout
        return keep.to(self.item_emb.weight.dtype)

    def embed(self, batch: dict[str, torch.Tensor], id_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, L) input -> (B, L, d): item, position and (with types) event type. Left padding means position L-1
        is always the newest item."""
        input_ids = batch["input_ids"]
        length = input_ids.shape[1]
        x = self.item_rows(input_ids, id_keep, side="input") * math.sqrt(self.cfg.hidden_dim)
        x = x + self.pos_emb.weight[-length:][None]
        if self.type_emb is not None and "input_types" in batch:
            x = x + self.type_emb(batch["input_types"]) * math.sqrt(self.cfg.hidden_dim)   # on the items' scale
        context = self.user_context(batch)
        if context is not None:
            x = x + context.unsqueeze(1) * math.sqrt(self.cfg.hidden_dim)
        return self.emb_drop(x) * (input_ids != 0).unsqueeze(-1)

    def user_context(self, batch: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """(B, d): the sum of the rows' user attributes (each pooled over its tokens and layer-normed; an attribute
        without a value adds nothing), or None for a model without user attributes."""
        context = None
        for i, (emb, norm) in enumerate(zip(self.user_feature_emb, self.user_feature_norm)):
            tokens = batch.get(f"user_tokens_{i}")
            if tokens is None:
                continue
            pooled = F.embedding_bag(tokens, emb.weight, mode="mean", padding_idx=0)          # (B, d)
            part = norm(pooled) * (tokens > 0).any(-1, keepdim=True)
            context = part if context is None else context + part
        return context

    def score_all(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., N+1) scores against every item; index 0 (padding) is -inf."""
        logits = hidden @ self.item_rows().T
        logits[..., 0] = float("-inf")
        return logits

    def score_items(self, hidden: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        """hidden (..., d), item_ids (..., K) -> (..., K)."""
        return (self.item_rows(item_ids) * hidden.unsqueeze(-2)).sum(-1)

    def forward(self, batch: dict[str, torch.Tensor], aux: bool = False) -> ModelOutput:
        """The input of :func:`raysrec.models.inputs.model_input` -> :class:`ModelOutput`; the auxiliary loss
        only when ``aux`` and the model has one. One ``forward`` for training and inference, so DDP sees every
        parameter used in a single call."""
        raise NotImplementedError


@dataclasses.dataclass
class ModelOutput:
    hidden: torch.Tensor                          # (B, L, d) one vector per position; [:, -1] is the user's
    aux: Optional[torch.Tensor] = None            # scalar auxiliary loss, or None
    id_keep: Optional[torch.Tensor] = None        # (N+1, 1) ID-dropout mask of this training step, or None

    @property
    def user(self) -> torch.Tensor:
        """(B, d): the newest position's hidden state, what ranks the next item."""
        return self.hidden[:, -1]


class SASRec(SequentialRecommender):
    """Self-attentive sequential recommendation (Kang & McAuley, ICDM 2018)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.encoder = Encoder(cfg.hidden_dim, cfg.num_heads, cfg.num_layers, cfg.dropout, cfg.norm_first,
                               cfg.ffn_mult, cfg.activation)
        self._init_weights()

    def forward(self, batch: dict[str, torch.Tensor], aux: bool = False) -> ModelOutput:
        input_ids = batch["input_ids"]
        id_keep = self.id_dropout_mask()
        hidden = self.encoder(self.embed(batch, id_keep), causal_mask(input_ids != 0))      # (B, L, d)
        return ModelOutput(hidden, None, id_keep)


class LongShortInterest(SequentialRecommender):
    """Long- and short-term interests with an adaptive, recency-aware fusion (after CLSR, WWW 2022).

    * long-term encoder: causal self-attention over the whole history window (``max_length``);
    * short-term encoder: the same blocks restricted to the last ``short_window`` items by a
      windowed causal mask, so every position is computed in one pass;
    * fusion gate: ``g = sigmoid(MLP([h_long, h_short, e_gap]))`` where ``e_gap`` embeds the log
      time between the last seen event and the moment of recommendation; ``h = g*h_short +
      (1-g)*h_long``. A long pause makes the session stale and the gate can lean on the long term;
    * optional auxiliary loss (CLSR's interest disentanglement): each interest should be closer
      to its own proxy (mean of the whole history / of the recent window) than to the other's.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.long = Encoder(cfg.hidden_dim, cfg.num_heads, cfg.num_layers, cfg.dropout, cfg.norm_first,
                            cfg.ffn_mult, cfg.activation)
        self.short = Encoder(cfg.hidden_dim, cfg.num_heads, cfg.short_layers, cfg.dropout, cfg.norm_first,
                             cfg.ffn_mult, cfg.activation)
        self.gap_emb = nn.Embedding(cfg.time_buckets + 1, cfg.hidden_dim)   # row 0: gap unknown
        self.gate = nn.Sequential(nn.Linear(3 * cfg.hidden_dim, cfg.hidden_dim), nn.GELU(),
                                  nn.Linear(cfg.hidden_dim, cfg.hidden_dim))
        self._init_weights()

    def gap_buckets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, L) bucket of log2(seconds from each input event to its target's time); 0 = unknown.

        Unknown: no timestamps in the request or the data, padding, or (training only) a row hidden by
        ``gap_dropout``, which is what trains row 0 for requests that come without timestamps.
        """
        if not self.cfg.use_time_gap or "target_times" not in batch:
            return torch.zeros_like(batch["input_ids"])
        gap = (batch["target_times"] - batch["input_times"]).clamp(min=0)
        bucket = torch.log2(gap.float() + 1.0).floor().long() + 1
        known = (batch["input_ids"] != 0) & (batch["target_times"] > 0)
        if self.training and self.cfg.gap_dropout > 0:
            rows = torch.rand(known.shape[0], 1, device=known.device) >= self.cfg.gap_dropout   # (B, 1)
            known = known & rows
        return torch.where(known, bucket.clamp(max=self.cfg.time_buckets), torch.zeros_like(bucket))

    def forward(self, batch: dict[str, torch.Tensor], aux: bool = False) -> ModelOutput:
        input_ids = batch["input_ids"]
        padding = input_ids != 0
        id_keep = self.id_dropout_mask()
        x = self.embed(batch, id_keep)
        h_long = self.long(x, causal_mask(padding))                             # (B, L, d)
        h_short = self.short(x, causal_mask(padding, window=self.cfg.short_window))
        e_gap = self.gap_emb(self.gap_buckets(batch))
        g = torch.sigmoid(self.gate(torch.cat([h_long, h_short, e_gap], dim=-1)))
        hidden = g * h_short + (1.0 - g) * h_long
        aux_loss = self._disentangle_loss(input_ids, h_long, h_short, id_keep) if aux else None
        return ModelOutput(hidden, aux_loss, id_keep)

    def _disentangle_loss(self, input_ids: torch.Tensor, h_long: torch.Tensor, h_short: torch.Tensor,
                          id_keep: Optional[torch.Tensor]) -> torch.Tensor:
        padding = (input_ids != 0).float().unsqueeze(-1)
        e = self.item_rows(input_ids, id_keep, side="input") * padding                    # (B, L, d)
        csum = e.cumsum(1)
        count = padding.cumsum(1).clamp(min=1)
        p_long = csum / count
        w = self.cfg.short_window
        shifted = F.pad(csum, (0, 0, w, 0))[:, :-w]
        p_short = (csum - shifted) / (count - F.pad(count, (0, 0, w, 0))[:, :-w]).clamp(min=1)
        n = F.normalize
        sim = lambda a, b: (n(a, dim=-1) * n(b, dim=-1)).sum(-1)  # noqa: E731
        loss = F.softplus(sim(h_long, p_short) - sim(h_long, p_long)) + \
            F.softplus(sim(h_short, p_long) - sim(h_short, p_short))
        mask = padding.squeeze(-1)
        return (loss * mask).sum() / mask.sum().clamp(min=1)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked for; a no-op elsewhere (CPU runs and evaluates in fp32; a CPU training
    step's matmuls are :func:`cpu_training_matmuls`)."""
    if device.type == "cuda" and bf16:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def cpu_training_matmuls(device: torch.device, bf16: bool):
    """A bf16 run's training steps on CPU: fp32 matmuls go to oneDNN, allowed to multiply in bf16 and accumulate
    in fp32 (PyTorch's ``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``, oneDNN's fpmath mode), instead
    of MKL's fp32 GEMM. Inputs, outputs and the optimizer stay fp32. PyTorch takes this route only on a CPU with
    bf16 instructions (elsewhere it changes nothing); what oneDNN then computes depends on the CPU: with AMX
    (Intel Xeon 4th generation on) it multiplies in bf16, the CPU's counterpart of the CUDA bf16 recipe; on the
    2-core AMD EPYC the benchmarks ran on (AVX512-BF16, no AMX) it chose its fp32 AVX-512 kernel, equal to fp32
    within 5e-6 and 3x MKL's speed on the full-CE logits (docs/benchmarks.md, "The full-CE step on CPU").
    Restored on exit, so evaluation, serving and other code in the process keep their precision; a no-op on CUDA
    (autocast) and when ``bf16`` is off."""
    if device.type != "cpu" or not bf16:
        yield
        return
    setting = torch.backends.mkldnn.matmul
    before = setting.fp32_precision
    setting.fp32_precision = "bf16"
    try:
        yield
    finally:
        setting.fp32_precision = before


MODELS = {"sasrec": SASRec, "longshort": LongShortInterest}


def build_model(cfg: ModelConfig) -> SequentialRecommender:
    return MODELS[cfg.name](cfg)

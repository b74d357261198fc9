"""The training optimizer: AdamW, with lazy (sparse) Adam for the item table when its gradient is sparse.

With a sampled loss (``sampled``, ``gbce``, ``bce``) a step touches a few thousand rows of the item table;
the dense update of every row (gradient, both moments, the weights) is most of the step at a million
items: 232 ms of backward and 252 ms of optimizer out of 520 ms on this project's 2-core machine, against
60 ms in all with sparse rows (``bench/scale.py``). Under DDP a sparse gradient is also what is all-reduced:
the rows touched, not the table.

:class:`AdamWSparseTable` steps dense-gradient parameters with :class:`torch.optim.AdamW` and the ones with
sparse gradients with :class:`torch.optim.SparseAdam` ("lazy Adam": moments of rows not in the batch are
left as they are; no weight decay on them). It is one optimizer with AdamW's ``state_dict`` layout (one
group, parameters in model order, ``step``/``exp_avg``/``exp_avg_sq``), so checkpoints, resume and the warm
start's carried moments read the same whichever kind of update a run used.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


class AdamWSparseTable(torch.optim.Optimizer):
    """AdamW for ``params``, except those in ``sparse``, which get SparseAdam (their gradients must be sparse)."""

    def __init__(self, params: Iterable[nn.Parameter], sparse: Iterable[nn.Parameter] = (), *, lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0, eps: float = 1e-8) -> None:
        params = list(params)
        sparse_ids = {id(p) for p in sparse}
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay, "eps": eps})
        self._sparse = [p for p in params if id(p) in sparse_ids]
        self._dense_params = [p for p in params if id(p) not in sparse_ids]
        self._dense = torch.optim.AdamW(self._dense_params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps) \
            if self._dense_params else None
        self._lazy = torch.optim.SparseAdam(self._sparse, lr=lr, betas=betas, eps=eps) if self._sparse else None
        self._link()

    def _link(self) -> None:
        # One state for all: the parts update the entries this optimizer saves and loads.
        for part in (self._dense, self._lazy):
            if part is not None:
                part.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch's signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        for part in (self._dense, self._lazy):
            if part is None:
                continue
            for key in ("lr", "betas", "eps") + (("weight_decay",) if part is self._dense else ()):
                part.param_groups[0][key] = group[key]
        # AdamW keeps ``step`` as a tensor and SparseAdam as an int: a checkpoint of either kind resumes in the other.
        for p in self._dense_params:
            if "step" in self.state.get(p, {}) and not torch.is_tensor(self.state[p]["step"]):
                self.state[p]["step"] = torch.tensor(float(self.state[p]["step"]))
        for p in self._sparse:
            if "step" in self.state.get(p, {}) and torch.is_tensor(self.state[p]["step"]):
                self.state[p]["step"] = int(self.state[p]["step"].item())
        if self._dense is not None:
            self._dense.step()
        if self._lazy is not None:
            self._lazy.step()
        return loss


def sparse_item_grads(choice: str, loss: str, weight_decay: float, use_gpu: bool) -> bool:
    """Whether the item table gets sparse gradients. ``auto``: yes for the sampled losses on CPU workers
    (the full softmax touches every row; NCCL, the GPU backend, has no sparse all-reduce)."""
    if choice != "auto":
        return choice == "sparse"
    return loss != "ce" and weight_decay == 0.0 and not use_gpu


def build_optimizer(model: nn.Module, table: nn.Embedding, lr: float, weight_decay: float,
                    sparse: bool) -> AdamWSparseTable:
    """The loop's optimizer for ``model`` (parameters in model order); ``sparse`` switches ``table`` to sparse
    gradients and lazy Adam. Call before wrapping the model in DDP, which reads ``table.sparse`` when it
    builds its buckets."""
    table.sparse = sparse
    return AdamWSparseTable(model.parameters(), [table.weight] if sparse else [], lr=lr, betas=(0.9, 0.98),
                            weight_decay=weight_decay)

"""The training optimizer: AdamW with lazy Adam for a sparse item table, against torch's own optimizers."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from raysrec.errors import ConfigError
from raysrec.train.config import TrainConfig
from raysrec.train.optim import AdamWSparseTable, build_optimizer, sparse_item_grads


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.item_emb = nn.Embedding(50, 4, padding_idx=0)
        self.proj = nn.Linear(4, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.item_emb(ids[:, :-1]).mean(1))
        return -(h * self.item_emb(ids[:, -1])).sum()            # both sides of the table, as the losses do


def _steps(model: Tiny, step_fn, n: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(1, 50, (6, 4), generator=gen)
        model.zero_grad(set_to_none=True)
        model(ids).backward()
        step_fn()


def test_dense_parameters_follow_adamw_and_the_sparse_table_follows_sparse_adam():
    ours, ref = Tiny(), Tiny()
    opt = build_optimizer(ours, ours.item_emb, lr=1e-2, weight_decay=0.0, sparse=True)
    ref.item_emb.sparse = True
    dense = torch.optim.AdamW([ref.proj.weight, ref.proj.bias], lr=1e-2, betas=(0.9, 0.98), weight_decay=0.0)
    lazy = torch.optim.SparseAdam([ref.item_emb.weight], lr=1e-2, betas=(0.9, 0.98))
    _steps(ours, opt.step, 6)
    _steps(ref, lambda: (dense.step(), lazy.step()), 6)
    assert ours.item_emb.weight.grad.is_sparse
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), name
    # lazy: rows no batch touched keep their initial values, moments stay zero
    untouched = (opt.state[ours.item_emb.weight]["exp_avg"].abs().sum(1) == 0)
    assert untouched.any() and torch.equal(ours.item_emb.weight[untouched], Tiny().item_emb.weight[untouched])


def test_dense_mode_is_plain_adamw():
    ours, ref = Tiny(), Tiny()
    opt = build_optimizer(ours, ours.item_emb, lr=1e-2, weight_decay=0.01, sparse=False)
    adamw = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.98), weight_decay=0.01)
    _steps(ours, opt.step, 4)
    _steps(ref, adamw.step, 4)
    assert not ours.item_emb.sparse
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    # the saved state is AdamW's, key for key: a dense run's optimizer.pt loads into torch's AdamW
    fresh = torch.optim.AdamW(Tiny().parameters(), lr=1e-2)
    fresh.load_state_dict(opt.state_dict())
    assert set(fresh.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("first,then", [(True, True), (False, True), (True, False)])
def test_a_saved_state_resumes_exactly_and_across_update_kinds(first, then):
    straight = Tiny()
    opt = build_optimizer(straight, straight.item_emb, lr=1e-2, weight_decay=0.0, sparse=first)
    _steps(straight, opt.step, 3)
    saved_model, buffer = copy.deepcopy(straight.state_dict()), io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    _steps(straight, opt.step, 3, seed=2)

    resumed = Tiny()
    resumed.load_state_dict(saved_model)
    opt2 = build_optimizer(resumed, resumed.item_emb, lr=1e-2, weight_decay=0.0, sparse=then)
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer))
    _steps(resumed, opt2.step, 3, seed=2)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        if first == then:
            assert torch.equal(a, b)
        else:               # another update rule from the same moments: close, not equal
            assert torch.allclose(a, b, atol=0.05)


def test_auto_picks_sparse_rows_only_where_they_apply():
    assert sparse_item_grads("auto", "sampled", 0.0, use_gpu=False)
    assert sparse_item_grads("auto", "gbce", 0.0, use_gpu=False)
    assert not sparse_item_grads("auto", "ce", 0.0, use_gpu=False)           # every row has a gradient
    assert not sparse_item_grads("auto", "sampled", 0.01, use_gpu=False)     # lazy Adam has no weight decay
    assert not sparse_item_grads("auto", "sampled", 0.0, use_gpu=True)       # NCCL: no sparse all-reduce
    assert sparse_item_grads("sparse", "sampled", 0.0, use_gpu=True)
    for bad in (dict(loss="ce"), dict(loss="sampled", weight_decay=0.1),
                dict(loss="sampled", use_gpu=True, num_workers=2)):
        with pytest.raises(ConfigError, match="item_grads sparse"):
            TrainConfig(item_grads="sparse", **bad).validate()


def test_the_optimizer_is_one_group_in_model_order():
    model = Tiny()
    opt = AdamWSparseTable(model.parameters(), [model.item_emb.weight], lr=1e-3)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == list(model.parameters())


"""Full cross-entropy: the chunked computation equals the plain one (values and gradients), and both equal
PyTorch's cross-entropy over the allowed items, label smoothing included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raysrec.models.losses import full_softmax_ce, softmax_ce
from raysrec.models.sequential import ModelConfig, build_model

P, N, D = 37, 50, 8


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(P, D, generator=g, requires_grad=True)
    table = torch.randn(N + 1, D, generator=g, requires_grad=True)
    allowed = torch.ones(N + 1, dtype=torch.bool)
    allowed[0] = False
    allowed[torch.randperm(N, generator=g)[:9] + 1] = False          # a cold-start style exclusion
    candidates = torch.nonzero(allowed).squeeze(1)
    targets = candidates[torch.randint(len(candidates), (P,), generator=g)]
    return hidden, table, targets, allowed


def _reference(hidden, table, targets, allowed, eps):
    """F.cross_entropy on the allowed columns only (what the loss means)."""
    columns = torch.nonzero(allowed).squeeze(1)
    remap = torch.full((N + 1,), -1, dtype=torch.long)
    remap[columns] = torch.arange(len(columns))
    return F.cross_entropy(hidden @ table[columns].T, remap[targets], label_smoothing=eps)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [0, 1, 7, 16, N + 1])
def test_chunked_equals_plain_and_the_reference(chunk, eps):
    results = {}
    for name, fn in (("reference", lambda h, t, y, a: _reference(h, t, y, a, eps)),
                     ("raysrec", lambda h, t, y, a: softmax_ce(h, t, y, a, eps, chunk_items=chunk))):
        hidden, table, targets, allowed = _inputs()
        loss = fn(hidden, table, targets, allowed)
        loss.backward()
        results[name] = (loss.detach(), hidden.grad.clone(), table.grad.clone())
    for got, want in zip(results["raysrec"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert results["raysrec"][2][0].abs().sum() == 0          # padding never gets a gradient


def test_the_model_level_loss_is_finite_with_label_smoothing_and_chunks():
    """Label smoothing used to spread mass onto the -inf padding column: the loss was inf."""
    model = build_model(ModelConfig(num_items=N, hidden_dim=D, num_heads=1, num_layers=1, max_length=5))
    hidden, _, targets, _ = _inputs()
    plain = full_softmax_ce(model, hidden, targets, label_smoothing=0.1)
    chunked = full_softmax_ce(model, hidden, targets, label_smoothing=0.1, chunk_items=7)
    assert torch.isfinite(plain) and torch.allclose(plain, chunked, rtol=1e-5)

"""Full cross-entropy: the chunked computation equals the plain one (values and gradients), and both equal
PyTorch's cross-entropy over the allowed items, label smoothing included."""

from __future__ import annotations

import math

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


def _model():
    torch.manual_seed(0)
    return build_model(ModelConfig(num_items=N, hidden_dim=D, num_heads=1, num_layers=1, max_length=5))


def test_gbce_by_hand():
    from raysrec.models.losses import gbce, gbce_beta

    model = _model()
    hidden = torch.randn(6, D)
    targets = torch.tensor([1, 2, 3, 4, 5, 7])
    negatives = torch.tensor([7, 9, 11])                     # 7 is row 5's own target: an accidental hit
    hit = negatives.unsqueeze(0) == targets.unsqueeze(-1)

    def by_hand(beta):
        shift = math.log(beta / 3)                           # where the loss is least at equal scores
        pos = (hidden * model.item_rows(targets)).sum(-1) + shift
        neg = hidden @ model.item_rows(negatives).T + shift
        return (-beta * F.logsigmoid(pos) - F.logsigmoid(-neg).masked_fill(hit, 0.0).sum(-1)).mean()

    torch.testing.assert_close(gbce(model, hidden, targets, negatives, t=0.0), by_hand(1.0))  # t = 0: plain BCE
    alpha = 3 / (N - 1)
    assert gbce_beta(3, N, 1.0) == pytest.approx(alpha) and gbce_beta(3, N, 0.0) == pytest.approx(1.0)
    torch.testing.assert_close(gbce(model, hidden, targets, negatives, t=0.75), by_hand(gbce_beta(3, N, 0.75)))


def test_gbce_shift_is_where_the_loss_is_least_at_equal_scores():
    """A fresh model scores every item near 0; the shift makes that the loss's resting point, so the first
    steps do not spend themselves pushing every score down together."""
    from raysrec.models.losses import gbce_shift

    beta, k = 0.36, 256
    s = torch.linspace(-12, 0, 12001)
    loss = -beta * F.logsigmoid(s) - k * F.logsigmoid(-s)
    assert float(s[loss.argmin()]) == pytest.approx(gbce_shift(beta, k), abs=0.01)


def test_gbce_with_per_position_picks_from_the_pool_equals_a_loop_over_positions():
    from raysrec.models.losses import gbce, gbce_beta

    model = _model()
    hidden = torch.randn(3, D)
    targets = torch.tensor([2, 9, 4])
    pool = torch.tensor([9, 5, 6, 2])
    pick = torch.tensor([[0, 1], [0, 2], [3, 3]])            # row 1 picks its own target (9): masked
    beta = gbce_beta(2, N, 0.75)
    shift = math.log(beta / 2)
    want = []
    for r in range(3):
        h = hidden[r]
        term = -beta * F.logsigmoid(h @ model.item_rows(targets[r]) + shift)
        for j in pick[r]:
            if pool[j] != targets[r]:
                term = term - F.logsigmoid(-(h @ model.item_rows(pool[j]) + shift))
        want.append(term)
    torch.testing.assert_close(gbce(model, hidden, targets, pool, t=0.75, pick=pick), torch.stack(want).mean())


def test_in_batch_negatives_join_the_sampled_ones_with_accidental_hits_masked():
    from raysrec.models.losses import sampled_softmax

    model = _model()
    hidden = torch.randn(4, D)
    targets = torch.tensor([3, 3, 8, 20])                   # rows 0 and 1 share a target
    negatives = torch.tensor([5, 8])
    log_q = torch.log(torch.linspace(1, 2, N + 1) / torch.linspace(1, 2, N + 1).sum())
    got = sampled_softmax(model, hidden, targets, negatives, log_q, in_batch=True)
    rows = []
    for r in range(4):
        pool = [5, 8, 3, 8, 20]                             # sampled negatives, then the batch's distinct targets
        scores = [float(hidden[r] @ model.item_rows(torch.tensor(targets[r])) - log_q[targets[r]])]
        scores += [float(hidden[r] @ model.item_rows(torch.tensor(i)) - log_q[i]) if i != int(targets[r])
                   else float("-inf") for i in pool]
        rows.append(torch.tensor(scores))
    want = F.cross_entropy(torch.stack(rows), torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got < sampled_softmax(model, hidden, targets, negatives, log_q, in_batch=False) + 10   # finite


@pytest.mark.parametrize("options", [{"loss": "gbce", "num_negatives": 16},
                                     {"loss": "sampled", "num_negatives": 16, "in_batch_negatives": True}])
def test_training_runs_with_the_new_losses(options, synth_prepared, tmp_path):
    from raysrec.train.config import TrainConfig
    from raysrec.train.loop import LocalSession, train_loop

    session = LocalSession(tmp_path / "best")
    session.verbose = False
    cfg = TrainConfig(data=str(synth_prepared), epochs=2, patience=2,
                      model=ModelConfig(hidden_dim=16, num_heads=1, num_layers=1, max_length=20), **options)
    train_loop(cfg, session)
    losses_seen = [m["train_loss"] for m in session.history]
    assert all(torch.isfinite(torch.tensor(losses_seen))) and losses_seen[1] < losses_seen[0]
    assert session.history[-1]["valid_hr@10"] > 0.1          # random is 10/200


def test_the_fused_ce_kernel_is_refused_off_gpu_in_one_line():
    """cce (the gpu extra) runs on CUDA only; asking for it elsewhere is a user error, not a crash."""
    from raysrec.errors import ConfigError
    from raysrec.models import losses
    from raysrec.train.config import TrainConfig

    assert losses.ce_kernel("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ConfigError, match="CUDA"):
        losses.ce_kernel("cce", torch.device("cpu"))
    with pytest.raises(ConfigError, match="ce_kernel cce needs use_gpu"):
        TrainConfig(ce_kernel="cce").validate()


def test_a_trimmed_batch_scores_more_items_at_a_time_in_the_full_batchs_memory():
    from raysrec.models.losses import chunk_items_for

    assert chunk_items_for(6400, 8192, 6400) == 8192                  # a full batch: the configured chunk
    assert chunk_items_for(640, 8192, 6400) == 81920                  # a tenth of the positions: 10x the items
    for positions in (1, 37, 617, 6399):
        assert positions * chunk_items_for(positions, 8192, 6400) <= 6400 * 8192
    assert chunk_items_for(617, 0, 6400) == 0                         # 0 stays "the whole catalogue at once"
    assert chunk_items_for(617, 8192, 0) == 8192                      # no bound given: the chunk as configured


def test_the_model_level_loss_is_the_same_whether_a_trimmed_batch_keeps_its_softmax_or_chunks():
    """``max_positions`` lets a batch of 37 positions score the whole 51-row table at once (and keep its softmax
    for backward) where a full batch would chunk it by 7: same loss and gradients."""
    model = build_model(ModelConfig(num_items=N, hidden_dim=D, num_heads=1, num_layers=1, max_length=5))
    results = []
    for max_positions in (0, 10 * P):
        hidden, _, targets, _ = _inputs()
        model.zero_grad()
        loss = full_softmax_ce(model, hidden, targets, chunk_items=7, max_positions=max_positions)
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), model.item_emb.weight.grad.clone()))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_second_backward_through_a_kept_softmax_is_refused():
    """The kept softmax is turned into the gradient in place: a second backward (retain_graph) would read the
    gradient as a softmax, so it is refused rather than wrong."""
    hidden, table, targets, allowed = _inputs()
    loss = softmax_ce(hidden, table, targets, allowed, chunk_items=0)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("chunk", [0, 16])
def test_steps_that_overlap_never_share_the_reused_buffer(chunk):
    """Each step writes its logits into the buffer the previous step gave back. Forward A, forward B, B's backward,
    forward C (which takes B's buffer), then A's backward: A's kept softmax must still be A's, so every gradient
    equals the reference, as with gradient accumulation over micro-batches."""
    steps = [_inputs(seed) for seed in (1, 2, 3)]
    want = []
    for hidden, table, targets, allowed in steps:
        loss = _reference(hidden, table, targets, allowed, 0.0)
        want.append((loss.detach(),) + torch.autograd.grad(loss, (hidden, table)))

    def backward(loss, step):
        return (loss.detach(),) + torch.autograd.grad(loss, step[:2])

    a = softmax_ce(*steps[0], chunk_items=chunk)
    b = softmax_ce(*steps[1], chunk_items=chunk)
    got_b = backward(b, steps[1])
    c = softmax_ce(*steps[2], chunk_items=chunk)
    got = [backward(a, steps[0]), got_b, backward(c, steps[2])]
    for step_got, step_want in zip(got, want):
        for g, w in zip(step_got, step_want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_the_next_step_writes_into_the_memory_the_last_one_gave_back():
    from raysrec.models.losses import _SpareBuffer

    spare, like = _SpareBuffer(), torch.zeros(1)
    first = spare.borrow(1000, like)
    assert spare.borrow(1000, like).data_ptr() != first.data_ptr()      # lent and not back: a fresh one
    spare.give_back(first[:500].view(20, 25))                           # a view of it comes back: the whole of it
    again = spare.borrow(800, like)
    assert again.data_ptr() == first.data_ptr() and again.numel() >= 800
    spare.give_back(again)
    assert spare.borrow(2000, like).data_ptr() != first.data_ptr()      # too small for this step: a new one
    spare.give_back(torch.zeros(10))
    spare.give_back(first)                                              # two back: the larger is kept
    assert spare.borrow(10, like).data_ptr() == first.data_ptr()
    assert spare.borrow(10, like.double()).dtype == torch.float64

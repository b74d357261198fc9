"""The full-CE dispatch and precision: ``train.ce_kernel cce`` reaches the fused kernel (and ``torch`` never
does), and the torch path computes the loss and its gradients in fp32 under bf16 autocast, forward and
backward alike."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from raysrec.models import losses
from raysrec.models.sequential import ModelConfig, build_model
from raysrec.train.config import TrainConfig
from raysrec.train.loop import compute_loss


@pytest.fixture
def fake_cce(monkeypatch):
    """Cut Cross-Entropy's entry point, substituted (a third-party CUDA kernel): records its calls and
    computes plain CE, so the dispatch is checked on a CPU."""
    calls = []

    def linear_cross_entropy(e, c, targets, reduction="mean", filter_eps="default"):
        calls.append({"e_dtype": e.dtype, "c_rows": c.shape[0], "targets": targets.clone(),
                      "filter_eps": filter_eps, "reduction": reduction})
        return F.cross_entropy(e.float() @ c.float().T, targets)

    module = types.ModuleType("cut_cross_entropy")
    module.linear_cross_entropy = linear_cross_entropy
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", module)
    return calls


def _model(num_items=30, dim=8):
    torch.manual_seed(0)
    return build_model(ModelConfig(num_items=num_items, hidden_dim=dim, num_heads=1, num_layers=1, max_length=5))


def test_cce_kernel_is_called_by_the_loss_and_torch_is_not(fake_cce):
    model = _model()
    hidden, targets = torch.randn(6, 8), torch.tensor([1, 2, 3, 30, 5, 7])
    torch_loss = losses.full_softmax_ce(model, hidden, targets, kernel="torch")
    assert fake_cce == []                                            # torch never touches the kernel
    fused = losses.full_softmax_ce(model, hidden, targets, kernel="cce")
    (call,) = fake_cce
    assert call["e_dtype"] == torch.bfloat16 and call["c_rows"] == 30  # items 1..N, padding left out
    assert torch.equal(call["targets"], targets - 1) and call["filter_eps"] is None
    torch.testing.assert_close(fused, torch_loss, rtol=2e-2, atol=2e-2)   # the same loss, at bf16 precision


def test_the_training_step_reaches_the_kernel(fake_cce):
    """The training loop's loss (what `train.ce_kernel: cce` configures) calls the kernel once per step."""
    model = _model()
    batch = {"input_ids": torch.tensor([[0, 1, 2, 3, 4]]), "target_ids": torch.tensor([[0, 2, 3, 4, 5]])}
    batch["padding_mask"] = batch["input_ids"] != 0
    cfg = TrainConfig(loss="ce")
    compute_loss(model, batch, cfg, None, None, None, "torch")
    assert fake_cce == []
    loss = compute_loss(model, batch, cfg, None, None, None, "cce")
    assert len(fake_cce) == 1 and torch.equal(fake_cce[0]["targets"], torch.tensor([2, 3, 4, 5]) - 1)
    loss.backward()
    assert model.item_emb.weight.grad is not None


@pytest.mark.parametrize("chunk", [0, 8192])
def test_bf16_autocast_full_ce_is_fp32_in_value_and_gradient(chunk):
    """Under bf16 autocast (CPU's here; CUDA's is the default GPU recipe) the loss and both gradients equal an
    fp64 reference to fp32 precision. Before, the matmuls ran in bf16 and the chunked backward normalised fp32
    logits by a bf16 log-sum-exp: softmax rows summed to 0.97-1.04 and d(hidden) was ~0.5 % off."""
    g = torch.Generator().manual_seed(3)
    positions, items, dim = 128, 20_000, 64
    hidden0 = torch.randn(positions, dim, generator=g)
    table0 = torch.randn(items + 1, dim, generator=g) * 0.3
    targets = torch.randint(1, items + 1, (positions,), generator=g)
    allowed = torch.ones(items + 1, dtype=torch.bool)
    allowed[0] = False

    def run(loss_fn, dtype, autocast):
        hidden = hidden0.to(dtype).clone().requires_grad_()
        table = table0.to(dtype).clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(hidden, table)
        loss.backward()                      # outside autocast, as the training loop and PyTorch's docs do it
        return loss.detach().double(), hidden.grad.double(), table.grad.double()

    def fp64_reference(hidden, table):                  # plain PyTorch in float64 over items 1..N
        return F.cross_entropy(hidden @ table[1:].T, targets - 1)

    ref_loss, ref_dh, ref_dt = run(fp64_reference, torch.float64, False)
    loss, dh, dt = run(lambda h, t: losses.softmax_ce(h, t, targets, allowed, chunk_items=chunk), torch.float32, True)
    assert abs(float(loss - ref_loss)) <= 1e-5 * abs(float(ref_loss))
    assert float((dh - ref_dh).abs().max()) <= 1e-4 * float(ref_dh.abs().max())
    assert float((dt - ref_dt).abs().max()) <= 1e-4 * float(ref_dt.abs().max())


def test_a_bf16_cpu_training_step_runs_its_matmuls_in_onednn_and_fp32_otherwise(onednn_matmuls):
    """``train.bf16`` on CPU: the step's matmuls (model and full-CE loss, forward and backward) go to oneDNN with
    bf16 allowed; with ``bf16`` off, or once the step is over, they stay in MKL's fp32 GEMM (no oneDNN matmul)."""
    from raysrec.models.sequential import cpu_training_matmuls

    cpu = torch.device("cpu")
    ids = torch.randint(1, 2001, (8, 21), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids[:, :-1], "target_ids": ids[:, 1:]}
    batch["padding_mask"] = batch["input_ids"] != 0
    cfg = TrainConfig(loss="ce")
    results = {}
    for bf16 in (False, True):
        torch.manual_seed(0)      # PyTorch sends matmuls this small (d = 8) to MKL whatever the setting
        model = build_model(ModelConfig(num_items=2000, hidden_dim=64, num_heads=1, num_layers=1, max_length=20))

        def step(model=model, bf16=bf16):
            with cpu_training_matmuls(cpu, bf16):
                loss = compute_loss(model, batch, cfg, None, None)
                loss.backward()
            results[bf16] = (loss.detach(), model.item_emb.weight.grad.clone())

        lines = onednn_matmuls(step)
        if bf16:
            assert len(lines) >= 6 and all("attr-fpmath:bf16" in line for line in lines)
            shapes = [line.split(",")[-2] for line in lines]
            assert "160x64:64x2001" in shapes                        # the loss's logits: positions x items
        else:
            assert lines == []
    assert torch.backends.mkldnn.matmul.fp32_precision == "none"     # restored on exit
    assert onednn_matmuls(lambda: model(batch).hidden.sum().backward()) == []
    # bf16 products at most (CPUs with AMX); fp32 ones on others
    for got, want in zip(results[True], results[False]):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


def test_cpu_training_matmuls_change_nothing_on_cuda_or_without_bf16_and_restore_after_an_error():
    from raysrec.models.sequential import cpu_training_matmuls

    setting = torch.backends.mkldnn.matmul
    for device, bf16 in ((torch.device("cuda"), True), (torch.device("cpu"), False)):
        with cpu_training_matmuls(device, bf16):
            assert setting.fp32_precision == "none"
    with pytest.raises(ValueError):
        with cpu_training_matmuls(torch.device("cpu"), True):
            assert setting.fp32_precision == "bf16"
            raise ValueError("a failing step")
    assert setting.fp32_precision == "none"

"""The CUDA path, run on a real GPU: losses, evaluation, training (1 and 2 workers on one GPU, bf16, resume),
serving and top-k. Skipped where there is no GPU (CI); `make test-gpu` runs them on a GPU machine."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
import torch

from raysrec.data.examples import evaluation_examples
from raysrec.data.storage import SequenceSet
from raysrec.evaluation import evaluate
from raysrec.models import losses
from raysrec.models.sequential import ModelConfig, build_model
from raysrec.serving.recommender import Query, Recommender
from raysrec.train.config import TrainConfig
from raysrec.train.loop import LocalSession, train_loop
from raysrec.train.run import fit

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU tests need one")]

SMALL = ModelConfig(hidden_dim=32, num_heads=2, num_layers=1, max_length=20)
CUDA = torch.device("cuda")


def _ce_case(items: int, positions: int = 512, dim: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    table = (torch.randn(items + 1, dim, generator=g) * 0.3).to(CUDA).requires_grad_()
    hidden = torch.randn(positions, dim, generator=g).to(CUDA).requires_grad_()
    targets = torch.randint(1, items + 1, (positions,), generator=g).to(CUDA)
    allowed = torch.ones(items + 1, dtype=torch.bool, device=CUDA)
    allowed[0] = False
    return hidden, table, targets, allowed


def _value_and_grads(fn, hidden, table):
    hidden.grad = table.grad = None
    loss = fn()
    loss.backward()
    return loss.detach().float(), hidden.grad.clone(), table.grad.clone()


def _reference(hidden, table, targets, allowed):
    """Plain full CE in fp64: the one every implementation is held to."""
    logits = (hidden.double() @ table.double().T).masked_fill(~allowed, float("-inf"))
    return torch.nn.functional.cross_entropy(logits, targets)


@pytest.mark.skipif(not losses.cce_installed(), reason="cut-cross-entropy (the gpu extra) is not installed")
def test_the_fused_kernel_equals_plain_ce_in_value_and_gradient():
    hidden, table, targets, allowed = _ce_case(20_000)
    ref = _value_and_grads(lambda: _reference(hidden, table, targets, allowed), hidden, table)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = _value_and_grads(lambda: losses.cce_softmax_ce(hidden, table, targets), hidden, table)
    # bf16 inputs: measured on an H100, loss within 1.3e-4 (of ~10), d(table) within 0.5 % of its largest entry
    # (as the torch bf16 path), d(hidden) within 6.8 % (the torch bf16 path: 0.5 %); bounds with some margin
    assert float(got[0]) == pytest.approx(float(ref[0]), rel=1e-3)
    dh, dt = (got[1].double() - ref[1]).abs().max().item(), (got[2].double() - ref[2]).abs().max().item()
    assert dt < 1e-2 * ref[2].abs().max().item()
    assert dh < 0.1 * ref[1].abs().max().item()
    assert float(got[2][0].abs().max()) == 0          # the padding row takes no part



def test_chunked_ce_on_cuda_equals_plain_ce():
    hidden, table, targets, allowed = _ce_case(30_000)
    plain = _value_and_grads(lambda: losses.softmax_ce(hidden, table, targets, allowed), hidden, table)
    chunked = _value_and_grads(lambda: losses.softmax_ce(hidden, table, targets, allowed, chunk_items=4096),
                               hidden, table)
    for a, b in zip(chunked, plain):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_the_fused_kernel_is_checked_before_it_runs():
    assert losses.ce_kernel("torch", CUDA) == "torch"
    for kwargs, why in (({"bf16": False}, "bf16"), ({"label_smoothing": 0.1}, "label smoothing"),
                        ({"excluded": True}, "excluded")):
        with pytest.raises(Exception, match=why):
            losses.ce_kernel("cce", CUDA, **kwargs)


def _histories(num_items: int, users: int = 200, seed: int = 0) -> SequenceSet:
    rng = np.random.default_rng(seed)
    seqs = [list(rng.integers(1, num_items + 1, size=n)) for n in rng.integers(3, 30, size=users)]
    times = [list(np.cumsum(rng.exponential(3600 * 24, size=len(s))) + 1e9) for s in seqs]
    return SequenceSet.from_lists(seqs, times)


@pytest.mark.parametrize("name", ["sasrec", "longshort"])
def test_evaluation_on_the_gpu_equals_cpu_evaluation(name):
    torch.manual_seed(0)
    model = build_model(SMALL.replace(name=name, num_items=500)).eval()
    examples = evaluation_examples(_histories(500), SMALL.max_length, "test")
    kw = dict(ks=[10, 20], batch_size=64, chunk_items=128)
    cpu = evaluate(model, examples, device=torch.device("cpu"), **kw)
    gpu = evaluate(model.to(CUDA), examples, device=CUDA, **kw)
    np.testing.assert_allclose(gpu, cpu, rtol=1e-3)
    bf16 = evaluate(model, examples, device=CUDA, bf16=True, **kw)
    assert bf16[0] == cpu[0]
    # bf16 rounds scores, so a few targets move by a rank or two: metric sums stay within 2 %
    np.testing.assert_allclose(bf16[1:], cpu[1:], rtol=0.02, atol=0.02 * cpu[0])


def test_served_top_k_on_cuda_equals_cpu(trained_model):
    cpu, gpu = Recommender.load(trained_model), Recommender.load(trained_model, device="cuda")
    assert gpu.item_vectors.is_cuda
    ids = [str(i) for i in cpu.item_ids[:40]]
    queries = [Query(history=ids[u:u + 8], k=10) for u in range(30)]
    for a, b in zip(cpu.run(queries), gpu.run(queries)):
        assert [i["item_id"] for i in a.items] == [i["item_id"] for i in b.items]
        assert [i["score"] for i in a.items] == pytest.approx([i["score"] for i in b.items], rel=1e-3, abs=1e-4)
    assert gpu.probe().fallback is None


def test_resumed_gpu_training_continues_like_the_uninterrupted_run(synth_prepared, tmp_path):
    base = TrainConfig(data=str(synth_prepared), model=SMALL, epochs=4, patience=10, use_gpu=True)
    runs = {}
    for name, epochs, resume in (("straight", 4, None), ("first", 2, None), ("resumed", 4, tmp_path / "first-last")):
        session = LocalSession(tmp_path / f"{name}-best", device="cuda", last_dir=tmp_path / f"{name}-last",
                               resume_from=resume)
        session.verbose = False
        train_loop(base.replace(epochs=epochs), session)
        runs[name] = session.history
    assert [m["epoch"] for m in runs["resumed"]] == [3, 4]
    # CUDA's embedding backward adds in a nondeterministic order: equal up to float rounding
    for key in ("train_loss", "valid_ndcg@10"):
        assert [m[key] for m in runs["resumed"]] == pytest.approx([m[key] for m in runs["straight"][2:]], rel=2e-3)


@pytest.mark.parametrize("name,workers,loss", [("sasrec", 1, "ce"), ("longshort", 1, "ce"),
                                                ("sasrec", 2, "ce"), ("sasrec", 2, "sampled")])
def test_ray_train_on_the_gpu_in_bf16(ray_gpu, synth_prepared, tmp_path, name, workers, loss):
    """One GPU, one worker or two sharing it (gpus_per_worker 0.5, NCCL); the final scoring takes a GPU too."""
    out = tmp_path / "out"
    cfg = TrainConfig(data=str(synth_prepared), output=str(out), model=SMALL.replace(name=name), epochs=3,
                      loss=loss, num_workers=workers, use_gpu=True, gpus_per_worker=1.0 / workers,
                      cpus_per_worker=1, bf16=True)
    fit(cfg)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["use_gpu"] is True and saved["num_workers"] == workers
    assert [w["device"].startswith("cuda") for w in saved["workers"]] == [True] * workers, saved["workers"]
    assert saved["test"]["hr@10"] > 0.1           # random is ~0.05 on 200 items


def test_serve_on_cuda_answers_like_the_cpu_recommender(ray_gpu, trained_model, tmp_path):
    from ray import serve

    from raysrec.serving.app import run
    from raysrec.serving.config import ServeConfig

    cfg = ServeConfig(model_dir=str(trained_model), port=8765, device="cuda", app_name="gpu-endpoint")
    run(cfg)
    try:
        url = "http://127.0.0.1:8765"
        cpu = Recommender.load(trained_model)
        history = [str(i) for i in cpu.item_ids[:8]]
        answer = requests.post(f"{url}/recommend", json={"history": history, "k": 10}, timeout=60).json()
        expected = cpu.run([Query(history=history, k=10)])[0]
        assert [i["item_id"] for i in answer["items"]] == [i["item_id"] for i in expected.items]
        assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
    finally:
        serve.delete(cfg.app_name)

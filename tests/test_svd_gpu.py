"""The CUDA path of the SVD engine and of adapter initialization: same results as on the CPU, and no tensor
ever leaves the GPU (``gpu`` marker; skipped without CUDA). benchmarks/gpu_check.py runs these too."""

from __future__ import annotations

import pytest
import torch

import fedspec
from fedspec.adapters import adapter_layers
from fedspec.svd import error_vs_exact, refactor_lowrank, refactor_lowrank_grouped, truncated_svd
from fedspec.svd.orthonormal import qr_tall

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("method", ["randomized", "subspace", "exact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("batch", [3, 20])  # 20: a large stack, whose QRs take CholeskyQR2 on a GPU
def test_truncated_svd_on_cuda_matches_cpu_and_stays_there(method, dtype, batch):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(batch, 96, 64, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 64, dtype=torch.float64)
    W = W.to(dtype)
    niter = 8 if method == "subspace" else 4  # subspace iteration converges more slowly (1.3e-3 at 4 here)
    U, S, Vh = truncated_svd(W.cuda(), 6, method=method, niter=niter, generator=torch.Generator().manual_seed(1))
    assert U.is_cuda and S.is_cuda and Vh.is_cuda
    assert U.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    Uc, Sc, Vhc = truncated_svd(W, 6, method=method, niter=niter, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(S.cpu(), Sc, rtol=1e-4, atol=1e-5)
    assert float(error_vs_exact(W.cuda(), U, S, Vh).max()) < 1e-3


@pytest.mark.parametrize("assume", [False, True])
def test_refactor_on_cuda_keeps_product_and_device(assume):
    g = torch.Generator().manual_seed(0)
    B = torch.randn(4, 300, 8, generator=g).cuda()
    A = torch.randn(4, 8, 200, generator=g).cuda()
    if assume:
        A = torch.linalg.qr(A.mT).Q.mT
    B_new, A_new = refactor_lowrank(B, A, assume_orthonormal_rows=assume)
    assert B_new.is_cuda and A_new.is_cuda
    torch.testing.assert_close(B_new @ A_new, B @ A, rtol=1e-4, atol=1e-4)
    eye = torch.eye(8, device="cuda").expand(4, 8, 8)
    torch.testing.assert_close(A_new @ A_new.mT, eye, rtol=0, atol=1e-5)
    grouped = refactor_lowrank_grouped({"a": (B[0], A[0]), "b": (B[1], A[1])}, assume_orthonormal_rows=assume)
    assert all(t.is_cuda for pair in grouped.values() for t in pair)
    for i, (b, a) in enumerate(grouped.values()):  # on CUDA the shortcut runs stacked, like the general path
        torch.testing.assert_close(b @ a, B[i] @ A[i], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a @ a.mT, eye[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch", [(), (4,), (32,)])
def test_qr_tall_on_cuda_is_exact_and_stays_there(batch):
    """A large stack takes CholeskyQR2 on a GPU, a single block or a small stack Householder: all exact thin QRs."""
    Y = torch.randn(*batch, 2000, 16, generator=torch.Generator().manual_seed(0)).cuda()
    Q, R = qr_tall(Y)
    assert Q.is_cuda and R.is_cuda
    eye = torch.eye(16, device="cuda", dtype=torch.float64)
    torch.testing.assert_close(Q.double().mT @ Q.double(), eye.expand(*batch, 16, 16), rtol=0, atol=1e-5)
    torch.testing.assert_close(Q.double() @ R, Y.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [(), (3,)])
def test_rank_deficient_input_on_cuda_is_redone_with_checked_qrs(batch):
    """On a GPU the randomized SVD reads its trust tests once; rank-deficient W fails them and the SVD is redone the
    checked way: the result is exact, finite and on the GPU, never the NaN of an untrusted Cholesky pass."""
    g = torch.Generator().manual_seed(2)
    W = (torch.randn(*batch, 500, 3, generator=g) @ torch.randn(*batch, 3, 300, generator=g)).cuda()
    U, S, Vh = truncated_svd(W, 8, generator=torch.Generator().manual_seed(1))
    assert U.is_cuda and bool(torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all())
    assert float(error_vs_exact(W, U, S, Vh).max()) < 1e-3  # measured 1.9e-4 on an H200 (1.2e-6 on a CPU)
    zero = truncated_svd(torch.zeros(*batch, 200, 100, device="cuda"), 4)
    assert all(bool(torch.isfinite(t).all()) for t in zero) and float(zero[1].abs().max()) == 0.0


@pytest.mark.parametrize("method", ["pissa", "milora", "lora"])
def test_adapt_on_a_cuda_model_keeps_everything_on_the_gpu(method):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=60, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=96), add_pooling_layer=False).cuda()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    fedspec.adapt(model, method, 4, ["query", "value", "dense"])
    assert all(p.is_cuda for p in model.parameters())
    for name, layer in adapter_layers(model).items():
        rebuilt = layer.base.weight + layer.scaling * (layer.lora_B.weight @ layer.lora_A.weight)
        torch.testing.assert_close(rebuilt, original[f"{name}.weight"], rtol=1e-4, atol=1e-5)
    ids = torch.randint(0, 60, (2, 7), device="cuda")
    assert model(input_ids=ids).last_hidden_state.is_cuda


def test_the_rotation_step_replays_a_captured_graph_with_each_rounds_values(monkeypatch):
    """FedSVD's later rounds on a GPU: the stacked rotation is captured once and replayed; each replay must use
    that call's B and A (never the captured ones), agree with the eager step, and new shapes capture anew."""
    import fedspec.svd.refactor as refactor_module

    def pairs(seed, rows=300):
        g = torch.Generator().manual_seed(seed)
        out = {}
        for i in range(5):
            A = torch.linalg.qr(torch.randn(200, 8, generator=g)).Q.mT.contiguous()
            out[f"layer{i}"] = (torch.randn(rows, 8, generator=g).cuda(), A.cuda())
        return out

    rounds = [pairs(1), pairs(2)]
    captured = [refactor_lowrank_grouped(p, assume_orthonormal_rows=True) for p in rounds]
    graph = refactor_module._captured_rotation
    assert graph is not None, "a CUDA model's rotation step should run from a captured graph"
    monkeypatch.setattr(refactor_module, "GPU_CAPTURE_ROTATION", False)
    for p, got in zip(rounds, captured):
        eager = refactor_lowrank_grouped(p, assume_orthonormal_rows=True)
        for name, (B, A) in p.items():
            torch.testing.assert_close(got[name][0] @ got[name][1], B @ A, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got[name][0] @ got[name][1], eager[name][0] @ eager[name][1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[name][1] @ got[name][1].mT, torch.eye(8, device="cuda"), rtol=0, atol=1e-5)
    monkeypatch.setattr(refactor_module, "GPU_CAPTURE_ROTATION", True)
    refactor_lowrank_grouped(pairs(3, rows=150), assume_orthonormal_rows=True)
    assert refactor_module._captured_rotation is not graph  # other shapes: captured anew


def adapt_every_method_on(device: str, method: str) -> None:
    """Initialize ``method`` (data-driven ones from calibration statistics) on a model already on ``device``, as
    ``fedspec train train.device=cuda`` does: every tensor stays there and the outputs are finite."""
    from fedspec.adapters import METHODS, collect_calibration
    from fedspec.adapters.targets import match_targets
    from fedspec.models import tokenize

    from helpers import tiny_classifier

    model, tokenizer = tiny_classifier()
    model.to(device)
    batch = tokenize(tokenizer, ["the team won the cup", "stocks fell sharply", "a new chip was shown"], 10)
    ids, mask, labels = batch.input_ids.to(device), batch.attention_mask.to(device), torch.tensor([0, 1, 2], device=device)
    calibration = None
    if METHODS[method].calibration:
        calibration = collect_calibration(model, [(ids, mask, labels)], match_targets(model, ["query", "value"]),
                                          METHODS[method].calibration)
    fedspec.adapt(model, method, 4, ["query", "value"], calibration=calibration)
    assert all(p.device.type == device for p in model.parameters())
    assert torch.isfinite(model(ids, mask)).all()


@pytest.mark.parametrize("method", sorted(fedspec.adapters.METHODS))
def test_every_method_initializes_on_a_cuda_model(method):
    adapt_every_method_on("cuda", method)

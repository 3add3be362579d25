"""The fused low-rank adapter kernel against its torch reference: on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``), and on CUDA (``gpu`` marker). Skipped cleanly when Triton is not installed."""

from __future__ import annotations

import os

import pytest
import torch

# Without CUDA the kernel runs in Triton's CPU interpreter; the switch must be set before Triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fedspec  # noqa: E402
import fedspec.svd.kernels.fused_lowrank as kernel_module  # noqa: E402
from fedspec.adapters import adapter_layers
from fedspec.svd.kernels.fused_lowrank import lowrank_linear_reference

needs_triton = pytest.mark.skipif(not kernel_module.triton_available(), reason="triton is not installed (pip install 'fedspec[gpu]')")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def interpreted():
    """The kernel module with Triton's CPU interpreter (set above on machines without CUDA)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernel is compiled for CUDA in this process; the gpu tests cover it")
    return kernel_module


def _inputs(lead, K, N, r, *, bias=True, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return make(*lead, K), make(N, K) / K**0.5, make(N) if bias else None, make(r, K) / K**0.5, make(N, r)


SHAPES = [((5,), 24, 16, 4), ((2, 7), 40, 37, 5), ((3, 3), 33, 20, 20), ((1,), 16, 48, 16)]


@needs_triton
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("lead", "K", "N", "r"), SHAPES)
def test_fused_matches_reference_in_the_interpreter(interpreted, lead, K, N, r, bias):
    x, W, b, A, B = _inputs(lead, K, N, r, bias=bias)
    assert interpreted.triton_runs_here("cpu")
    y = interpreted.lowrank_linear(x, W, b, A, B, 0.75)
    assert y.shape == (*lead, N)
    torch.testing.assert_close(y, lowrank_linear_reference(x, W, b, A, B, 0.75), rtol=1e-5, atol=1e-5)


@needs_triton
def test_fused_gradients_match_reference(interpreted):
    x, W, b, A, B = _inputs((2, 5), 24, 18, 3)
    tensors = [t.clone().requires_grad_(True) for t in (x, A, B)]
    ref = [t.clone().requires_grad_(True) for t in (x, A, B)]
    interpreted.lowrank_linear(tensors[0], W, b, tensors[1], tensors[2], 2.0).square().sum().backward()
    lowrank_linear_reference(ref[0], W, b, ref[1], ref[2], 2.0).square().sum().backward()
    for got, want in zip(tensors, ref):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4)


@needs_triton
def test_fused_is_a_drop_in_for_an_adapter_layer(interpreted):
    """The kernel computes exactly what LowRankLinear.forward computes, from the layer's own tensors."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=48), add_pooling_layer=False)
    fedspec.adapt(model, "pissa", 4, ["query", "intermediate.dense"])
    x = torch.randn(3, 6, 32)
    for layer in adapter_layers(model).values():
        fused = interpreted.lowrank_linear(x, layer.base.weight, layer.base.bias, layer.lora_A.weight,
                                           layer.lora_B.weight, layer.scaling)
        torch.testing.assert_close(fused, layer(x), rtol=1e-5, atol=1e-5)


def test_without_a_runnable_triton_the_reference_runs(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, W, b, A, B = _inputs((4,), 12, 10, 2)
    assert not kernel_module.triton_runs_here("cpu")
    assert torch.equal(kernel_module.lowrank_linear(x, W, b, A, B, 1.5), lowrank_linear_reference(x, W, b, A, B, 1.5))


def test_bad_shapes_and_mixed_devices_are_refused():
    x, W, b, A, B = _inputs((4,), 12, 10, 2)
    with pytest.raises(ValueError, match="shape mismatch"):
        kernel_module.lowrank_linear(x, W, b, A.T, B, 1.0)
    with pytest.raises(ValueError, match="one device"):
        kernel_module.lowrank_linear(x, W, b, A, B.to("meta"), 1.0)


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize(("lead", "K", "N", "r"), [*SHAPES, ((8, 256), 1024, 4096, 16)])
def test_fused_matches_reference_on_cuda(lead, K, N, r, dtype, tol):
    x, W, b, A, B = _inputs(lead, K, N, r, dtype=dtype, device="cuda")
    y = kernel_module.lowrank_linear(x, W, b, A, B, 0.5)
    assert y.device.type == "cuda" and y.dtype == dtype
    want = lowrank_linear_reference(x.float(), W.float(), b.float(), A.float(), B.float(), 0.5)
    torch.testing.assert_close(y.float(), want, rtol=tol, atol=tol * float(want.abs().max()))

"""Fused low-rank adapter forward: y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ in one Triton kernel.

An unmerged adapter layer runs three matmuls and an add (base, x·Aᵀ, then ·Bᵀ, then the sum), reading x
twice and writing the (M, N) output twice. The kernel computes each (BLOCK_M, BLOCK_N) output tile in a
single pass over K: the base tile x·Wᵀ and the rank-r projection x·Aᵀ accumulate in the same loop (the x
tile is loaded once for both), then s·(x·Aᵀ)·Bᵀ is added before the single store. B·A (a d_out × d_in
matrix) is never formed. The projection is recomputed per column block, r / BLOCK_N extra work (~12% for
r = 16), which buys the single pass.

`lowrank_linear` is the entry point: the Triton kernel for CUDA tensors when Triton is installed (or on the
CPU under ``TRITON_INTERPRET=1``, for tests), :func:`lowrank_linear_reference` (plain torch) otherwise.
Gradients flow through a torch backward (dx, dA, dB; W and b are frozen in adapters), so the fused forward
can train without Opacus. Under DP-SGD the adapter layers keep their nn.Linear factors (Opacus' hooks need
them), so this kernel is for inference, evaluation and non-private training.

Measured on an H100 (docs/gpu.md): it does not beat torch. In bf16/fp16 at 4096 tokens (4096→4096 and
4096→11008, r = 16) it ran at 0.63–0.78× the speed of the unfused torch forward (three cuBLAS matmuls and an
add), at about parity with 256 tokens, and at 0.2–0.3× in float32 (exact "ieee" dots against cuBLAS). One pass
over K does not make up for tiles that are not Hopper's (no TMA, no warp specialization). So no adapter calls
it: LowRankLinear keeps torch's matmuls, and merging (``fedspec.merge``) is the inference path.
"""

from __future__ import annotations

import os

import torch

__all__ = ["lowrank_linear", "lowrank_linear_reference", "triton_available", "triton_runs_here"]

try:  # Triton is optional: `pip install 'fedspec[gpu]'`
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised when the extra is not installed
    triton = None
    tl = None


def triton_available() -> bool:
    return triton is not None


def triton_runs_here(device: torch.device | str) -> bool:
    """Whether the kernel can run for tensors on `device`: CUDA with Triton, or the CPU interpreter."""
    if triton is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def lowrank_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ with torch ops (what LowRankLinear.forward computes)."""
    y = torch.nn.functional.linear(x, weight, bias)
    return y + torch.nn.functional.linear(torch.nn.functional.linear(x, A), B) * scaling


def lowrank_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """x (..., K), weight (N, K), bias (N,) or None, A (r, K), B (N, r) → (..., N), all on one device."""
    _check(x, weight, bias, A, B)
    if not triton_runs_here(x.device):
        return lowrank_linear_reference(x, weight, bias, A, B, scaling)
    return _FusedLowRankLinear.apply(x, weight, bias, A, B, float(scaling))


def _check(x, weight, bias, A, B) -> None:
    tensors = {"x": x, "weight": weight, "A": A, "B": B, **({"bias": bias} if bias is not None else {})}
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"lowrank_linear needs every tensor on one device, got {devices}")
    N, K = weight.shape
    r = A.shape[0]
    if x.shape[-1] != K or A.shape != (r, K) or B.shape != (N, r) or (bias is not None and bias.shape != (N,)):
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, weight {tuple(weight.shape)}, A {tuple(A.shape)}, "
            f"B {tuple(B.shape)}, bias {None if bias is None else tuple(bias.shape)}; expected x (..., K), "
            "weight (N, K), A (r, K), B (N, r), bias (N,)"
        )


class _FusedLowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling):
        ctx.save_for_backward(x, weight, A, B)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        return _launch(x, weight, bias, A, B, scaling)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, A, B = ctx.saved_tensors
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ A.T  # (M, r)
        gb = g @ B  # (M, r)
        grad_x = grad_w = grad_b = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight + (gb @ A) * s).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = g.T @ x2
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        if ctx.needs_input_grad[3]:
            grad_A = (gb.T @ x2) * s
        if ctx.needs_input_grad[4]:
            grad_B = (g.T @ xa) * s
        return grad_x, grad_w, grad_b, grad_A, grad_B, None


def _launch(x, weight, bias, A, B, scaling) -> torch.Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    M, K = x2.shape
    N, r = B.shape
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return out.reshape(*lead, N)
    # tl.dot needs every dimension >= 16: the rank dimension is padded (masked loads fill it with zeros).
    block_r = max(16, triton.next_power_of_2(r))
    tiles = _tiles(M, N, x.dtype, x.device)
    grid = (triton.cdiv(M, tiles["BLOCK_M"]), triton.cdiv(N, tiles["BLOCK_N"]))
    weight, A, B = weight.contiguous(), A.contiguous(), B.contiguous()
    _lowrank_linear_kernel[grid](
        x2, weight, bias if bias is not None else weight, A, B, out,
        M, N, K, r, float(scaling),
        x2.stride(0), weight.stride(0), A.stride(0), B.stride(0), out.stride(0),
        HAS_BIAS=bias is not None,
        # float32 matches torch's default (no TF32 in matmuls) unless the user allowed TF32 there too.
        PRECISION="tf32" if x.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee",
        BLOCK_R=block_r, **tiles,
    )
    return out.reshape(*lead, N)


def _tiles(M: int, N: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Fixed tiles: autotuning six configurations per shape did no better on an H100 (docs/gpu.md) and cost
    minutes of compilation in the tests."""
    if device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)  # the CPU interpreter runs every program in Python
    block_m, block_n = (64 if M <= 64 else 128), (64 if N <= 64 else 128)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=32 if dtype == torch.float32 else 64,
                num_warps=8 if block_m * block_n >= 128 * 128 else 4, num_stages=3)


if triton is not None:

    @triton.jit
    def _lowrank_linear_kernel(
        x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, out_ptr,
        M, N, K, R, scaling,
        stride_xm, stride_wn, stride_ar, stride_bn, stride_om,
        HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ranks = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # x·Wᵀ
        proj = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # x·Aᵀ
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :],
                        mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
            w = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None],
                        mask=(cols[None, :] < N) & (ks[:, None] < K), other=0.0)  # (BLOCK_K, BLOCK_N) = Wᵀ tile
            a = tl.load(a_ptr + ranks[None, :] * stride_ar + ks[:, None],
                        mask=(ranks[None, :] < R) & (ks[:, None] < K), other=0.0)  # (BLOCK_K, BLOCK_R) = Aᵀ tile
            acc += tl.dot(x, w, input_precision=PRECISION)
            proj += tl.dot(x, a, input_precision=PRECISION)
        b = tl.load(b_ptr + cols[None, :] * stride_bn + ranks[:, None],
                    mask=(cols[None, :] < N) & (ranks[:, None] < R), other=0.0)  # (BLOCK_R, BLOCK_N) = Bᵀ tile
        acc += tl.dot(proj.to(b.dtype), b, input_precision=PRECISION) * scaling
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0)[None, :]
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rows[:, None] < M) & (cols[None, :] < N))

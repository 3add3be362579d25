"""The batched Jacobi eigensolver against torch.linalg.eigh in float64: on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``), and on CUDA (``gpu`` marker). Skipped cleanly when Triton is not installed."""

from __future__ import annotations

import os

import pytest
import torch

# Without CUDA the kernel runs in Triton's CPU interpreter; the switch must be set before the kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fedspec.svd.eigh import small_eigh
from fedspec.svd.kernels import jacobi

needs_triton = pytest.mark.skipif(jacobi.triton is None, reason="triton is not installed (pip install 'fedspec[gpu]')")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def interpreted():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernel is compiled for CUDA in this process; the gpu tests cover it")
    return jacobi


def _symmetric(batch: int, n: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(batch, n, n, generator=g, dtype=torch.float64)
    return (X + X.mT).to(device=device, dtype=dtype)  # indefinite: negative eigenvalues too


def _errors(G: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor) -> tuple[float, float, float]:
    """Largest eigenvalue error against float64 eigh (relative to ‖G‖₂), orthonormality error, reconstruction error."""
    G64 = G.double().cpu()
    want = torch.linalg.eigvalsh(G64)
    scale = want.abs().amax(dim=-1, keepdim=True).clamp_min(1e-300)
    V = evecs.double().cpu()
    eye = torch.eye(G.shape[-1], dtype=torch.float64)
    value = float(((evals.double().cpu() - want).abs() / scale).max())
    orthonormal = float((V.mT @ V - eye).abs().max())
    rebuilt = V @ torch.diag_embed(evals.double().cpu()) @ V.mT
    reconstruction = float((torch.linalg.matrix_norm(rebuilt - G64) / torch.linalg.matrix_norm(G64).clamp_min(1e-300)).max())
    return value, orthonormal, reconstruction


@needs_triton
@pytest.mark.parametrize("n", [1, 2, 5, 8, 16])
def test_float64_eigenpairs_match_eigh_to_rounding(interpreted, n):
    G = _symmetric(3, n, torch.float64, seed=n)
    evals, evecs, sweeps = interpreted.jacobi_eigh(G, return_sweeps=True)
    assert evals.shape == (3, n) and evecs.shape == (3, n, n) and evals.dtype == torch.float64
    assert int(sweeps.max()) < jacobi.MAX_SWEEPS, "the convergence test must pass, not the sweep cap stop the loop"
    assert bool((evals[..., 1:] >= evals[..., :-1]).all()), "eigenvalues must come in ascending order, as eigh's"
    value, orthonormal, reconstruction = _errors(G, evals, evecs)
    # Measured: at most 4e-15 / 5e-15 / 5e-15 for these sizes; the bounds leave room for other BLAS and rounding.
    assert value < 1e-13 and orthonormal < 1e-13 and reconstruction < 1e-13, (value, orthonormal, reconstruction)


@needs_triton
def test_float32_eigenpairs_are_accurate_to_single_precision(interpreted):
    G = _symmetric(2, 12, torch.float32, seed=1)
    evals, evecs = interpreted.jacobi_eigh(G)
    assert evals.dtype == torch.float32 and evecs.dtype == torch.float32
    value, orthonormal, reconstruction = _errors(G, evals, evecs)
    # Measured 1.4e-6 / 1.6e-6 / 2.1e-6 (about n·eps for n = 12); LAPACK's float32 eigh: 2.7e-7 / 8.1e-7 / 6.2e-7.
    assert value < 5e-6 and orthonormal < 5e-6 and reconstruction < 5e-6, (value, orthonormal, reconstruction)


@needs_triton
def test_a_size_that_is_not_a_power_of_two_is_padded_without_mixing(interpreted):
    """n = 11 runs in a 16 × 16 tile: the padding must neither leak eigenvalues nor rotate into the real block."""
    G = _symmetric(1, 11, torch.float64, seed=3)
    evals, evecs = interpreted.jacobi_eigh(G)
    assert evals.shape == (1, 11)
    assert max(_errors(G, evals, evecs)) < 1e-13


@needs_triton
def test_degenerate_matrices_give_orthonormal_eigenvectors(interpreted):
    """Repeated, zero and rank-deficient spectra (FedSVD's B = 0 for a layer no client touched): finite and exact."""
    g = torch.Generator().manual_seed(4)
    B = torch.randn(2, 10, 3, generator=g, dtype=torch.float64)
    stack = torch.stack([
        torch.zeros(10, 10, dtype=torch.float64),
        torch.eye(10, dtype=torch.float64) * 2.5,
        torch.diag(torch.tensor([3.0, 3.0, 3.0, 1.0, 1.0, 0.0, 0.0, -1.0, -1.0, 5.0], dtype=torch.float64)),
        B[0] @ B[0].mT,  # rank 3 of 10, positive semidefinite
    ])
    evals, evecs = interpreted.jacobi_eigh(stack)
    assert bool(torch.isfinite(evals).all() and torch.isfinite(evecs).all())
    assert max(_errors(stack, evals, evecs)) < 1e-13
    torch.testing.assert_close(evals[0], torch.zeros(10, dtype=torch.float64))


@needs_triton
def test_only_the_lower_triangle_is_read_as_eigh_does(interpreted):
    G = _symmetric(1, 6, torch.float64, seed=5)
    garbage = G.clone()
    garbage.triu_(1).add_(torch.full_like(G, 7.0).triu(1))  # a different upper triangle
    garbage += G.tril()
    evals, _ = interpreted.jacobi_eigh(garbage)
    torch.testing.assert_close(evals, torch.linalg.eigvalsh(garbage), rtol=0, atol=1e-12)


@needs_triton
def test_batch_shape_and_empty_batch(interpreted):
    G = _symmetric(6, 4, torch.float64, seed=6).reshape(2, 3, 4, 4)
    evals, evecs = interpreted.jacobi_eigh(G)
    assert evals.shape == (2, 3, 4) and evecs.shape == (2, 3, 4, 4)
    torch.testing.assert_close(evals, torch.linalg.eigvalsh(G), rtol=0, atol=1e-12)
    empty_vals, empty_vecs = interpreted.jacobi_eigh(torch.zeros(0, 4, 4, dtype=torch.float64))
    assert empty_vals.shape == (0, 4) and empty_vecs.shape == (0, 4, 4)


@needs_triton
def test_bad_input_is_refused_with_a_clear_error(interpreted):
    with pytest.raises(ValueError, match="square"):
        interpreted.jacobi_eigh(torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=f"n <= {jacobi.MAX_SIZE}"):
        interpreted.jacobi_eigh(torch.zeros(jacobi.MAX_SIZE + 1, jacobi.MAX_SIZE + 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32 or float64"):
        interpreted.jacobi_eigh(torch.zeros(4, 4, dtype=torch.bfloat16))


def test_without_a_runnable_triton_the_kernel_refuses_and_the_engine_uses_torch(monkeypatch):
    from fedspec.svd.kernels import runtime

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not runtime.triton_runs_here("cpu")
    with pytest.raises(RuntimeError, match="Triton does not run"):
        jacobi.jacobi_eigh(torch.eye(3, dtype=torch.float64))
    evals, _ = small_eigh(torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(evals, torch.ones(3, dtype=torch.float64))


def test_cpu_matrices_go_to_lapack():
    """The engine's dispatcher leaves CPU matrices to torch (bit for bit), interpreter or not."""
    G = _symmetric(2, 9, torch.float64, seed=7)
    for got, want in zip(small_eigh(G), torch.linalg.eigh(G)):
        assert torch.equal(got, want)


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("n", [2, 16, 24, 64, 120, 128])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_jacobi_matches_eigh_on_cuda(n, dtype):
    G = _symmetric(14, n, dtype, seed=n, device="cuda")
    G = G @ G.mT / n if n >= 64 else G  # Gram-like (positive semidefinite) for the Rayleigh–Ritz sizes
    evals, evecs, sweeps = jacobi.jacobi_eigh(G, return_sweeps=True)
    assert evals.is_cuda and evecs.is_cuda and int(sweeps.max()) < jacobi.MAX_SWEEPS
    value, orthonormal, reconstruction = _errors(G, evals, evecs)
    # float32 at n = 120/128 measured up to 6e-5 on an H200 (the engine sends only n ≤ 32 there, in float64)
    bound = 1e-12 if dtype == torch.float64 else 3e-4
    assert value < bound and orthonormal < bound and reconstruction < bound, (value, orthonormal, reconstruction)


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_the_engine_uses_the_kernel_on_cuda_and_eigh_can_be_chosen(monkeypatch):
    G = _symmetric(3, 16, torch.float64, seed=8, device="cuda")
    calls = []
    monkeypatch.setattr(jacobi, "jacobi_eigh", lambda M: calls.append(M.shape) or torch.linalg.eigh(M))
    small_eigh(G)
    assert calls == [G.shape]
    small_eigh(_symmetric(1, 120, torch.float64, device="cuda"))  # a Rayleigh–Ritz size: cuSOLVER is far faster
    assert calls == [G.shape]
    monkeypatch.setattr(jacobi, "USE_ON_CUDA", False)
    small_eigh(G)
    assert calls == [G.shape]

"""Tests of the SVD engine: truncated SVD (exact / randomized) and the low-rank re-factorization.

Singular-vector signs are arbitrary, so every comparison is on products U·diag(S)·Vh or B·A,
never on factors. Sizes are tiny except the one 4096² timing check.
"""

from __future__ import annotations

import time

import pytest
import torch

import fedspec.svd.refactor as refactor_module
from fedspec.svd import (
    BATCH_BYTES,
    batch_bytes,
    batch_chunks,
    error_vs_exact,
    group_by_shape,
    reconstruction_error,
    refactor_lowrank,
    refactor_lowrank_grouped,
    truncated_svd,
)
from fedspec.svd.orthonormal import _householder_max_columns, all_trusted, qr_tall

# --------------------------------------------------------------------------------------------- helpers


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_orthonormal(rows: int, cols: int, g: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=dtype)).Q


def decaying_matrix(
    m: int, n: int, *, decay: float = 0.7, seed: int = 0, dtype=torch.float64, batch: tuple[int, ...] = ()
) -> torch.Tensor:
    """U diag(decay**i) Vᵀ with random orthonormal U, V: a spectrum with clear gaps."""
    g = gen(seed)
    k = min(m, n)
    s = decay ** torch.arange(k, dtype=torch.float64)
    mats = []
    for _ in range(int(torch.tensor(batch).prod()) if batch else 1):
        U = random_orthonormal(m, k, g)
        V = random_orthonormal(n, k, g)
        mats.append((U * s) @ V.T)
    W = torch.stack(mats).reshape(*batch, m, n) if batch else mats[0]
    return W.to(dtype)


def product(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    return (U * S.unsqueeze(-2)) @ Vh


def rel_err(X: torch.Tensor, Y: torch.Tensor) -> float:
    X, Y = X.double(), Y.double()
    return float(torch.linalg.norm(X - Y) / torch.linalg.norm(Y).clamp_min(1e-300))


def orthonormality_err(A: torch.Tensor) -> float:
    """max |A Aᵀ − I| over a (batch of) r×n matrices."""
    A = A.double()
    eye = torch.eye(A.shape[-2], dtype=torch.float64)
    return float((A @ A.mT - eye).abs().max())


def reference_svd(W: torch.Tensor, rank: int, smallest: bool = False) -> torch.Tensor:
    """The rank-r product from a full float64 torch.linalg.svd."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    keep = slice(-rank, None) if smallest else slice(0, rank)
    return product(U[..., keep], S[..., keep], Vh[..., keep, :])


# ------------------------------------------------------------------------------------ truncated_svd


@pytest.mark.parametrize("method", ["randomized", "subspace"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("m", "n", "rank"), [(60, 40, 5), (40, 70, 10), (50, 50, 1)])
def test_randomized_error_within_one_percent_of_exact(method, dtype, m, n, rank):
    W = decaying_matrix(m, n, dtype=dtype)
    err_exact = reconstruction_error(W, *truncated_svd(W, rank, method="exact"))
    err_rand = reconstruction_error(W, *truncated_svd(W, rank, method=method))
    assert float(err_rand) <= 1.01 * float(err_exact)


@pytest.mark.parametrize("method", ["exact", "randomized", "subspace"])
@pytest.mark.parametrize(("m", "n"), [(48, 32), (32, 48)])
def test_top_components_match_linalg_svd(method, m, n):
    W = decaying_matrix(m, n)
    U, S, Vh = truncated_svd(W, 6, method=method)
    assert U.shape == (m, 6) and S.shape == (6,) and Vh.shape == (6, n)
    tol = 1e-12 if method == "exact" else 1e-8
    assert rel_err(product(U, S, Vh), reference_svd(W, 6)) < tol
    full = torch.linalg.svdvals(W)
    torch.testing.assert_close(S, full[:6], rtol=1e-10, atol=1e-12)
    assert torch.all(S[:-1] >= S[1:])


@pytest.mark.parametrize(("m", "n"), [(30, 20), (20, 30)])
def test_smallest_components_match_linalg_svd(m, n):
    W = decaying_matrix(m, n, decay=0.8)
    U, S, Vh = truncated_svd(W, 4, method="exact", smallest=True)
    assert U.shape == (m, 4) and S.shape == (4,) and Vh.shape == (4, n)
    assert rel_err(product(U, S, Vh), reference_svd(W, 4, smallest=True)) < 1e-10
    torch.testing.assert_close(S, torch.linalg.svdvals(W)[-4:])
    assert torch.all(S[:-1] >= S[1:]), "bottom components keep the full SVD's non-increasing order"


def test_full_rank_randomized_is_exact():
    """q is capped at min(m, n): asking for every component recovers W exactly."""
    W = torch.randn(20, 12, generator=gen(), dtype=torch.float64)
    assert float(reconstruction_error(W, *truncated_svd(W, 12, method="randomized"))) < 1e-12


def test_oversampling_and_power_iterations_each_improve_the_sketch():
    """niter=0, oversample=0 is allowed but crude; either knob closes most of the gap to optimal."""
    W = decaying_matrix(40, 30)
    optimal = float(reconstruction_error(W, *truncated_svd(W, 3, method="exact")))

    def ratio(niter: int, oversample: int) -> float:
        approx = truncated_svd(W, 3, niter=niter, oversample=oversample)
        return float(reconstruction_error(W, *approx)) / optimal

    crude = ratio(0, 0)
    assert 1.0 <= crude < 3.0
    assert ratio(1, 0) < crude and ratio(0, 8) < crude
    assert ratio(4, 8) < 1.0 + 1e-9


@pytest.mark.parametrize("method", ["exact", "randomized", "subspace"])
@pytest.mark.parametrize("batch", [(3,), (2, 2)])
def test_batched_equals_per_matrix(method, batch):
    W = decaying_matrix(24, 16, batch=batch)
    U, S, Vh = truncated_svd(W, 4, method=method)
    assert U.shape == (*batch, 24, 4) and S.shape == (*batch, 4) and Vh.shape == (*batch, 4, 16)
    flat_W = W.reshape(-1, 24, 16)
    flat_P = product(U, S, Vh).reshape(-1, 24, 16)
    for Wi, Pi in zip(flat_W, flat_P):
        assert rel_err(Pi, product(*truncated_svd(Wi, 4, method=method))) < 1e-10
    assert reconstruction_error(W, U, S, Vh).shape == batch


def test_batched_smallest_equals_per_matrix():
    W = decaying_matrix(12, 10, batch=(3,))
    P = product(*truncated_svd(W, 3, method="exact", smallest=True))
    for Wi, Pi in zip(W, P):
        assert rel_err(Pi, reference_svd(Wi, 3, smallest=True)) < 1e-10


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["exact", "randomized", "subspace"])
def test_half_precision_input_is_computed_in_float32(half, method):
    W = decaying_matrix(32, 24).to(half)
    U, S, Vh = truncated_svd(W, 4, method=method)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    U32, S32, Vh32 = truncated_svd(W.float(), 4, method=method)
    torch.testing.assert_close(product(U, S, Vh), product(U32, S32, Vh32))


@pytest.mark.parametrize("method", ["exact", "randomized", "subspace"])
def test_float64_stays_float64(method):
    U, S, Vh = truncated_svd(decaying_matrix(16, 12), 3, method=method)
    assert U.dtype == S.dtype == Vh.dtype == torch.float64


def test_same_generator_seed_is_deterministic():
    W = torch.randn(40, 30, generator=gen(1))  # flat spectrum: the sketch visibly matters
    a = truncated_svd(W, 5, niter=1, oversample=0, generator=gen(7))
    b = truncated_svd(W, 5, niter=1, oversample=0, generator=gen(7))
    c = truncated_svd(W, 5, niter=1, oversample=0, generator=gen(8))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(product(*a), product(*c))


@pytest.mark.parametrize("niter", [0, 2])
def test_a_matrix_gets_the_same_result_in_any_batch(niter):
    # One sketch per call, shared by the batch: a layer's decomposition does not depend on which other layers
    # (or how many) share its batch, e.g. when a large model's group is split into chunks.
    W = torch.randn(4, 40, 30, generator=gen(1), dtype=torch.float64)  # flat spectra: the sketch visibly matters
    batched = truncated_svd(W, 5, niter=niter, oversample=2, generator=gen(7))
    alone = truncated_svd(W[2], 5, niter=niter, oversample=2, generator=gen(7))
    pair = truncated_svd(W[1:3], 5, niter=niter, oversample=2, generator=gen(7))
    expected = product(*alone)
    assert torch.allclose(product(*(x[2] for x in batched)), expected, atol=1e-10)
    assert torch.allclose(product(*(x[1] for x in pair)), expected, atol=1e-10)


def test_no_generator_is_deterministic_and_leaves_global_rng_alone():
    W = torch.randn(40, 30, generator=gen(1))
    state = torch.get_rng_state()
    a = truncated_svd(W, 5, niter=1, oversample=0)
    b = truncated_svd(W, 5, niter=1, oversample=0)
    assert torch.equal(torch.get_rng_state(), state)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # generator=None means a local generator seeded with 0.
    for x, y in zip(a, truncated_svd(W, 5, niter=1, oversample=0, generator=gen(0))):
        assert torch.equal(x, y)


@pytest.mark.parametrize("method", ["exact", "randomized", "subspace"])
def test_never_under_autograd(method):
    W = torch.randn(10, 8, requires_grad=True)
    U, S, Vh = truncated_svd(W, 2, method=method)
    assert not (U.requires_grad or S.requires_grad or Vh.requires_grad)


@pytest.mark.parametrize("method", ["exact", "randomized", "subspace"])
def test_zero_matrix_is_finite(method):
    U, S, Vh = truncated_svd(torch.zeros(12, 9), 3, method=method)
    assert torch.isfinite(U).all() and torch.isfinite(Vh).all()
    assert torch.equal(S, torch.zeros(3))
    assert float(reconstruction_error(torch.zeros(12, 9), U, S, Vh)) == 0.0


@pytest.mark.parametrize("method", ["randomized", "subspace"])
def test_rank_deficient_randomized_is_exact_and_finite(method):
    """Asking for more components than W has: the trailing singular values are ~0, and the Rayleigh–Ritz step must
    not divide by them (it falls back to a thin QR), so the result is finite and still reproduces W."""
    g = gen(4)
    W = torch.randn(40, 3, generator=g) @ torch.randn(3, 30, generator=g)
    U, S, Vh = truncated_svd(W, 6, method=method)
    assert torch.isfinite(U).all() and torch.isfinite(Vh).all()
    assert float(reconstruction_error(W, U, S, Vh)) < 1e-4  # float32
    assert float(S[3:].max()) < 1e-5 * float(S[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_on_a_flat_spectrum_krylov_beats_subspace_which_beats_unoversampled_svd_lowrank(seed):
    """The trade-off `method="subspace"` documents, at niter = 4 (9 passes; svd_lowrank's 10): block Krylov captures
    the most of the top-r energy when the top singular values have tiny gaps; subspace iteration with its
    oversampling still captures more than torch.svd_lowrank without any (what PEFT's pissa_niter_4 runs: q = r)."""
    W = torch.randn(300, 200, generator=gen(seed), dtype=torch.float64) / 200**0.5
    rank = 8

    def distance(U, S, Vh):
        return float(error_vs_exact(W, U, S, Vh))

    krylov = distance(*truncated_svd(W, rank, niter=4, oversample=8, generator=gen(10 + seed)))
    subspace = distance(*truncated_svd(W, rank, method="subspace", niter=4, oversample=8, generator=gen(10 + seed)))
    torch.manual_seed(seed)
    U, S, V = torch.svd_lowrank(W, q=rank, niter=4)
    peft_like = distance(U, S, V.mT)
    assert krylov < subspace < peft_like


def test_subspace_iteration_converges_to_the_exact_top_components():
    """Enough iterations on a separated spectrum reach the exact truncated SVD (to float64 rounding)."""
    W = decaying_matrix(80, 60, decay=0.7)
    U, S, Vh = truncated_svd(W, 5, method="subspace", niter=30, oversample=3)
    assert rel_err(product(U, S, Vh), reference_svd(W, 5)) < 1e-10


# ------------------------------------------------------------------------ pass precision (bf16 passes)


def flat_matrix(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """Gaussian entries: the flat spectrum of random (or barely trained) weights."""
    return torch.randn(m, n, generator=gen(seed)) / n**0.5


def test_bf16_passes_capture_as_much_as_full_precision_on_a_flat_spectrum():
    """Where the randomized SVD's own error dominates (real and random weights), reading W in bf16 costs nothing
    measurable: the reconstruction errors agree to 1e-4 relative."""
    W = flat_matrix(300, 200)
    full = float(reconstruction_error(W, *truncated_svd(W, 8, niter=3, pass_precision="full")))
    bf16 = float(reconstruction_error(W, *truncated_svd(W, 8, niter=3, pass_precision="bfloat16")))
    assert abs(bf16 - full) <= 1e-4 * full
    exact = float(reconstruction_error(W, *truncated_svd(W, 8, method="exact")))
    assert exact <= bf16 <= 1.01 * exact


def test_bf16_passes_have_a_noise_floor_on_exactly_low_rank_matrices():
    """The documented price of bf16 passes: ~1e-3 relative on a matrix full precision recovers exactly."""
    g = gen(5)
    W = torch.randn(120, 8, generator=g) @ torch.randn(8, 90, generator=g)
    full = truncated_svd(W, 8, niter=2, pass_precision="full")
    bf16 = truncated_svd(W, 8, niter=2, pass_precision="bfloat16")
    assert rel_err(product(*full), W) < 1e-5
    assert 1e-5 < rel_err(product(*bf16), W) < 1e-2
    assert all(t.dtype == torch.float32 for t in bf16), "results stay in the compute dtype"


def test_pass_buffer_is_reused_and_changes_nothing():
    from fedspec.svd import PassBuffer

    buffer = PassBuffer()
    big, small = flat_matrix(64, 48, seed=1), flat_matrix(32, 40, seed=2)
    for W in (big, small):
        with_buffer = truncated_svd(W, 4, pass_precision="bfloat16", pass_buffer=buffer)
        without = truncated_svd(W, 4, pass_precision="bfloat16")
        for a, b in zip(with_buffer, without):
            assert torch.equal(a, b)
    address = buffer.copy(big, torch.bfloat16).data_ptr()
    assert buffer.copy(small, torch.bfloat16).data_ptr() == address, "a smaller matrix reuses the memory"


def test_auto_pass_precision_needs_a_large_matrix_and_native_bf16(monkeypatch):
    import fedspec.svd.precision as precision

    large = torch.empty(384, 384)
    monkeypatch.setattr(precision, "native_bf16_matmul", lambda device: True)
    assert precision.pass_dtype("auto", large) == torch.bfloat16
    assert precision.pass_dtype("auto", torch.empty(256, 128)) == torch.float32, "small: full precision"
    assert precision.pass_dtype("auto", large.bfloat16()) == torch.bfloat16, "a bf16 model's weights"
    assert precision.pass_dtype("auto", large.double()) == torch.float64, "float64 input asks for float64"
    assert precision.pass_dtype("full", large) == torch.float32
    assert precision.pass_dtype("full", large.bfloat16()) == torch.float32, "full: the compute dtype"
    monkeypatch.setattr(precision, "native_bf16_matmul", lambda device: False)
    assert precision.pass_dtype("auto", large) == torch.float32, "emulated bf16 is slower than float32"
    assert precision.pass_dtype("bfloat16", large) == torch.bfloat16, "an explicit choice is obeyed"


def test_bf16_input_is_read_as_it_is_by_bf16_passes():
    """A bf16 W (a bf16 model's weights, or a stack `fedspec.adapt` made in the pass dtype) needs no copy: the
    result equals that of its float32 upcast, whose passes read the same bf16 values, and no buffer is filled."""
    from fedspec.svd import PassBuffer

    W = flat_matrix(96, 80, seed=3).bfloat16()
    buffer = PassBuffer()
    direct = truncated_svd(W, 6, niter=2, pass_precision="bfloat16", pass_buffer=buffer)
    assert buffer._memory is None, "no copy of W was made"
    via_float32 = truncated_svd(W.float(), 6, niter=2, pass_precision="bfloat16")
    for a, b in zip(direct, via_float32):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    full = truncated_svd(W, 6, niter=2, pass_precision="full")  # full precision: the float32 upcast is read
    for a, b in zip(full, truncated_svd(W.float(), 6, niter=2, pass_precision="full")):
        assert torch.equal(a, b)


def test_pass_buffer_stacks_with_one_converting_copy_into_reused_memory():
    from fedspec.svd import PassBuffer

    buffer = PassBuffer()
    tensors = [flat_matrix(12, 10, seed=s) for s in range(3)]
    stacked = buffer.stack(tensors, torch.bfloat16)
    assert stacked.dtype == torch.bfloat16 and torch.equal(stacked, torch.stack(tensors).bfloat16())
    address = stacked.data_ptr()
    assert buffer.stack(tensors[:2], torch.bfloat16).data_ptr() == address, "a smaller stack reuses the memory"
    with pytest.raises(ValueError, match=r"one shape, got shapes \[\(1, 10\), \(12, 10\)\]"):
        buffer.stack([tensors[0], tensors[1][:1]], torch.bfloat16)  # would broadcast silently
    with pytest.raises(ValueError, match="one or more tensors"):
        buffer.stack([], torch.bfloat16)


@pytest.mark.parametrize("method", ["exact", "randomized", "subspace"])
def test_unknown_pass_precision_lists_allowed_values(method):
    with pytest.raises(ValueError, match=r"'half'.*full, bfloat16, auto"):
        truncated_svd(torch.randn(8, 6), 2, method=method, pass_precision="half")


@pytest.mark.parametrize("rank", [0, -1, 9])
def test_rank_out_of_range_names_shape_and_range(rank):
    with pytest.raises(ValueError, match=r"rank=.*\(12, 8\).*1 <= rank <= min\(m, n\) = 8"):
        truncated_svd(torch.randn(12, 8), rank)


def test_rank_must_be_int():
    with pytest.raises(TypeError, match="rank must be an int"):
        truncated_svd(torch.randn(12, 8), 2.0)


@pytest.mark.parametrize("method", ["randomized", "subspace"])
def test_smallest_with_randomized_is_refused(method):
    with pytest.raises(ValueError, match=rf"method='{method}'.*top singular subspace.*method='exact'"):
        truncated_svd(torch.randn(12, 8), 2, method=method, smallest=True)


def test_unknown_method_lists_allowed_values():
    with pytest.raises(ValueError, match=r"'lanczos'.*exact, randomized, subspace"):
        truncated_svd(torch.randn(12, 8), 2, method="lanczos")


@pytest.mark.parametrize("kwargs", [{"niter": -1}, {"oversample": -2}])
def test_negative_niter_or_oversample_rejected(kwargs):
    with pytest.raises(ValueError, match=">= 0"):
        truncated_svd(torch.randn(12, 8), 2, **kwargs)


def test_vector_input_rejected():
    with pytest.raises(ValueError, match="matrix"):
        truncated_svd(torch.randn(12), 1)


# --------------------------------------------------------------------------------- refactor_lowrank


def random_pair(m: int, r: int, n: int, dtype=torch.float64, seed: int = 0, batch=()) -> tuple:
    g = gen(seed)
    B = torch.randn(*batch, m, r, generator=g, dtype=torch.float64).to(dtype)
    A = torch.randn(*batch, r, n, generator=g, dtype=torch.float64).to(dtype)
    return B, A


SHAPES = [(64, 8, 48), (48, 8, 64), (32, 8, 32), (5, 8, 40), (8, 8, 8), (1, 4, 10)]


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize(("m", "r", "n"), SHAPES)
def test_refactor_preserves_product(dtype, tol, m, r, n):
    B, A = random_pair(m, r, n, dtype)
    B_new, A_new = refactor_lowrank(B, A)
    assert B_new.shape == (m, r) and A_new.shape == (r, n)
    assert B_new.dtype == A_new.dtype == dtype
    assert rel_err(B_new @ A_new, B.double() @ A.double()) < tol


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize(("m", "r", "n"), SHAPES)
def test_refactor_rows_of_a_are_orthonormal(dtype, tol, m, r, n):
    _, A_new = refactor_lowrank(*random_pair(m, r, n, dtype))
    assert orthonormality_err(A_new) < tol


@pytest.mark.parametrize(("m", "r", "n"), SHAPES)
def test_refactor_b_holds_the_singular_values(m, r, n):
    """B_new = UΣ: orthogonal columns whose norms are the singular values of B·A, non-increasing."""
    B, A = random_pair(m, r, n)
    B_new, _ = refactor_lowrank(B, A)
    sigma = torch.linalg.norm(B_new, dim=-2)
    assert torch.all(sigma >= 0) and torch.all(sigma[:-1] >= sigma[1:])
    expected = torch.zeros(r, dtype=torch.float64)
    svals = torch.linalg.svdvals(B @ A)[:r]
    expected[: svals.numel()] = svals
    torch.testing.assert_close(sigma, expected, rtol=1e-10, atol=1e-10)
    gram = B_new.mT @ B_new
    torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), rtol=0, atol=1e-10)


@pytest.mark.parametrize("assume", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_refactor_zero_b_is_finite_and_orthonormal(assume, dtype):
    A = random_orthonormal(40, 6, gen(), dtype).mT if assume else random_pair(32, 6, 40, dtype)[1]
    B_new, A_new = refactor_lowrank(torch.zeros(32, 6, dtype=dtype), A, assume_orthonormal_rows=assume)
    assert torch.isfinite(B_new).all() and torch.isfinite(A_new).all()
    assert torch.count_nonzero(B_new) == 0
    assert orthonormality_err(A_new) < (1e-12 if dtype == torch.float64 else 1e-5)


def test_refactor_rank_deficient_product():
    """Rank-2 B and a rank-deficient A (two equal rows): zeros in Σ, A still orthonormal."""
    g = gen(3)
    f64 = torch.float64
    B = torch.randn(30, 2, generator=g, dtype=f64) @ torch.randn(2, 6, generator=g, dtype=f64)
    A = torch.randn(6, 20, generator=g, dtype=torch.float64)
    A[1] = A[0]
    B_new, A_new = refactor_lowrank(B, A)
    assert rel_err(B_new @ A_new, B @ A) < 1e-12
    assert orthonormality_err(A_new) < 1e-12
    assert torch.all(torch.linalg.norm(B_new, dim=-2)[2:] < 1e-10)


@pytest.mark.parametrize(("m", "r", "n"), [(64, 8, 48), (5, 8, 40), (8, 8, 8)])
def test_orthonormal_shortcut_matches_general_path(m, r, n):
    # As in FedSVD round ≥ 2: A came out of a previous re-factorization, B was then updated.
    B0, A0 = random_pair(m, r, n)
    _, A = refactor_lowrank(B0, A0)
    B = torch.randn(m, r, generator=gen(5), dtype=torch.float64)
    general = refactor_lowrank(B, A)
    shortcut = refactor_lowrank(B, A, assume_orthonormal_rows=True)
    assert rel_err(shortcut[0] @ shortcut[1], general[0] @ general[1]) < 1e-12
    assert rel_err(shortcut[0] @ shortcut[1], B @ A) < 1e-12
    assert orthonormality_err(shortcut[1]) < 1e-12
    torch.testing.assert_close(
        torch.linalg.norm(shortcut[0], dim=-2), torch.linalg.norm(general[0], dim=-2), rtol=1e-10, atol=1e-12
    )


def test_refactor_is_idempotent_in_product():
    B, A = random_pair(40, 6, 30)
    once = refactor_lowrank(B, A)
    twice = refactor_lowrank(*once, assume_orthonormal_rows=True)
    assert rel_err(twice[0] @ twice[1], B @ A) < 1e-12


@pytest.mark.parametrize("assume", [False, True])
def test_refactor_batched_equals_per_pair(assume):
    B, A = random_pair(20, 4, 16, batch=(2, 3))
    if assume:
        A = torch.linalg.qr(A.mT).Q.mT
    B_new, A_new = refactor_lowrank(B, A, assume_orthonormal_rows=assume)
    assert B_new.shape == B.shape and A_new.shape == A.shape
    for i in range(2):
        for j in range(3):
            b, a = refactor_lowrank(B[i, j], A[i, j], assume_orthonormal_rows=assume)
            assert rel_err(B_new[i, j] @ A_new[i, j], b @ a) < 1e-12
    assert orthonormality_err(A_new) < 1e-12


def test_refactor_broadcasts_a_shared_factor():
    B, _ = random_pair(20, 4, 16, batch=(3,))
    _, A = random_pair(20, 4, 16, seed=1)
    B_new, A_new = refactor_lowrank(B, A)
    assert B_new.shape == (3, 20, 4) and A_new.shape == (3, 4, 16)
    assert rel_err(B_new @ A_new, B @ A) < 1e-12


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_refactor_half_precision_returns_input_dtype(half):
    B, A = random_pair(32, 4, 24, half)
    B_new, A_new = refactor_lowrank(B, A)
    assert B_new.dtype == A_new.dtype == half
    # Computed in float32, rounded once at the end: product error is at the half-precision level.
    assert rel_err(B_new.double() @ A_new.double(), B.double() @ A.double()) < 2e-2
    b32, a32 = refactor_lowrank(B.float(), A.float())
    torch.testing.assert_close(B_new, b32.to(half))
    torch.testing.assert_close(A_new, a32.to(half))


def test_refactor_mixed_dtypes_compute_in_float64():
    B, A = random_pair(16, 4, 12)
    B_new, A_new = refactor_lowrank(B.float(), A)
    assert B_new.dtype == torch.float32 and A_new.dtype == torch.float64
    assert orthonormality_err(A_new) < 1e-12


def test_refactor_never_under_autograd():
    B, A = random_pair(16, 4, 12)
    B.requires_grad_(True)
    B_new, A_new = refactor_lowrank(B, A)
    assert not (B_new.requires_grad or A_new.requires_grad)


def test_refactor_rejects_n_smaller_than_r():
    with pytest.raises(ValueError, match=r"r=8 orthonormal rows of length n=5.*n >= r"):
        refactor_lowrank(torch.randn(10, 8), torch.randn(8, 5))


def test_refactor_rejects_mismatched_inner_dims():
    with pytest.raises(ValueError, match="inner dimensions differ"):
        refactor_lowrank(torch.randn(10, 8), torch.randn(4, 20))


def test_refactor_rejects_unbroadcastable_batches():
    with pytest.raises(ValueError, match="do not broadcast"):
        refactor_lowrank(torch.randn(2, 10, 4), torch.randn(3, 4, 20))


def test_refactor_with_deferred_checks_redoes_a_rank_deficient_stack_instead_of_raising(monkeypatch):
    """On a GPU the re-factorization's QR of a stack of A's is CholeskyQR2 with its trust tests read once, after
    the eigendecomposition. An A with a zero row (rank-deficient) fails CholeskyQR2, which leaves NaN in R_a and so
    in the r×r Gram matrix; `torch.linalg.eigh` (cuSOLVER for r > 32, or without Triton) raises on NaN before the
    tests are read, so the round failed instead of being redone with Householder QR. Run here on the CPU with the
    tests deferred as on a GPU (LAPACK's eigh raises on NaN too)."""
    monkeypatch.setattr(refactor_module, "deferred_checks", lambda device: [])
    B, A = random_pair(50, 20, 64, batch=(3,))
    A[1, 1] = 0.0
    B_new, A_new = refactor_lowrank(B, A)
    assert torch.isfinite(B_new).all() and torch.isfinite(A_new).all()
    assert rel_err(B_new @ A_new, B @ A) < 1e-12
    assert orthonormality_err(A_new) < 1e-12


def test_refactor_large_layer_is_fast():
    """4096×4096 with r=16: an m×n SVD would take seconds and 64 MiB per dense copy."""
    g = gen()
    B = torch.randn(4096, 16, generator=g)
    A = torch.randn(16, 4096, generator=g)
    refactor_lowrank(B, A)  # warm-up (LAPACK / allocator)
    start = time.perf_counter()
    B_new, A_new = refactor_lowrank(B, A)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"refactor of 4096x16 · 16x4096 took {elapsed:.3f}s"
    assert orthonormality_err(A_new) < 1e-5
    # Check the product on a few rows only, without building the 4096² matrix.
    rows = torch.arange(0, 4096, 512)
    assert rel_err(B_new[rows] @ A_new, B[rows] @ A) < 1e-5


# ----------------------------------------------------------------------------- grouped re-factorization


def model_pairs() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Interleaved layers of two shapes plus one float32 layer, as a model's adapters would be."""
    pairs = {}
    for i in range(3):
        pairs[f"layer{i}.q"] = random_pair(24, 4, 16, seed=10 + i)
        pairs[f"layer{i}.fc"] = random_pair(40, 4, 24, seed=20 + i)
    pairs["head"] = random_pair(24, 4, 16, torch.float32, seed=30)
    return pairs


def test_grouped_matches_per_pair_and_keeps_order():
    pairs = model_pairs()
    grouped = refactor_lowrank_grouped(pairs)
    assert list(grouped) == list(pairs)
    for name, (B, A) in pairs.items():
        b_new, a_new = grouped[name]
        b, a = refactor_lowrank(B, A)
        assert b_new.shape == B.shape and a_new.shape == A.shape and b_new.dtype == B.dtype
        tol = 1e-12 if B.dtype == torch.float64 else 1e-5
        assert rel_err(b_new @ a_new, b @ a) < tol
        assert rel_err(b_new @ a_new, B @ A) < tol


def test_grouped_makes_one_call_per_shape_group(monkeypatch):
    calls = []
    original = refactor_module.refactor_lowrank

    def counting(B, A, **kwargs):
        calls.append(tuple(B.shape))
        return original(B, A, **kwargs)

    monkeypatch.setattr(refactor_module, "refactor_lowrank", counting)
    refactor_lowrank_grouped(model_pairs())
    assert sorted(calls) == sorted([(3, 24, 4), (3, 40, 4), (1, 24, 4)])


def test_grouped_orthonormal_shortcut_and_empty_input():
    pairs = refactor_lowrank_grouped(model_pairs())
    again = refactor_lowrank_grouped(pairs, assume_orthonormal_rows=True)
    for name, (B, A) in pairs.items():
        assert rel_err(again[name][0] @ again[name][1], B @ A) < 1e-5
    assert refactor_lowrank_grouped({}) == {}


def test_grouped_shortcut_stacks_off_the_cpu_only(monkeypatch):
    """The rotation shortcut runs per layer on the CPU and as one stacked call per shape elsewhere (a GPU; here
    the meta device stands in for it, since only the dispatch is checked)."""
    calls = []
    original = refactor_module.refactor_lowrank

    def counting(B, A, **kwargs):
        calls.append((tuple(B.shape), kwargs))
        return original(B, A, **kwargs)

    monkeypatch.setattr(refactor_module, "refactor_lowrank", counting)
    pairs = {f"layer{i}": (torch.randn(24, 4), torch.randn(4, 16)) for i in range(3)}
    refactor_lowrank_grouped(pairs, assume_orthonormal_rows=True)
    assert calls == []
    meta = {name: (B.to("meta"), A.to("meta")) for name, (B, A) in pairs.items()}
    out = refactor_lowrank_grouped(meta, assume_orthonormal_rows=True)
    assert calls == [((3, 24, 4), {"assume_orthonormal_rows": True})]
    assert all(B.device.type == "meta" and B.shape == (24, 4) for B, _ in out.values())


# ----------------------------------------------------------------------------- thin QR of tall blocks


@pytest.mark.parametrize("shape", [(200, 8), (3, 200, 8), (200, 24), (3, 200, 40)])
def test_qr_tall_is_an_exact_thin_qr(shape):
    """Householder (narrow) and CholeskyQR2 (wide) alike: orthonormal Q, upper-triangular float64 R, Q·R = Y."""
    Y = torch.randn(*shape, generator=gen(1))
    Q, R = qr_tall(Y)
    eye = torch.eye(shape[-1], dtype=torch.float64)
    assert Q.dtype == Y.dtype and R.dtype == torch.float64 and R.shape == (*shape[:-2], shape[-1], shape[-1])
    assert float((Q.double().mT @ Q.double() - eye).abs().max()) < 1e-5
    assert torch.equal(R, R.triu())
    assert rel_err(Q.double() @ R, Y.double()) < 1e-5


def test_qr_tall_falls_back_to_householder_on_rank_deficient_input():
    Y = torch.randn(3, 200, 40, generator=gen(2))
    Y[1] = 0.0  # CholeskyQR2 breaks down on it (singular Gram matrix)
    Q, R = qr_tall(Y)
    assert torch.isfinite(Q).all() and torch.isfinite(R).all()
    assert rel_err(Q.double() @ R, Y.double()) < 1e-5


def test_qr_tall_with_collected_checks_is_exact_and_reads_nothing_until_asked():
    """The GPU's way: CholeskyQR2 for every stack of blocks, its trust tests collected as tensors and read at once;
    a single narrow block keeps Householder, which has no test to collect."""
    Y = torch.randn(3, 200, 8, generator=gen(3))  # narrow: the checked path would take Householder
    checks: list[torch.Tensor] = []
    Q, R = qr_tall(Y, checks=checks)
    assert len(checks) == 2 and all(isinstance(c, torch.Tensor) for c in checks) and all_trusted(checks)
    assert float((Q.double().mT @ Q.double() - torch.eye(8, dtype=torch.float64)).abs().max()) < 1e-6
    assert rel_err(Q.double() @ R, Y.double()) < 1e-6
    Y[1] = 0.0
    failed: list[torch.Tensor] = []
    qr_tall(Y, checks=failed)
    assert not all_trusted(failed)  # the caller redoes its work with checked QRs
    assert all_trusted([])
    single: list[torch.Tensor] = []
    Q, R = qr_tall(Y[0], checks=single)
    assert single == [] and rel_err(Q.double() @ R, Y[0].double()) < 1e-6


@pytest.mark.parametrize("spectrum", ["random", "decaying"])
def test_block_krylov_with_deferred_checks_matches_the_checked_svd(spectrum):
    """On a GPU the randomized SVD reads its trust tests once; where they pass, its result is as accurate as the
    checked path's (run here on the CPU, where the arithmetic is the same). A spectrum that falls to float32's
    rounding within the basis (e^(-0.5 k) over 200 values) fails a test and is redone, as rank-deficient input is."""
    from fedspec.svd.truncated import _block_krylov, _gaussian_sketch

    g = gen(4)
    U, _ = torch.linalg.qr(torch.randn(300, 200, generator=g))
    V, _ = torch.linalg.qr(torch.randn(200, 200, generator=g))
    rate = {"random": None, "decaying": 0.05}[spectrum]
    W = torch.randn(300, 200, generator=g) if rate is None else (U * torch.exp(-rate * torch.arange(200.0))) @ V.T
    omega = _gaussian_sketch((200, 16), torch.float32, W.device, gen(5))
    deferred = _block_krylov(W, omega, 8, 3, checks=[])
    checked = _block_krylov(W, omega, 8, 3)
    assert deferred is not None
    err_deferred, err_checked = float(error_vs_exact(W, *deferred)), float(error_vs_exact(W, *checked))
    assert err_deferred <= err_checked * 1.01 + 1e-5, (err_deferred, err_checked)


def test_block_krylov_with_deferred_checks_asks_for_a_redo_on_rank_deficient_input():
    from fedspec.svd.truncated import _block_krylov, _gaussian_sketch

    W = torch.randn(300, 3, generator=gen(6)) @ torch.randn(3, 200, generator=gen(7))  # rank 3 < the basis
    omega = _gaussian_sketch((200, 16), torch.float32, W.device, gen(5))
    assert _block_krylov(W, omega, 8, 3, checks=[]) is None
    assert float(error_vs_exact(W, *_block_krylov(W, omega, 8, 3))) < 1e-4
    # A stack of zero matrices: its CholeskyQR2 passes fail and leave NaN, which must not reach eigh (it raises).
    assert _block_krylov(torch.zeros(3, 300, 200), omega, 8, 3, checks=[]) is None


def test_block_krylov_with_deferred_checks_asks_for_a_redo_on_a_wide_rank_deficient_matrix(monkeypatch):
    """A W with fewer rows than the Krylov basis is wide (m < k) skips the Gram matrix in the Rayleigh–Ritz step
    and took the SVD of W·P at once, without reading the basis's deferred trust tests: an untrusted basis was
    returned as it was, and the NaN a failed CholeskyQR2 pass leaves (a zero matrix in a stack) made
    torch.linalg.svd raise instead of the SVD being redone the checked way."""
    import fedspec.svd.truncated as truncated_module
    from fedspec.svd.truncated import _block_krylov, _gaussian_sketch

    omega = _gaussian_sketch((200, 16), torch.float32, torch.device("cpu"), gen(5))
    assert _block_krylov(torch.zeros(3, 20, 200), omega, 8, 3, checks=[]) is None
    W = torch.randn(3, 20, 200, generator=gen(8))
    W[1] = 0.0
    monkeypatch.setattr(truncated_module, "deferred_checks", lambda device: [])  # as on a GPU
    U, S, Vh = truncated_svd(W, 8, niter=3, oversample=8)
    assert all(torch.isfinite(t).all() for t in (U, S, Vh))
    assert float(error_vs_exact(W, U, S, Vh).max()) < 1e-5


def test_off_the_cpu_a_large_batch_of_narrow_blocks_uses_cholesky_qr():
    """torch runs a batch of Householder QRs matrix by matrix on a GPU: there a large stack of blocks goes through
    CholeskyQR2 (checked on the meta device: only the choice, not the arithmetic; tests/test_svd_gpu.py runs it)."""
    assert _householder_max_columns(torch.empty(32, 4096, 16, device="meta")) == 0
    assert _householder_max_columns(torch.empty(4, 4096, 16, device="meta")) == 16  # small batch: Householder
    assert _householder_max_columns(torch.empty(4096, 16, device="meta")) > 16
    assert _householder_max_columns(torch.empty(32, 4096, 16)) == 16  # the CPU keeps Householder


def test_batch_chunks_bound_the_stack():
    assert batch_chunks(list("abcde"), item_bytes=10, limit=25) == [["a", "b"], ["c", "d"], ["e"]]
    assert batch_chunks(["a", "b"], item_bytes=100, limit=10) == [["a"], ["b"]]  # never an empty chunk


def test_the_cpu_batches_small_layers_only():
    assert batch_bytes(torch.device("cpu")) == BATCH_BYTES


def test_group_by_shape_keys_on_shape_dtype_and_device():
    tensors = {
        "a": torch.zeros(2, 3),
        "b": torch.zeros(3, 2),
        "c": torch.zeros(2, 3),
        "d": torch.zeros(2, 3, dtype=torch.float64),
    }
    groups = list(group_by_shape(tensors).values())
    assert groups == [["a", "c"], ["b"], ["d"]]
    pairs = {"x": (torch.zeros(4, 2), torch.zeros(2, 5)), "y": (torch.zeros(4, 2), torch.zeros(2, 6))}
    pair_groups = group_by_shape(pairs)
    assert len(pair_groups) == 2


def test_a_rotation_step_that_cannot_be_captured_runs_eagerly_and_is_not_retried(monkeypatch):
    """On a GPU FedSVD's rotation replays a CUDA graph; where capture fails (a torch whose step syncs), the round
    must still run — eagerly, with one warning — and later rounds must not try again (checked here with the capture
    made to fail, on CPU tensors)."""
    attempts = []

    class FailingCapture:
        key_of = staticmethod(lambda stacks: ("shapes",))

        def __init__(self, fn, stacks):
            attempts.append(1)
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(refactor_module, "CapturedStep", FailingCapture)
    monkeypatch.setattr(refactor_module, "_uncapturable", set())
    monkeypatch.setattr(refactor_module, "_captured_rotation", None)
    B = torch.randn(3, 40, 4, generator=gen(11))
    A = torch.linalg.qr(torch.randn(3, 30, 4, generator=gen(12))).Q.mT
    with pytest.warns(RuntimeWarning, match="runs eagerly"):
        (B_new, A_new), = refactor_module._replay_rotation([(B, A)])
    assert rel_err(B_new @ A_new, B @ A) < 1e-5
    refactor_module._replay_rotation([(B, A)])
    assert len(attempts) == 1

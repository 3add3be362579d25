"""Top-r / bottom-r truncated SVD: exact, or randomized (block Krylov power iterations, or plain subspace iteration;
with niter=0 both are the Halko–Martinsson–Tropp range finder).

Why a module of its own rather than `torch.svd_lowrank`: that routine takes no oversampling
parameter separate from q, draws its sketch from the global RNG, and is silently wrong for
bottom-r components (a range finder only sees the top subspace — the SoMA fast-path bug). Here
oversampling, power iterations and the RNG are explicit, bottom-r is exact-only, and every
decomposition runs in float32/float64 without autograd.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch

from .eigh import small_eigh
from .orthonormal import all_trusted, deferred_checks, gram, orthonormal_columns, qr_tall
from .precision import PassBuffer, compute_dtype, pass_dtype

__all__ = ["METHODS", "RANDOMIZED", "error_vs_exact", "reconstruction_error", "truncated_svd"]

# "randomized" is block Krylov; "subspace" keeps only the last iterate (torch.svd_lowrank's scheme, what PEFT's
# pissa_niter_K runs, but oversampled).
METHODS: tuple[str, ...] = ("exact", "randomized", "subspace")
RANDOMIZED: tuple[str, ...] = ("randomized", "subspace")

SVDResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# Seed of the local generator used when the caller passes none: results must be reproducible and
# must not consume (or depend on) the global RNG that training and DP noise use.
DEFAULT_SEED = 0


@torch.no_grad()
def truncated_svd(
    W: torch.Tensor,
    rank: int,
    *,
    method: str = "randomized",
    smallest: bool = False,
    niter: int = 4,
    oversample: int = 8,
    generator: torch.Generator | None = None,
    pass_precision: str = "full",
    pass_buffer: PassBuffer | None = None,
) -> SVDResult:
    """Rank-`rank` truncated SVD of `W` (m, n) or a batch `W` (..., m, n).

    Returns `(U, S, Vh)` with shapes (..., m, r), (..., r), (..., r, n) in the compute dtype
    (float64 for float64 input, float32 otherwise). With `smallest=False` these are the top-r
    components; with `smallest=True` the last r components of the full SVD, so S is still
    non-increasing. Singular-vector signs are arbitrary: compare `U diag(S) Vh`, not factors.

    `method="exact"` slices a full `torch.linalg.svd`. `method="randomized"` draws a Gaussian
    block of `rank + oversample` columns (capped at min(m, n)) and runs `niter` power iterations
    that keep every iterate (randomized block Krylov: 2·niter + 1 passes over W); `niter=0` is the
    plain range finder (2 passes). Accuracy grows with both knobs; measure it against the exact
    truncated SVD with `fedspec.svd.error_vs_exact`. `method="subspace"` spends the same 2·niter + 1 passes on plain
    subspace iteration, keeping only the last iterate: its Rayleigh–Ritz problem is (rank + oversample)² rather than
    (niter + 1)² times that (a 24×24 eigenproblem instead of 120×120 at rank 16), which a GPU solves in one
    launch of the Jacobi kernel, where cuSOLVER takes ~1 ms per 120×120 matrix. For the same passes it lands
    farther from the exact top-r than block Krylov, and closer than `torch.svd_lowrank` without oversampling
    (docs/gpu.md: distances 0.34 / 0.058 / 0.60 for subspace / Krylov / PEFT's pissa_niter_4 on pretrained
    MiniLM, niter 4, oversample 8). The sketch comes from `generator`, or from a
    local generator seeded with 0 when it is None, so two calls with equal inputs give equal
    results; it is drawn on the generator's device and moved to W's, so a CPU generator drives a
    CUDA decomposition and every result lives on W's device. A batch shares one sketch: each matrix's
    is still a Gaussian drawn independently of that matrix, which is all the accuracy guarantees ask,
    and a matrix gets the same sketch whichever batch it is decomposed in.

    `pass_precision` (randomized only): "full" runs the passes over W in the compute dtype; "bfloat16" reads
    W in bf16 (float32 accumulation; every orthonormalization stays float32/64), several times faster where
    bf16 products are native, at a ~1e-3 relative noise floor (see `fedspec.svd.precision`); "auto" picks
    bf16 for float32 matrices on such hardware (from 256 × 256) and full precision otherwise. `pass_buffer` (a
    `fedspec.svd.PassBuffer`) holds that bf16 copy across calls, so a loop over layers allocates it once. A W
    that is already in the pass dtype (a bf16 model's weights) is read as it is: no copy of it is made at all.
    """
    m, n = _check_matrix(W, "W")
    rank = _check_rank(rank, m, n, tuple(W.shape))
    if method not in METHODS:
        raise ValueError(f"unknown SVD method {method!r}; allowed values: {', '.join(METHODS)}")
    if smallest and method in RANDOMIZED:
        raise ValueError(
            f"smallest=True is not supported with method={method!r}: a randomized range finder "
            "captures only the top singular subspace, so it cannot return the smallest components; "
            "use method='exact'"
        )
    passes = pass_dtype(pass_precision, W)  # validated for either method
    if method == "exact":
        return _exact(W.detach().to(compute_dtype(W.dtype)), rank, smallest)
    niter = _check_nonnegative_int(niter, "niter")
    oversample = _check_nonnegative_int(oversample, "oversample")
    iterate = _subspace_iteration if method == "subspace" else _block_krylov
    return _randomized(W.detach(), rank, niter, oversample, generator, passes, pass_buffer, iterate)


@torch.no_grad()
def reconstruction_error(W: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    """Relative Frobenius error ‖W − U diag(S) Vh‖ / ‖W‖, one value per matrix of a batch.

    Computed in the compute dtype of all inputs. For an all-zero W the absolute error is returned
    instead, so the result is always finite.
    """
    dtype = compute_dtype(W.dtype, U.dtype, S.dtype, Vh.dtype)
    W = W.detach().to(dtype)
    approx = (U.detach().to(dtype) * S.detach().to(dtype).unsqueeze(-2)) @ Vh.detach().to(dtype)
    err = torch.linalg.matrix_norm(W - approx)
    ref = torch.linalg.matrix_norm(W)
    return torch.where(ref > 0, err / torch.where(ref > 0, ref, torch.ones_like(ref)), err)


@torch.no_grad()
def error_vs_exact(
    W: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, *, smallest: bool = False
) -> torch.Tensor:
    """Relative Frobenius distance ‖U diag(S) Vh − W_r‖ / ‖W_r‖ to the exact rank-r truncated SVD W_r.

    The accuracy report of a (randomized) truncated SVD: 0 when it found the exact top-r (or, with
    `smallest=True`, bottom-r) components, up to ~√2 when it found unrelated ones. Costs a full SVD of
    W, so it is meant for tests and benchmarks, not for every call. One value per matrix of a batch;
    an exact W_r of zero gives the absolute distance instead.
    """
    rank = S.shape[-1]
    dtype = compute_dtype(W.dtype, U.dtype, S.dtype, Vh.dtype)
    W_r = _product(*_exact(W.detach().to(dtype), rank, smallest))
    approx = _product(U.detach().to(dtype), S.detach().to(dtype), Vh.detach().to(dtype))
    err = torch.linalg.matrix_norm(approx - W_r)
    ref = torch.linalg.matrix_norm(W_r)
    return torch.where(ref > 0, err / torch.where(ref > 0, ref, torch.ones_like(ref)), err)


def _product(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    return (U * S.unsqueeze(-2)) @ Vh


def _exact(W: torch.Tensor, rank: int, smallest: bool) -> SVDResult:
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    keep = slice(-rank, None) if smallest else slice(0, rank)
    return U[..., keep].contiguous(), S[..., keep].contiguous(), Vh[..., keep, :].contiguous()


def _randomized(
    W: torch.Tensor, rank: int, niter: int, oversample: int, generator: torch.Generator | None, passes: torch.dtype,
    buffer: PassBuffer | None, iterate: Callable[..., SVDResult | None],
) -> SVDResult:
    m, n = W.shape[-2:]
    block = min(rank + oversample, m, n)
    compute = compute_dtype(W.dtype)
    # One (n, block) sketch for the whole batch: drawing and orthonormalizing a sketch per matrix cost ~5% of
    # MiniLM's decomposition and bought nothing.
    omega = _gaussian_sketch((n, block), compute, W.device, generator)
    # What every pass reads: W itself when it is in the pass dtype already, else one copy of it in that dtype
    # (reduced-precision copies go to the reusable buffer).
    if W.dtype == passes:
        Wp = W
    elif passes == compute:
        Wp = W.to(compute)
    else:
        Wp = (buffer or PassBuffer()).copy(W, passes)
    if niter == 0:
        return _range_finder(Wp, omega, rank)
    checks = deferred_checks(W.device)
    if checks is not None:  # a GPU: one host read for the whole SVD, redone the checked way if a test failed
        result = iterate(Wp, omega, rank, niter, checks=checks)
        if result is not None:
            return result
    return iterate(Wp, omega, rank, niter)


def _times(Wp: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """W·X, reading W in its pass dtype; the result in X's (compute) dtype.

    Callers that want (W·X)ᵀ take this result's transpose: Xᵀ·Wᵀ, with W as a transposed operand, was as fast
    in float32 on MiniLM's shapes but up to 1.3× slower on 7B shapes, and ~60× slower in bf16 (381 against 6 ms
    for 11008 × 4096 on the CPU)."""
    return (Wp @ X.to(Wp.dtype)).to(X.dtype)


def _times_transposed(Wp: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Wᵀ·Y, computed as (Yᵀ·W)ᵀ: a row-major W streams faster this way. In bf16, Yᵀ is made contiguous first:
    with a transposed view the product took ~1.6× as long on the CPU (no difference in float32)."""
    Yt = Y.to(Wp.dtype).mT
    return ((Yt if Wp.dtype == Y.dtype else Yt.contiguous()) @ Wp).mT.to(Y.dtype)


def _range_finder(Wp: torch.Tensor, omega: torch.Tensor, rank: int) -> SVDResult:
    """Halko–Martinsson–Tropp without power iterations: Q spans W·Ω, then the SVD of Qᵀ·W (2 passes)."""
    Q = orthonormal_columns(_times(Wp, omega))
    Q2, R2 = qr_tall(_times_transposed(Wp, Q))  # Qᵀ·W = R2ᵀ·Q2ᵀ
    u, S, v = torch.linalg.svd(R2.mT)  # small, float64
    U = Q @ u[..., :rank].to(Q.dtype)
    Vh = v[..., :rank, :].to(Q.dtype) @ Q2.mT
    return U, S[..., :rank].to(Q.dtype), Vh


def _block_krylov(
    Wp: torch.Tensor, omega: torch.Tensor, rank: int, niter: int, checks: list[torch.Tensor] | None = None
) -> SVDResult | None:
    """Randomized block Krylov (Musco & Musco, 2015) on the row space, in 2·niter + 1 passes over W.

    Power iterations that keep every iterate: P spans {Ω, (WᵀW)Ω, ..., (WᵀW)^niter Ω} (orthonormalized
    block by block), and W·P is assembled from the products already computed, so no final Qᵀ·W pass is
    needed; the rank-r truncation of W·P·Pᵀ comes from a Rayleigh–Ritz step on W·P. For the same number
    of passes this captures far more of the top-r energy than plain subspace iteration when the spectrum
    is flat (random or barely trained weights), where the top singular values have tiny gaps.

    The bases are kept transposed, blocks as rows of Pᵀ and (W·P)ᵀ: LAPACK's Q is column-major, so Pᵀ is a
    contiguous block of rows (a plain copy into the basis, where a strided copy into columns cost as much as one
    pass on MiniLM's layers), the Gram–Schmidt products read row-major operands, and the Wᵀ pass reads the rows
    of (W·P)ᵀ as they are: (WᵀW·P)ᵀ = (W·P)ᵀ·W.

    With `checks` (a list, on a GPU) a batch's orthonormalizations are CholeskyQR2 with their trust tests left on
    the device, read once in the Rayleigh–Ritz step; None is returned if one failed (the caller redoes the SVD).
    """
    n, b = omega.shape[-2:]
    blocks = min(niter + 1, -(-n // b))  # stop once the basis spans the whole row space: W·P·Pᵀ = W
    total = min(blocks * b, n)
    # Preallocated and filled block by block: growing them by concatenation allocated (and page-faulted) a
    # fresh copy per iteration, a measurable share of the cost on small layers.
    basis_t = omega.new_empty(*Wp.shape[:-2], total, n)  # rows: Pᵀ
    image_t = omega.new_empty(*Wp.shape[:-2], total, Wp.shape[-2])  # rows: (W·P)ᵀ
    P_t, width = orthonormal_columns(omega, checks=checks).mT, 0
    while True:
        k = P_t.shape[-2]
        basis_t[..., width:width + k, :] = P_t
        image_t[..., width:width + k, :] = _times(Wp, P_t.mT).mT
        width += k
        if width == total:
            break
        Z_t = _times_transposed(Wp, image_t[..., width - k:width, :][..., : total - width, :].mT).mT  # (WᵀW·P_i)ᵀ
        done_t = basis_t[..., :width, :]
        # Block Gram–Schmidt against the earlier blocks, normalizing after each projection: what is left of Z once
        # the top directions are removed can be ~eps of its norm, and only a re-normalized later pass makes that
        # remainder orthogonal to the basis in float32. (Two projections and a single orthonormalization failed:
        # the remainder's columns are nearly collinear, and the QR of that ill-conditioned block is not accurate
        # enough relative to its smallest directions.) Three passes, not the textbook two: once the Krylov space
        # is exhausted (W of rank below the basis width) the remainder is pure rounding noise, and after two
        # passes the basis was up to 9e-4 from orthonormal on an AMD CPU's MKL (random rank-k W, k < r: relative
        # reconstruction errors up to 0.27; with three, 4e-7 at no measurable cost).
        for _ in range(3):
            Z_t = orthonormal_columns((Z_t - (Z_t @ done_t.mT) @ done_t).mT, checks=checks).mT
        P_t = Z_t
    return _rayleigh_ritz(image_t, basis_t, rank, checks)


def _subspace_iteration(
    Wp: torch.Tensor, omega: torch.Tensor, rank: int, niter: int, checks: list[torch.Tensor] | None = None
) -> SVDResult | None:
    """Randomized subspace iteration on the row space (Halko, Martinsson & Tropp, 2011, alg. 4.4), 2·niter + 1
    passes over W: Pᵀ spans (WᵀW)^niter·Ω, orthonormalized after every pass (W·P too), then Rayleigh–Ritz on W·P.
    Same bases-as-rows layout and `checks` contract as :func:`_block_krylov`."""
    P_t = orthonormal_columns(omega, checks=checks).mT
    for _ in range(niter):
        Y = orthonormal_columns(_times(Wp, P_t.mT), checks=checks)
        P_t = orthonormal_columns(_times_transposed(Wp, Y), checks=checks).mT
    return _rayleigh_ritz(_times(Wp, P_t.mT).mT, P_t, rank, checks)


# The Gram matrix of W·P gives its top-r singular triplets exactly enough (float64, relative error ~eps·κ²)
# while σ_r ≥ this share of σ_1; below it, or for a zero W, a thin QR first keeps them accurate and finite.
_GRAM_MIN_SINGULAR_RATIO = 1e-4


def _rayleigh_ritz(
    image_t: torch.Tensor, basis_t: torch.Tensor, rank: int, checks: list[torch.Tensor] | None = None
) -> SVDResult | None:
    """Top-r SVD of W·P·Pᵀ from the transposed image (W·P)ᵀ (..., k, m) and orthonormal basis Pᵀ (..., k, n).

    With `checks`, the basis's trust tests are read together with this step's own, and None is returned when
    any failed (the caller redoes the SVD with tests read as they come).
    """
    dtype = image_t.dtype
    image = image_t.mT
    if image.shape[-2] < image.shape[-1]:  # W has fewer rows than the basis is wide: W·P is small anyway
        if checks is not None and not all_trusted(checks):  # read first: NaN from an untrusted QR makes svd raise
            return None
        U, S, Vr = torch.linalg.svd(image, full_matrices=False)
        return U[..., :rank], S[..., :rank], Vr[..., :rank, :] @ basis_t
    # (W·P)ᵀ(W·P) = V·Σ²·Vᵀ: one product and a k×k eigendecomposition instead of a thin QR (two Gram matrices
    # and two products in CholeskyQR2) followed by an SVD.
    # Converted before transposing: converting the transposed view was 5× slower.
    G = gram(image_t.to(torch.float64).mT)
    if checks is not None:  # an untrusted QR may have left NaN, and eigh raises on it before the tests are read
        G = torch.nan_to_num(G, nan=0.0, posinf=0.0, neginf=0.0)
    evals, evecs = small_eigh(G)
    S = evals[..., -rank:].flip(-1).clamp_min(0).sqrt()
    conditioned = (S[..., -1] >= _GRAM_MIN_SINGULAR_RATIO * S[..., 0]) & (S[..., 0] > 0)
    if checks is not None and not all_trusted([*checks, conditioned.all()]):  # the SVD's one host read
        return None
    if checks is not None or bool(conditioned.all()):  # (checked already, or) one host read
        V = evecs[..., -rank:].flip(-1)
        U = image @ (V / S.unsqueeze(-2)).to(dtype)
        return U, S.to(dtype), V.to(dtype).mT @ basis_t
    Q, R = qr_tall(image)  # W·P = Q·R
    Ur, S, Vr = torch.linalg.svd(R)  # small, float64: R = Ur·S·Vr  =>  W·P·Pᵀ = (Q·Ur)·S·(Vr·Pᵀ)
    U = Q @ Ur[..., :rank].to(dtype)
    Vh = Vr[..., :rank, :].to(dtype) @ basis_t
    return U, S[..., :rank].to(dtype), Vh


def _gaussian_sketch(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """Draw the test matrix on the generator's device, then move it.

    Drawing on the generator's own device lets a CPU generator drive a CUDA decomposition, so a
    given seed gives the same sketch whichever device the matrix lives on.
    """
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(DEFAULT_SEED)
    omega = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
    return omega.to(device)


def _check_matrix(W: torch.Tensor, name: str) -> tuple[int, int]:
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(W).__name__}")
    if W.ndim < 2:
        raise ValueError(f"{name} must be a matrix (m, n) or a batch (..., m, n), got shape {tuple(W.shape)}")
    return int(W.shape[-2]), int(W.shape[-1])


def _check_rank(rank: int, m: int, n: int, shape: tuple[int, ...]) -> int:
    if isinstance(rank, bool):
        raise TypeError(f"rank must be an int, got {rank!r}")
    try:
        rank = operator.index(rank)
    except TypeError:
        raise TypeError(f"rank must be an int, got {type(rank).__name__}") from None
    if not 1 <= rank <= min(m, n):
        raise ValueError(
            f"rank={rank} is out of range for a matrix of shape {shape}: "
            f"allowed 1 <= rank <= min(m, n) = {min(m, n)}"
        )
    return rank


def _check_nonnegative_int(value: int, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value

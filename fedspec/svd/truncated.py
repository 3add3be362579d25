"""Top-r / bottom-r truncated SVD: exact, or randomized (Halko–Martinsson–Tropp).

Why a module of its own rather than `torch.svd_lowrank`: that routine takes no oversampling
parameter separate from q, draws its sketch from the global RNG, and is silently wrong for
bottom-r components (a range finder only sees the top subspace — the SoMA fast-path bug). Here
oversampling, power iterations and the RNG are explicit, bottom-r is exact-only, and every
decomposition runs in float32/float64 without autograd.
"""

from __future__ import annotations

import operator

import torch

from .precision import compute_dtype

__all__ = ["METHODS", "reconstruction_error", "truncated_svd"]

METHODS: tuple[str, ...] = ("exact", "randomized")

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
) -> SVDResult:
    """Rank-`rank` truncated SVD of `W` (m, n) or a batch `W` (..., m, n).

    Returns `(U, S, Vh)` with shapes (..., m, r), (..., r), (..., r, n) in the compute dtype
    (float64 for float64 input, float32 otherwise). With `smallest=False` these are the top-r
    components; with `smallest=True` the last r components of the full SVD, so S is still
    non-increasing. Singular-vector signs are arbitrary: compare `U diag(S) Vh`, not factors.

    `method="exact"` slices a full `torch.linalg.svd`. `method="randomized"` sketches the range
    with `rank + oversample` Gaussian columns (capped at min(m, n)) and refines it with `niter`
    QR-stabilized power iterations; the sketch comes from `generator`, or from a local generator
    seeded with 0 when it is None, so two calls with equal inputs give equal results.
    """
    m, n = _check_matrix(W, "W")
    rank = _check_rank(rank, m, n, tuple(W.shape))
    if method not in METHODS:
        raise ValueError(f"unknown SVD method {method!r}; allowed values: {', '.join(METHODS)}")
    if smallest and method == "randomized":
        raise ValueError(
            "smallest=True is not supported with method='randomized': a randomized range finder "
            "captures only the top singular subspace, so it cannot return the smallest components; "
            "use method='exact'"
        )
    Wc = W.detach().to(compute_dtype(W.dtype))
    if method == "exact":
        return _exact(Wc, rank, smallest)
    niter = _check_nonnegative_int(niter, "niter")
    oversample = _check_nonnegative_int(oversample, "oversample")
    return _randomized(Wc, rank, niter, oversample, generator)


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


def _exact(W: torch.Tensor, rank: int, smallest: bool) -> SVDResult:
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    keep = slice(-rank, None) if smallest else slice(0, rank)
    return U[..., keep].contiguous(), S[..., keep].contiguous(), Vh[..., keep, :].contiguous()


def _randomized(
    W: torch.Tensor, rank: int, niter: int, oversample: int, generator: torch.Generator | None
) -> SVDResult:
    m, n = W.shape[-2:]
    q = min(rank + oversample, m, n)
    omega = _gaussian_sketch((*W.shape[:-2], n, q), W, generator)
    Q = _orthonormal_basis(W @ omega)
    Wt = W.mT
    for _ in range(niter):
        # Re-orthonormalize after every product: plain (W Wᵀ)^k W Ω collapses onto the top singular
        # vector in floating point and loses the rest of the subspace.
        Q = _orthonormal_basis(W @ _orthonormal_basis(Wt @ Q))
    Ub, S, Vh = torch.linalg.svd(Q.mT @ W, full_matrices=False)
    U = Q @ Ub[..., :rank]
    return U, S[..., :rank].contiguous(), Vh[..., :rank, :].contiguous()


def _gaussian_sketch(
    shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Draw the test matrix on the generator's device, then move it.

    Drawing on the generator's own device lets a CPU generator drive a CUDA decomposition, so a
    given seed gives the same sketch whichever device the matrix lives on.
    """
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(DEFAULT_SEED)
    omega = torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype)
    return omega.to(like.device)


def _orthonormal_basis(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y, mode="reduced").Q


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

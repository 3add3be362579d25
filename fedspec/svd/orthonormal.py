"""Orthonormal bases of tall-skinny matrices: Householder for narrow blocks, Cholesky QR for wide ones (and for
stacks of blocks on a GPU).

Every randomized SVD and every FedSVD re-factorization orthonormalizes tall-skinny blocks (m × b with
b ≤ ~100 and m in the thousands). LAPACK's Householder QR works column by column; for a few dozen columns
that is fast, for wider blocks it measured about 10× slower than the two matrix products of Cholesky QR.
CholeskyQR2 (Yamamoto et al., 2015) is as accurate as Householder when the Gram matrix is formed in
float64 and the input's condition number stays below ~1e7; where the Cholesky factorization breaks down
(rank-deficient input, e.g. an all-zero update) the call falls back to Householder, so the result is
always an orthonormal basis — never NaN.
"""

from __future__ import annotations

import math

import torch

__all__ = ["all_trusted", "deferred_checks", "gram", "orthonormal_columns", "qr_tall"]


def qr_tall(Y: torch.Tensor, *, checks: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR `Y = Q R` of (a batch of) tall matrices (..., m, b), m ≥ b.

    Q has Y's dtype and device with orthonormal columns; R is (..., b, b) upper triangular in float64
    (it feeds small float64 decompositions). Householder is used when CholeskyQR2 cannot be trusted.

    `checks`: a list that collects CholeskyQR2's trust tests as tensors instead of reading each back to the host,
    which on a GPU is a synchronization per QR. Every stack of blocks then takes CholeskyQR2 (a single narrow block
    keeps Householder, which needs no test), and the caller reads all the tests at once with :func:`all_trusted`
    and redoes its work without `checks` if one failed (the result of an untrusted pass may hold NaN). Measured on
    an H200 (docs/gpu.md): with the tests deferred, CholeskyQR2 of stacks of 2–8 layers made a batched PiSSA init
    of a 7B-shaped model 1.7× faster, while CholeskyQR2 of single 24-column blocks made one layer's SVD 2.2× slower
    than Householder. Meant for GPUs; on a CPU it works the same (tests use it) but is not faster.
    """
    m, b = Y.shape[-2:]
    if m < b:
        raise ValueError(f"qr_tall needs a tall matrix (m >= b), got shape {tuple(Y.shape)}")
    stack = math.prod(Y.shape[:-2]) > 1
    if b <= (0 if checks is not None and stack else _householder_max_columns(Y)):
        Q, R = torch.linalg.qr(Y, mode="reduced")
        return Q, R.to(torch.float64)
    if checks is not None:
        Q1, R1, trusted1 = _cholesky_pass(Y.to(torch.float64))
        Q2, R2, trusted2 = _cholesky_pass(Q1)
        checks += [trusted1.all(), trusted2.all()]
        return Q2.to(Y.dtype), R2 @ R1
    Yd = Y.to(torch.float64)
    Q1, R1, ok1 = _cholesky_qr(Yd)
    if ok1:
        Q2, R2, ok2 = _cholesky_qr(Q1)
        if ok2:
            return Q2.to(Y.dtype), R2 @ R1
    Q, R = torch.linalg.qr(Yd, mode="reduced")
    return Q.to(Y.dtype), R


# On a GPU the engine's decompositions collect every trust test (CholeskyQR2's, the Rayleigh–Ritz conditioning) on
# the device and read them back once, at the end; if one failed, the work is redone with tests read as they come
# (the CPU's way), which picks Householder QRs where they are needed. Each host read is a synchronization that
# stalls the launch queue, and a 7B layer's randomized SVD made about a dozen of them.
GPU_DEFERRED_CHECKS = True


def deferred_checks(device: torch.device) -> list[torch.Tensor] | None:
    """A list to collect `qr_tall`'s trust tests in, for work on `device`; None where they are read as they come."""
    return [] if device.type != "cpu" and GPU_DEFERRED_CHECKS else None


def all_trusted(checks: list[torch.Tensor]) -> bool:
    """Whether every trust test `qr_tall(..., checks=...)` collected passed: one host read for all of them."""
    return not checks or bool(torch.stack(checks).all())


def orthonormal_columns(Y: torch.Tensor, *, checks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """An orthonormal basis of the column space of tall Y (..., m, b): the Q of :func:`qr_tall`."""
    return qr_tall(Y, checks=checks)[0]


# Up to this many columns LAPACK's Householder QR was the faster of the two (about 1 ms for 11008 × 16 on
# 2 cores). Wider, it was erratic: 6 × 1536 × 24 took 117 ms and 6 × 1536 × 32 took 515 ms where
# CholeskyQR2, whose cost is two matrix products, took 4 ms.
HOUSEHOLDER_MAX_COLUMNS = 16
# For a single matrix (no batch) Householder stayed ahead up to 24 columns: 11008 × 24 in 1.7 ms against 5.3 ms for
# CholeskyQR2 (4096 × 24: 0.7 against 1.3 ms); at 32 columns CholeskyQR2 was faster again (1.0 against 1.5 ms).
HOUSEHOLDER_MAX_COLUMNS_SINGLE = 24
# On a GPU torch runs a batch of Householder QRs matrix by matrix (a cuSOLVER call each), so its cost grows with
# the batch while CholeskyQR2 stays a few batched products. Measured on an H200 (same run): the QRs of 32 stacked
# r = 16 factors of a 7B adapter set 36 → 8 ms with CholeskyQR2, a randomized SVD of 25 stacked 384² layers 18 → 11
# ms; at batches of 2–8 Householder was about as fast or faster (6 × 1536 × 384: 6 against 10 ms).
GPU_CHOLESKY_MIN_BATCH = 16


def _householder_max_columns(Y: torch.Tensor) -> int:
    """Up to how many columns Householder QR is preferred to CholeskyQR2 for Y (see the limits above)."""
    batch = math.prod(Y.shape[:-2])
    if Y.device.type != "cpu" and batch >= GPU_CHOLESKY_MIN_BATCH:
        return 0
    return HOUSEHOLDER_MAX_COLUMNS_SINGLE if batch == 1 else HOUSEHOLDER_MAX_COLUMNS


# Largest condition number of the Gram matrix accepted from one Cholesky QR pass in float64: beyond it
# the first pass's Q can be too far from orthonormal for the second pass to repair.
_MAX_GRAM_CONDITION = 1e13


def gram(X: torch.Tensor) -> torch.Tensor:
    """XᵀX for tall X (..., m, b), in X's dtype.

    A single long matrix (m ≥ GRAM_BLOCKED_MIN_ROWS) is summed over up to 16 row blocks with one batched
    product: its (b × m)·(m × b) product, with a long inner dimension and a tiny output, barely parallelizes
    on the CPU (11008 × 32: 1.3× slower than the blocked sum). A batch of matrices is parallel already, and
    there the blocked sum measured up to 1.5× slower than one batched product (25 × 384 × 32).
    """
    m, b = X.shape[-2:]
    if math.prod(X.shape[:-2]) > 1 or m < GRAM_BLOCKED_MIN_ROWS:
        return X.mT @ X
    blocks = next((c for c in (16, 8, 4, 2) if m % c == 0 and m // c >= b), 1)
    if blocks == 1:
        return X.mT @ X
    Xb = X.reshape(*X.shape[:-2], blocks, m // blocks, b)
    return (Xb.mT @ Xb).sum(dim=-3)


# From this many rows a single matrix's Gram matrix is summed over row blocks (see `gram`); at 4096 rows the two
# ways tied.
GRAM_BLOCKED_MIN_ROWS = 8192


def _cholesky_qr(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One Cholesky QR pass in float64: G = YᵀY = RᵀR, Q = Y R⁻¹. Returns (Q, R, trustworthy)."""
    G, R, trusted = _cholesky_factor(Y)
    if not bool(trusted.all()):  # one host read for the three tests (a synchronization on a GPU)
        return Y, G, False
    return Y @ _upper_inverse(R), R, True


def _cholesky_pass(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Cholesky QR pass whose trust tests stay on the device: (Q, R, trusted), Q meaningless where not trusted."""
    _, R, trusted = _cholesky_factor(Y)
    return Y @ _upper_inverse(R), R, trusted


def _cholesky_factor(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """G = YᵀY, its Cholesky factor R (G = RᵀR) and, per matrix, whether the pass can be trusted (a device tensor)."""
    G = gram(Y)
    L, info = torch.linalg.cholesky_ex(G)
    diag = torch.diagonal(L, dim1=-2, dim2=-1)
    smallest, largest = diag.amin(dim=-1), diag.amax(dim=-1)
    # cond(G) >= (max diag(L) / min diag(L))²: a cheap lower bound that catches near-singular input. (A failed
    # factorization can leave NaN in L, which fails the `> 0` test; `info` catches it as well.)
    trusted = (info == 0) & (smallest > 0) & ((largest / smallest) ** 2 <= _MAX_GRAM_CONDITION)
    return G, L.mT, trusted


def _upper_inverse(R: torch.Tensor) -> torch.Tensor:
    """R⁻¹ of upper-triangular R. Y·R⁻¹ is then one matrix product with the small explicit inverse: a batched
    triangular solve of a tall matrix runs matrix by matrix on the CPU and was the slowest step; CholeskyQR2's
    second pass absorbs the slightly larger rounding error of the explicit inverse."""
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device).expand_as(R)
    return torch.linalg.solve_triangular(R, eye, upper=True)

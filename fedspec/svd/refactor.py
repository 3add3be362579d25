"""Exact SVD of a low-rank product B·A without forming it (the FedSVD re-factorization).

FedSVD re-factorizes `M = B·A` every round so that A has orthonormal rows and B = UΣ holds all
singular values. rank(M) <= r, so the rank-r SVD is exact and the model function is unchanged.
A dense m×n SVD would cost O(m·n·min(m, n)) (seconds per 4096² layer on a CPU); going through
thin QRs and an r×r SVD costs O((m + n)·r²) (sub-millisecond). See notes/fedsvd.md §4.

Convention: B is (..., m, r), A is (..., r, n), as PEFT's lora_B / lora_A. The scale α/r stays
outside: callers re-factorize B·A, not s·B·A.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .grouping import group_by_shape
from .precision import compute_dtype

__all__ = ["refactor_lowrank", "refactor_lowrank_grouped"]

LowRankPair = tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()
def refactor_lowrank(
    B: torch.Tensor, A: torch.Tensor, *, assume_orthonormal_rows: bool = False
) -> LowRankPair:
    """Return `(B_new, A_new)` with `B_new @ A_new == B @ A`, A_new rows orthonormal, B_new = UΣ.

    Shapes: B (..., m, r), A (..., r, n) with broadcastable leading dims; the result has the same
    (broadcast) shapes. The columns of B_new have non-negative, non-increasing norms (the singular
    values of B·A). Computes in float64 if either input is float64, else float32, and returns
    B_new in B's dtype and A_new in A's dtype. Needs n >= r (r orthonormal rows must fit in n
    dimensions); m < r is allowed and pads B_new with zero columns.

    `assume_orthonormal_rows=True` skips the QR of A — valid only when A already has orthonormal
    rows (every FedSVD round after the first): B = U S W gives B_new = U S and A_new = W A. The
    flag is trusted, not checked; with a non-orthonormal A the product is still preserved but
    A_new's rows are not orthonormal.

    Rank-deficient input (e.g. B = 0 for a layer no client updated) gives zero singular values
    and arbitrary but orthonormal directions: never NaN or Inf.
    """
    m, r, n = _check_pair(B, A)
    dtype = compute_dtype(B.dtype, A.dtype)
    batch = torch.broadcast_shapes(B.shape[:-2], A.shape[:-2])
    Bc = B.detach().to(dtype).expand(*batch, m, r)
    Ac = A.detach().to(dtype).expand(*batch, r, n)
    if assume_orthonormal_rows:
        B_new, A_new = _refactor_orthonormal(Bc, Ac)
    else:
        B_new, A_new = _refactor_two_sided(Bc, Ac)
    return B_new.to(B.dtype), A_new.to(A.dtype)


@torch.no_grad()
def refactor_lowrank_grouped(
    pairs: Mapping[str, LowRankPair], *, assume_orthonormal_rows: bool = False
) -> dict[str, LowRankPair]:
    """Re-factorize many named (B, A) pairs with one batched call per (shape, dtype, device) group.

    The server re-factorizes every adapted layer of a model each round; layers of one shape
    (all q_proj of a transformer, say) go through a single stacked QR/SVD instead of a Python
    loop of tiny decompositions. Returns a new dict with the input's keys, in the input's order.
    """
    out: dict[str, LowRankPair] = {}
    for names in group_by_shape(pairs).values():
        B_stack = torch.stack([pairs[name][0] for name in names])
        A_stack = torch.stack([pairs[name][1] for name in names])
        B_new, A_new = refactor_lowrank(B_stack, A_stack, assume_orthonormal_rows=assume_orthonormal_rows)
        for name, b, a in zip(names, B_new.unbind(0), A_new.unbind(0)):
            out[name] = (b, a)
    return {name: out[name] for name in pairs}


def _refactor_two_sided(B: torch.Tensor, A: torch.Tensor) -> LowRankPair:
    # B = Q_b R_b, Aᵀ = Q_a R_a  =>  B·A = Q_b (R_b R_aᵀ) Q_aᵀ, and an SVD of the small core
    # R_b R_aᵀ = u s vh gives B·A = (Q_b u) s (vh Q_aᵀ) with both outer factors orthonormal.
    # Householder QR returns an orthonormal Q even for zero or rank-deficient input, which is what
    # keeps A_new orthonormal when B = 0.
    Q_b, R_b = torch.linalg.qr(B, mode="reduced")  # (m, k), (k, r) with k = min(m, r)
    Q_a, R_a = torch.linalg.qr(A.mT, mode="reduced")  # (n, r), (r, r); n >= r is checked
    u, s, vh = _svd_square_right(R_b @ R_a.mT)
    B_new = _pad_columns(Q_b @ (u * s.unsqueeze(-2)), B.shape[-1])
    return B_new, vh @ Q_a.mT


def _refactor_orthonormal(B: torch.Tensor, A: torch.Tensor) -> LowRankPair:
    # A = Q_aᵀ already, so only B needs decomposing: B = U S W  =>  B·A = U S (W A).
    U, S, W = _svd_square_right(B)
    return _pad_columns(U * S.unsqueeze(-2), B.shape[-1]), W @ A


def _svd_square_right(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of X (p, r) with a square r×r right factor, and U thin: (p, k), (k,), (r, r), k = min(p, r).

    For p >= r the thin SVD already has a square right factor and avoids a p×p U (p can be 4096).
    For p < r the full SVD is needed so that the right factor spans all r rows; its U is only p×p.
    """
    p, r = X.shape[-2:]
    return torch.linalg.svd(X, full_matrices=p < r)


def _pad_columns(X: torch.Tensor, width: int) -> torch.Tensor:
    """Append zero columns (zero singular values) up to `width`; a no-op when already that wide."""
    missing = width - X.shape[-1]
    if missing == 0:
        return X
    return torch.nn.functional.pad(X, (0, missing))


def _check_pair(B: torch.Tensor, A: torch.Tensor) -> tuple[int, int, int]:
    for name, t in (("B", B), ("A", A)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim < 2:
            raise ValueError(f"{name} must be a matrix or a batch of matrices, got shape {tuple(t.shape)}")
    m, r = B.shape[-2:]
    r_a, n = A.shape[-2:]
    if r != r_a:
        raise ValueError(
            f"inner dimensions differ: B has shape {tuple(B.shape)} (..., m, r) and A has shape "
            f"{tuple(A.shape)} (..., r, n); B's last dim must equal A's second-to-last"
        )
    if min(m, r, n) < 1:
        raise ValueError(f"empty factor: B {tuple(B.shape)}, A {tuple(A.shape)}; m, r and n must be >= 1")
    if n < r:
        raise ValueError(
            f"cannot re-factorize B {tuple(B.shape)} · A {tuple(A.shape)}: A_new needs r={r} orthonormal "
            f"rows of length n={n}, which requires n >= r"
        )
    try:
        torch.broadcast_shapes(B.shape[:-2], A.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"batch dims of B {tuple(B.shape[:-2])} and A {tuple(A.shape[:-2])} do not broadcast"
        ) from None
    return int(m), int(r), int(n)

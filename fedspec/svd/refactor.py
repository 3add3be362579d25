"""Exact SVD of a low-rank product B·A without forming it (the FedSVD re-factorization).

FedSVD re-factorizes `M = B·A` every round so that A has orthonormal rows and B = UΣ holds all
singular values. rank(M) <= r, so the rank-r SVD is exact and the model function is unchanged.
A dense m×n SVD would cost O(m·n·min(m, n)) (a minute per 4096² layer on 2 CPU cores); going through
a thin QR of Aᵀ and the r×r Gram matrix of B costs O((m + n)·r²) (about a millisecond). When A already
has orthonormal rows — every FedSVD round after the first, because clients do not train A — even the QR
is skipped: only an r×r rotation is computed (the eigenvectors of BᵀB).

Convention: B is (..., m, r), A is (..., r, n), as PEFT's lora_B / lora_A. The scale α/r stays
outside: callers re-factorize B·A, not s·B·A.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch

from .captured import CapturedStep
from .eigh import small_eigh, sync_free_eigh
from .grouping import group_by_shape
from .orthonormal import all_trusted, deferred_checks, gram, qr_tall
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
    rows (every FedSVD round after the first): the eigenvectors V of the r×r Gram matrix BᵀB give
    B_new = B V and A_new = Vᵀ A. The flag is trusted, not checked; with a non-orthonormal A the
    product is still preserved but A_new's rows are not orthonormal.

    Everything runs on the inputs' device (cuBLAS/cuSOLVER, and the Jacobi kernel, for CUDA tensors); the small r×r
    decompositions run in float64 there too.

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
    if m < r:  # rank(B·A) <= m: the trailing singular values are exactly zero, not rounding noise
        B_new[..., m:] = 0
    return B_new.to(B.dtype), A_new.to(A.dtype)


@torch.no_grad()
def refactor_lowrank_grouped(
    pairs: Mapping[str, LowRankPair], *, assume_orthonormal_rows: bool = False
) -> dict[str, LowRankPair]:
    """Re-factorize many named (B, A) pairs, batched per (shape, dtype, device) group.

    The server re-factorizes every adapted layer of a model each round. In the general path, layers of
    one shape (all q_proj of a transformer, say) go through a single stacked call of
    :func:`refactor_lowrank`. With `assume_orthonormal_rows=True` (FedSVD after its first round) the
    only decomposition is the eigendecomposition of each layer's r×r Gram matrix BᵀB. On the CPU those
    are batched into one call per group while the two thin products per layer (B·V and Vᵀ·A) run on the
    layers' own tensors: copying the factors into a stack cost more there than the products it would
    batch. On a GPU the group is stacked like the general path: copies are nearly free there, and the
    per-layer products were ~8 kernel launches a layer (224 layers of a 7B model: ~1,800 launches), and the whole
    stacked step is captured in a CUDA graph on its first call and replayed after (`GPU_CAPTURE_ROTATION`).
    Returns a new dict with the input's keys, in the input's order.
    """
    out: dict[str, LowRankPair] = {}
    stacked: list[tuple[list[str], torch.Tensor, torch.Tensor]] = []  # (names, B stack, A stack) per group
    for signature, names in group_by_shape(pairs).items():
        _, _, device = signature[0]  # B's (shape, dtype, device)
        if assume_orthonormal_rows and device.type == "cpu":
            rotated = _rotate_group([pairs[name][0] for name in names], [pairs[name][1] for name in names])
            out.update(zip(names, rotated))
            continue
        stacked.append((names, torch.stack([pairs[name][0] for name in names]),
                        torch.stack([pairs[name][1] for name in names])))
    results = _refactor_stacks([(B, A) for _, B, A in stacked], assume_orthonormal_rows)
    for (names, _, _), (B_new, A_new) in zip(stacked, results):
        out.update(zip(names, zip(B_new.unbind(0), A_new.unbind(0))))
    return {name: out[name] for name in pairs}


# FedSVD's rotation step (every round after the first) on a GPU replays a CUDA graph captured on its first call for
# the adapter set's shapes: one launch instead of ~10 per layer group. False runs it eagerly.
GPU_CAPTURE_ROTATION = True
_captured_rotation: CapturedStep | None = None  # the last adapter set's graph: a server refactors one adapter set


def _refactor_stacks(stacks: list[LowRankPair], assume_orthonormal_rows: bool) -> list[LowRankPair]:
    """refactor_lowrank of each (B, A) stack; on a GPU, the rotation shortcut through a captured CUDA graph."""
    if assume_orthonormal_rows and stacks and _capturable(stacks):
        return _replay_rotation(stacks)
    return [refactor_lowrank(B, A, assume_orthonormal_rows=assume_orthonormal_rows) for B, A in stacks]


def _capturable(stacks: list[LowRankPair]) -> bool:
    """Whether the rotation of these stacks runs without a host read (so a CUDA graph can hold it)."""
    if not GPU_CAPTURE_ROTATION or not all(t.is_cuda for pair in stacks for t in pair):
        return False
    return all(sync_free_eigh(B.shape[-1], B.device) for B, _ in stacks)


def _replay_rotation(stacks: list[LowRankPair]) -> list[LowRankPair]:
    global _captured_rotation
    key = CapturedStep.key_of(stacks)
    if key in _uncapturable:
        return _rotate_stacks(stacks)
    if _captured_rotation is None or _captured_rotation.key != key:
        _captured_rotation = None  # free the old graph's memory before capturing the new one
        try:
            _captured_rotation = CapturedStep(_rotate_stacks, stacks)
        except RuntimeError as error:  # a torch or driver where some step syncs: run eagerly, never fail a round
            _uncapturable.add(key)
            warnings.warn(f"FedSVD's rotation step could not be captured in a CUDA graph ({error}); it runs eagerly",
                          RuntimeWarning, stacklevel=2)
            return _rotate_stacks(stacks)
    return _captured_rotation(stacks)


_uncapturable: set[tuple] = set()  # adapter-set shapes whose capture failed once


def _rotate_stacks(stacks: list[LowRankPair]) -> list[LowRankPair]:
    return [refactor_lowrank(B, A, assume_orthonormal_rows=True) for B, A in stacks]


def _rotate_group(Bs: list[torch.Tensor], As: list[torch.Tensor]) -> list[LowRankPair]:
    """The orthonormal-rows shortcut for same-shape layers: one batched r×r eigendecomposition."""
    m, r, _ = _check_pair(Bs[0], As[0])
    dtype = compute_dtype(Bs[0].dtype, As[0].dtype)
    V_all, _ = _eigh_descending(torch.stack([_gram(B.detach().to(dtype)) for B in Bs]))
    result = []
    for B, A, V in zip(Bs, As, V_all.unbind(0)):
        B_new = B.detach().to(dtype) @ V.to(dtype)
        if m < r:
            B_new[..., m:] = 0
        result.append((B_new.to(B.dtype), (V.mT.to(dtype) @ A.detach().to(dtype)).to(A.dtype)))
    return result


def _refactor_two_sided(B: torch.Tensor, A: torch.Tensor) -> LowRankPair:
    checks = deferred_checks(A.device)  # on a GPU: QR trust tests read once, the QR redone checked if one failed
    if checks is not None:
        result = _two_sided(B, A, checks)
        if all_trusted(checks):
            return result
    return _two_sided(B, A, None)


def _two_sided(B: torch.Tensor, A: torch.Tensor, checks: list[torch.Tensor] | None) -> LowRankPair:
    # Aᵀ = Q_a R_a (thin QR)  =>  B·A = (B R_aᵀ) Q_aᵀ, and with the eigendecomposition of the r×r Gram
    # matrix (B R_aᵀ)ᵀ(B R_aᵀ) = V Λ Vᵀ:  B·A = (B R_aᵀ V) (Vᵀ Q_aᵀ), columns of the left factor orthogonal
    # with norms √Λ (the singular values), rows of the right factor orthonormal. B is never decomposed:
    # only its r×r Gram matrix is formed, and it is multiplied once by an r×r matrix.
    Q_a, R_a = qr_tall(A.mT, checks=checks)  # (n, r) in A's dtype, (r, r) float64; Householder if A is deficient
    gram = R_a @ _gram(B) @ R_a.mT
    if checks is not None:  # an untrusted QR may have left NaN, and eigh raises on it before the tests are read
        gram = torch.nan_to_num(gram, nan=0.0, posinf=0.0, neginf=0.0)
    V, _ = _eigh_descending(gram)
    return B @ (R_a.mT @ V).to(B.dtype), (Q_a @ V.to(A.dtype)).mT


def _refactor_orthonormal(B: torch.Tensor, A: torch.Tensor) -> LowRankPair:
    # A = Q_aᵀ already (R_a = I), so the rotation V of BᵀB = V Λ Vᵀ is all that is needed:
    # B·A = (B V)(Vᵀ A), O(m·r²) for the Gram matrix and one r×r product per factor.
    V, _ = _eigh_descending(_gram(B))
    return B @ V.to(B.dtype), V.mT.to(A.dtype) @ A


def _gram(X: torch.Tensor) -> torch.Tensor:
    """XᵀX (r×r), formed in X's dtype and returned in float64 for the eigendecomposition.

    A float32 Gram matrix resolves singular values down to ~3e-4·σ₁: below that, B_new's columns are
    orthogonal only to ~eps·σ₁², but the product B_new·A_new = B·V·Vᵀ·A stays exact and A's rows stay
    orthonormal, because V comes from a float64 eigendecomposition. Forming it in float64 instead cost
    ten times more on the CPU (a float64 copy of every B).
    """
    return gram(X).to(torch.float64)


def _eigh_descending(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors and eigenvalues of symmetric G (float64), largest eigenvalue first.

    A rank-deficient G (B = 0, or m < r) has zero eigenvalues whose eigenvectors are still orthonormal,
    so the rotated factors stay finite and A's rows stay orthonormal.
    """
    evals, evecs = small_eigh(G)
    return evecs.flip(-1), evals.flip(-1)


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

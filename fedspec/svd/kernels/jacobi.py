"""Batched symmetric eigendecomposition of small matrices by parallel cyclic Jacobi: one Triton launch per stack.

The SVD engine's small problems — FedSVD's r×r rotations, and the k×k Gram matrix of a Rayleigh–Ritz step
(k = (niter + 1)·(r + oversample), 120 for PiSSA's defaults at r = 16) — are tiny for a GPU. cuSOLVER solves each one
with a tridiagonal reduction of many small launches (0.9 ms for one 64×64 float64 matrix on an H200), matrix by
matrix for sizes above 32, and `torch.linalg.eigh` reads its error code back to the host, which also rules out
capturing the SVD in a CUDA graph. Here one program owns one matrix, kept whole in registers, and runs sweeps of
the round-robin ("chess tournament") ordering: each of the n − 1 rounds of a sweep rotates n/2 disjoint index
pairs at once, so a round is a few elementwise passes and gathers over the tile. Sweeps repeat until the
off-diagonal mass is below `tol` relative to the whole matrix (quadratic convergence: ~6–10 sweeps) or
`max_sweeps` is reached; the loop's test runs on the device, so nothing is read back to the host.

Accuracy: each rotation is orthogonal to working precision and zeroes its pair exactly (Golub & Van Loan,
Algorithm 8.5.2, the symmetric Schur decomposition), so in float64 the eigenvalues agree with `torch.linalg.eigh`
to ~n·eps·‖G‖ and the eigenvectors are orthonormal to ~n·eps (tests/test_jacobi.py states the measured bounds).
Only G's lower triangle is read, as `torch.linalg.eigh` does by default.

`symmetric_eigh` is the engine's entry point: the kernel for small CUDA matrices (n ≤ `ENGINE_MAX_SIZE`; larger
ones it loses to cuSOLVER, see there) when Triton is installed, `torch.linalg.eigh` otherwise; both return
eigenvalues in ascending order with matching eigenvector columns. `jacobi_eigh` runs the kernel itself: on CUDA, or on a CPU under Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the default test suite checks it.
"""

from __future__ import annotations

import torch

from .runtime import tl, triton, triton_runs_here

__all__ = ["MAX_SIZE", "jacobi_eigh", "symmetric_eigh"]

# Largest n the kernel takes: a 128×128 float64 tile is 128 KiB of registers per program, mostly spilled.
MAX_SIZE = 128
# Largest n the engine sends to the kernel. Measured on an H200 (float64, against torch.linalg.eigh in the same run):
# 224 stacked 16×16 matrices 0.24 against 0.22 ms, 224 × 32×32 0.70 against 0.38 ms, and no host read, so FedSVD's
# rotation step can be captured in a CUDA graph (r = 16: 2.06 ms replayed against 2.44 eager and 2.93 with cuSOLVER;
# at r = 32 only the kernel makes the capture possible); but one 64×64 matrix took 3.5 against 0.9 ms and one 120×120
# (a Rayleigh–Ritz Gram matrix) 256 against 1.5 ms: a whole matrix per program spills its registers, and the n − 1
# rounds of a sweep run one after another. Those sizes stay with cuSOLVER.
ENGINE_MAX_SIZE = 32
# Sweeps are cheap to bound: cyclic Jacobi converges quadratically once the off-diagonal is small, and on every
# matrix the tests draw (including repeated and zero eigenvalues) the loop stopped after at most 10.
MAX_SWEEPS = 15


# Whether the SVD engine sends its small eigenproblems on a GPU to the kernel (the A/B in benchmarks/gpu_check.py,
# docs/gpu.md). On a CPU LAPACK's eigh is fast for these sizes and the kernel only runs interpreted, for tests.
USE_ON_CUDA = True


def symmetric_eigh(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.linalg.eigh(G)` for a stack of symmetric matrices (..., n, n): ascending eigenvalues, eigenvectors.

    CUDA float32/float64 matrices with n ≤ `ENGINE_MAX_SIZE` go to the Jacobi kernel when Triton is installed (and
    `USE_ON_CUDA` is on); everything else to torch.
    """
    fits = G.shape[-1] <= ENGINE_MAX_SIZE and G.dtype in (torch.float32, torch.float64)
    if fits and USE_ON_CUDA and G.is_cuda and triton is not None:
        return jacobi_eigh(G)
    return torch.linalg.eigh(G)


def jacobi_eigh(
    G: torch.Tensor, *, tol: float | None = None, max_sweeps: int = MAX_SWEEPS, return_sweeps: bool = False
) -> tuple[torch.Tensor, ...]:
    """Eigendecomposition of symmetric (..., n, n) G by the Triton Jacobi kernel, one program per matrix.

    Returns `(evals, evecs)` in G's dtype, eigenvalues ascending, `G ≈ evecs · diag(evals) · evecsᵀ`. `tol` is the
    relative off-diagonal Frobenius norm at which sweeping stops (default: the dtype's machine epsilon).
    `return_sweeps=True` adds a third result: how many sweeps each matrix took (int32, `max_sweeps` where the test
    never passed).
    """
    if triton is None:
        raise RuntimeError("the Jacobi eigensolver needs Triton (pip install 'fedspec[gpu]')")
    if not triton_runs_here(G.device):
        raise RuntimeError(f"Triton does not run for tensors on {G.device} here (CUDA, or TRITON_INTERPRET=1 on a CPU)")
    n = G.shape[-1]
    if G.ndim < 2 or G.shape[-2] != n:
        raise ValueError(f"jacobi_eigh needs square matrices (..., n, n), got shape {tuple(G.shape)}")
    if not 1 <= n <= MAX_SIZE:
        raise ValueError(f"jacobi_eigh takes 1 <= n <= {MAX_SIZE}, got n = {n}")
    if G.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"jacobi_eigh works in float32 or float64, got {G.dtype}")
    batch = G.shape[:-2]
    stack = G.reshape(-1, n, n).contiguous()
    count = stack.shape[0]
    evals = torch.empty(count, n, dtype=G.dtype, device=G.device)
    evecs = torch.empty(count, n, n, dtype=G.dtype, device=G.device)
    sweeps = torch.zeros(count, dtype=torch.int32, device=G.device)
    if count:
        tol = torch.finfo(G.dtype).eps if tol is None else tol
        size = max(2, triton.next_power_of_2(n))  # an even tile: every index has a partner in each round
        _jacobi_kernel[(count,)](stack, evals, evecs, sweeps, n, tol * tol, max_sweeps, SIZE=size,
                                 num_warps=8 if size >= 64 else 4)
    # Sorted on the device (no host read): ascending, as torch.linalg.eigh returns them.
    evals, order = evals.sort(dim=-1)
    evecs = evecs.gather(-1, order.unsqueeze(-2).expand_as(evecs))
    result = evals.reshape(*batch, n), evecs.reshape(*batch, n, n)
    return (*result, sweeps.reshape(batch)) if return_sweeps else result


if triton is not None:

    @triton.jit
    def _jacobi_kernel(G, evals_out, evecs_out, sweeps_out, n, tol_sq, max_sweeps, SIZE: tl.constexpr):
        """One program: the matrix `program_id` of the stack, padded to SIZE × SIZE with zeros.

        Padding rows and columns are zero off the diagonal, so a pair that mixes a real index with a padding one
        has a zero off-diagonal entry and gets the identity rotation: the real block never mixes with the padding,
        and its eigenpairs are the first n diagonal entries and the top-left n × n block of V.
        """
        matrix = tl.program_id(0).to(tl.int64)
        idx = tl.arange(0, SIZE)
        rows = idx[:, None]
        cols = idx[None, :]
        inside = (rows < n) & (cols < n)
        offset = matrix * n * n
        lower = tl.load(G + offset + rows * n + cols, mask=inside & (rows >= cols), other=0.0)
        A = lower + tl.trans(tl.where(rows > cols, lower, 0.0))  # symmetric from the lower triangle
        zero = tl.zeros((SIZE, SIZE), dtype=A.dtype)
        eye = rows == cols
        V = tl.where(eye, 1.0, zero)
        total_sq = tl.sum(tl.sum(A * A, axis=1), axis=0)
        off_sq = total_sq - tl.sum(tl.sum(tl.where(eye, A * A, zero), axis=1), axis=0)
        last = SIZE - 1
        sweep = 0
        while (sweep < max_sweeps) & (off_sq > tol_sq * total_sq):
            for round_ in range(last):
                # Round-robin pairing: index `last` stays put, the others rotate; every pair meets once a sweep.
                mirror = (2 * round_ - idx + 2 * last) % last
                partner = tl.where(idx == last, round_, tl.where(mirror == idx, last, mirror))
                pairs = cols == partner[:, None]  # pairs[i, c]: c is i's partner this round
                diagonal = tl.sum(tl.where(eye, A, zero), axis=1)
                partner_diagonal = tl.sum(tl.where(pairs, diagonal[None, :], zero), axis=1)
                first = idx < partner  # i is p (the smaller index of its pair), else q
                # a_pq read from one triangle for both members, so p and q compute the same rotation even when
                # rounding has left A a hair from symmetric.
                row_entry = tl.sum(tl.where(pairs, A, zero), axis=1)  # A[i, partner(i)]
                col_entry = tl.sum(tl.where(rows == partner[None, :], A, zero), axis=0)  # A[partner(i), i]
                a_pq = tl.where(first, row_entry, col_entry)
                a_pp = tl.where(first, diagonal, partner_diagonal)
                a_qq = tl.where(first, partner_diagonal, diagonal)
                # The symmetric Schur rotation [c s; -s c] that zeroes a_pq (Golub & Van Loan, Algorithm 8.5.2).
                rotate = a_pq != 0.0
                tau = (a_qq - a_pp) / (2.0 * tl.where(rotate, a_pq, 1.0))
                size_tau = tl.abs(tau)
                # √(1 + τ²) without overflowing τ² for a tiny a_pq (τ → ∞ gives t → 0, no rotation).
                scale = tl.maximum(size_tau, 1.0)
                unit, ratio = 1.0 / scale, size_tau / scale
                hypot = scale * tl.sqrt(unit * unit + ratio * ratio)
                t = tl.where(tau >= 0.0, 1.0, -1.0) / (size_tau + hypot)
                t = tl.where(rotate, t, 0.0)
                c = 1.0 / tl.sqrt(1.0 + t * t)
                s = t * c
                # Column update (A·J, V·J): column p ← c·p − s·q, column q ← s·p + c·q; rows alike for Jᵀ·(A·J).
                signed_s = tl.where(first, -s, s)
                by_column = tl.broadcast_to(partner[None, :], (SIZE, SIZE))
                by_row = tl.broadcast_to(partner[:, None], (SIZE, SIZE))
                A = A * c[None, :] + tl.gather(A, by_column, axis=1) * signed_s[None, :]
                V = V * c[None, :] + tl.gather(V, by_column, axis=1) * signed_s[None, :]
                A = A * c[:, None] + tl.gather(A, by_row, axis=0) * signed_s[:, None]
                A = tl.where(pairs, zero, A)  # exactly zero, as the rotation makes it in exact arithmetic
            off_sq = tl.sum(tl.sum(tl.where(eye, zero, A * A), axis=1), axis=0)
            sweep += 1
        diagonal = tl.sum(tl.where(eye, A, zero), axis=1)
        tl.store(evals_out + matrix * n + idx, diagonal, mask=idx < n)
        tl.store(sweeps_out + matrix, sweep)
        tl.store(evecs_out + offset + rows * n + cols, V, mask=inside)

"""The engine's small symmetric eigendecompositions (Rayleigh–Ritz Gram matrices, FedSVD's r×r rotations).

On a GPU they go to the batched Jacobi kernel (`fedspec.svd.kernels.jacobi`): one launch per stack and no host
synchronization, where cuSOLVER runs a tridiagonal reduction of many small launches per matrix and torch reads its
error code back to the host. On a CPU LAPACK's eigh is the fast path. The kernel module (and Triton with it) is
imported only when a CUDA matrix asks for it, so CPU-only processes never pay Triton's import.
"""

from __future__ import annotations

import torch

__all__ = ["small_eigh", "sync_free_eigh"]


def small_eigh(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.linalg.eigh(G)` (ascending eigenvalues, eigenvector columns) for a stack of small symmetric matrices."""
    if G.is_cuda:
        from .kernels.jacobi import symmetric_eigh

        return symmetric_eigh(G)
    return torch.linalg.eigh(G)


def sync_free_eigh(n: int, device: torch.device) -> bool:
    """Whether `small_eigh` of n×n float64 matrices on `device` runs without a host read (capturable in a CUDA
    graph): on the Jacobi kernel, CUDA only. torch.linalg.eigh reads its error code back to the host."""
    if device.type != "cuda":
        return False
    from .kernels import jacobi

    return jacobi.triton is not None and jacobi.USE_ON_CUDA and n <= jacobi.ENGINE_MAX_SIZE

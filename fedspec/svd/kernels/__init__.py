"""GPU kernels of the SVD engine and its users, each with a torch reference it is tested against.

- `symmetric_eigh` / `jacobi_eigh`: batched eigendecomposition of small symmetric matrices (parallel cyclic Jacobi,
  one Triton launch per stack, no host synchronization); the engine's Rayleigh–Ritz and FedSVD rotations on CUDA.
- `lowrank_linear`: the fused low-rank adapter forward x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ (Triton; the torch reference
  runs wherever Triton cannot).
Install Triton with the `[gpu]` extra.
"""

from .fused_lowrank import lowrank_linear, lowrank_linear_reference, triton_available, triton_runs_here
from .jacobi import jacobi_eigh, symmetric_eigh

__all__ = [
    "jacobi_eigh",
    "lowrank_linear",
    "lowrank_linear_reference",
    "symmetric_eigh",
    "triton_available",
    "triton_runs_here",
]

"""GPU kernels of the SVD engine, each tested against torch on the CPU under Triton's interpreter and on CUDA.

- `symmetric_eigh` / `jacobi_eigh`: batched eigendecomposition of small symmetric matrices (parallel cyclic Jacobi,
  one Triton launch per stack, no host synchronization): FedSVD's r×r rotations on CUDA, which this makes
  capturable in a CUDA graph.
Install Triton with the `[gpu]` extra. (A fused low-rank adapter forward lived here until it had lost to cuBLAS in
every GPU run: docs/gpu.md.)
"""

from .jacobi import jacobi_eigh, symmetric_eigh
from .runtime import triton_available, triton_runs_here

__all__ = ["jacobi_eigh", "symmetric_eigh", "triton_available", "triton_runs_here"]

"""GPU kernels of the SVD engine's users, each with a torch reference it is tested against.

- `lowrank_linear`: the fused low-rank adapter forward x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ (Triton; the torch reference
  runs wherever Triton cannot). Install Triton with the `[gpu]` extra.
"""

from .fused_lowrank import lowrank_linear, lowrank_linear_reference, triton_available, triton_runs_here

__all__ = ["lowrank_linear", "lowrank_linear_reference", "triton_available", "triton_runs_here"]

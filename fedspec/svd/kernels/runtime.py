"""Whether Triton kernels can run here: Triton is optional (`pip install 'fedspec[gpu]'`), kernels run on CUDA,
or on a CPU under Triton's interpreter (``TRITON_INTERPRET=1``, how the default test suite checks them)."""

from __future__ import annotations

import os

import torch

__all__ = ["tl", "triton", "triton_available", "triton_runs_here"]

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised when the extra is not installed
    triton = None
    tl = None


def triton_available() -> bool:
    return triton is not None


def triton_runs_here(device: torch.device | str) -> bool:
    """Whether a kernel can run for tensors on `device`: CUDA with Triton, or the CPU interpreter."""
    if triton is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"

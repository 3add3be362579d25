"""Which floating-point dtype a decomposition runs in.

SVD, QR and power iterations lose orthogonality and small singular values in bf16/fp16, and
LAPACK/cuSOLVER do not support half precision anyway, so every decomposition in fedspec runs in
float32 or float64 whatever the model dtype (PEFT does the same for its SVD inits).
"""

from __future__ import annotations

import torch

__all__ = ["compute_dtype"]


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any input is float64, else float32.

    Integer, bool and half-precision inputs are upcast to float32; complex input is rejected
    because the adapter math (and its orthonormality invariants) is real-valued.
    """
    for dtype in dtypes:
        if dtype.is_complex:
            raise TypeError(f"fedspec.svd works on real tensors only, got dtype {dtype}")
    return torch.float64 if torch.float64 in dtypes else torch.float32

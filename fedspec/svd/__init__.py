"""fedspec SVD engine: truncated SVD (exact / randomized, top / bottom, batched) and the exact
re-factorization of a low-rank product B·A through QR + an r×r SVD.

Every decomposition runs in float32 or float64 whatever the model dtype, and without autograd.
Singular-vector signs are arbitrary: compare products, never factors.
"""

from .grouping import BATCH_BYTES, batch_bytes, batch_chunks, group_by_shape
from .precision import PASS_PRECISIONS, PassBuffer, compute_dtype
from .refactor import refactor_lowrank, refactor_lowrank_grouped
from .truncated import METHODS, RANDOMIZED, error_vs_exact, reconstruction_error, truncated_svd

__all__ = [
    "BATCH_BYTES",
    "batch_bytes",
    "batch_chunks",
    "METHODS",
    "RANDOMIZED",
    "PASS_PRECISIONS",
    "PassBuffer",
    "compute_dtype",
    "error_vs_exact",
    "group_by_shape",
    "reconstruction_error",
    "refactor_lowrank",
    "refactor_lowrank_grouped",
    "truncated_svd",
]

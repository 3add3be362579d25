"""PiSSA (Meng et al., 2024): W_res + s·B·A; B·A = the top-r SVD of W, the base keeps the residual."""

from __future__ import annotations

import torch

from ...svd import RANDOMIZED, PassBuffer, truncated_svd
from ...svd.precision import compute_dtype, pass_dtype
from ..registry import MethodSpec, register
from .common import split_singular_values


def initialize(
    weights: torch.Tensor,
    rank: int,
    scaling: float,
    *,
    generator: torch.Generator,
    svd_method: str = "randomized",
    niter: int = 4,
    oversample: int = 8,
    pass_precision: str = "full",
    pass_buffer: PassBuffer | None = None,
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA (Meng et al., 2024): the top-r singular triplets of W; the base keeps the residual.

    The randomized path oversamples (PEFT's ``pissa_niter_K`` does not) and draws its sketch from the given
    generator, so the server's SVD is reproducible.
    """
    U, S, Vh = truncated_svd(
        weights, rank, method=svd_method, niter=niter, oversample=oversample, generator=generator,
        pass_precision=pass_precision, pass_buffer=pass_buffer,
    )
    return split_singular_values(U, S, Vh, scaling)


def weights_dtype(
    weight: torch.Tensor, *, svd_method: str = "randomized", pass_precision: str = "full", **_: object
) -> torch.dtype:
    """The dtype :func:`pissa` reads its stacked weights in (same defaults): the randomized SVD reads W only
    through its passes, so a stack in the pass dtype is all it needs; the exact SVD needs float32/64."""
    if svd_method in RANDOMIZED:
        return pass_dtype(pass_precision, weight)
    return compute_dtype(weight.dtype)


register(MethodSpec(name="pissa", initializer=initialize, weights_dtype=weights_dtype, base_policy="residual"))

"""MiLoRA (Wang et al., 2025): W_res + s·B·A; B·A = the bottom-r (minor) SVD of W."""

from __future__ import annotations

import torch

from ...svd import truncated_svd
from ..registry import MethodSpec, register
from .common import split_singular_values


def initialize(
    weights: torch.Tensor, rank: int, scaling: float, *, generator: torch.Generator, **_: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """MiLoRA (Wang et al., 2025): the bottom-r (minor) singular triplets of W; the base keeps the residual.

    Always an exact SVD: a randomized range finder only captures the top subspace. The paper has no α/r
    scaling; fedspec divides Σ by s like PiSSA, so s·B·A is exactly the minor part for any α.
    """
    U, S, Vh = truncated_svd(weights, rank, method="exact", smallest=True)
    return split_singular_values(U, S, Vh, scaling)


register(MethodSpec(name="milora", initializer=initialize, base_policy="residual"))

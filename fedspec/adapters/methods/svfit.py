"""SVFit (Sun et al., 2024): W_e + U_r·diag(σ′)·V_rᵀ; only the top-r singular values train. Linear: FedAvg
is exact."""

from __future__ import annotations

import torch

from ..layers import Diagonal, SpectralLinear
from ..registry import MethodSpec, register
from .common import cast, factory, full_svd


def build_layer(base, rank, scaling, *, dropout, options) -> SpectralLinear:
    return SpectralLinear(base, rank, Diagonal(rank, **factory(base)), dropout=dropout, base_policy="residual")


def initialize(weights: torch.Tensor, rank: int, scaling: float, **_: object) -> dict[str, torch.Tensor]:
    """SVFit (Sun et al., 2024): bases U_r, V_rᵀ of the top r triplets (exact SVD), σ′ starts at σ_{1..r}; the base
    keeps W_e = W − U_r·diag(σ)·V_rᵀ."""
    U, S, Vh = full_svd(weights)
    U, S, Vh = U[..., :rank], S[..., :rank], Vh[..., :rank, :]
    return cast({"left.weight": U, "right.weight": Vh, "spectrum.weight": S, "init_spectrum": S}, weights.dtype)


register(MethodSpec(name="svfit", initializer=initialize, base_policy="residual", layer=build_layer,
                    init_needs="weights (exact SVD)", federated="linear"))

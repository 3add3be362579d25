"""CLIP-SVD (Koleilat et al., 2025): U·diag(s)·Vᵀ at full rank; all k singular values train (adapter.rank
is unused). Linear: FedAvg is exact."""

from __future__ import annotations

import torch

from ..layers import Diagonal, SpectralLinear
from ..registry import MethodSpec, register
from .common import cast, factory, full_rank, full_svd


def build_layer(base, rank, scaling, *, dropout, options) -> SpectralLinear:
    k = full_rank(base)
    return SpectralLinear(base, k, Diagonal(k, **factory(base)), dropout=dropout, base_policy="owned")


def initialize(weights: torch.Tensor, rank: int, scaling: float, **_: object) -> dict[str, torch.Tensor]:
    """CLIP-SVD (Koleilat et al., 2025): the full thin SVD W = U·diag(s)·Vᵀ (all k values, exact reconstruction);
    s trains, U and V are frozen; the adapter owns the weight."""
    U, S, Vh = full_svd(weights)
    return cast({"left.weight": U, "right.weight": Vh, "spectrum.weight": S}, weights.dtype)


register(MethodSpec(name="clip_svd", initializer=initialize, base_policy="owned", layer=build_layer,
                    init_needs="weights (full SVD)", federated="linear"))

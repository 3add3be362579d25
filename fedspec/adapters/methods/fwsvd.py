"""FWSVD (Hsu et al., ICLR 2022): s·B·A + b in place of W; B·A = Î⁻¹·SVD_r(Î·W), Î = √(row sums of the
empirical Fisher)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ...svd import truncated_svd
from ..layers import FactorizedLinear
from ..registry import MethodSpec, register
from .common import statistic


def initialize(
    weights: torch.Tensor,
    rank: int,
    scaling: float,
    *,
    generator: torch.Generator,
    statistics: Mapping[str, torch.Tensor] | None = None,
    svd_method: str = "exact",
    niter: int = 4,
    oversample: int = 8,
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FWSVD (Hsu et al., ICLR 2022): W ≈ (Î⁻¹·U_r·Σ_r)·V_rᵀ from the truncated SVD of Î·W, with
    Î = diag(√(Σ_j F_ij)) the row importance from the empirical Fisher F (statistic ``fisher``): the minimizer of
    ‖Î(W − B·A)‖_F. Returned as B = Î⁻¹U_rΣ_r/s, A = V_rᵀ, so s·B·A is the approximation (A has orthonormal
    rows and B = UΣ-like, the form FedSVD re-factorizes to).

    Rows whose Fisher is 0 (or tiny) would make Î singular: their importance is floored at 1e-6 × the mean
    row importance. The paper computes F on a task-fine-tuned model; here it comes from the calibration examples
    on the model the adapter starts from (the pretrained backbone and the seeded head).
    """
    fisher = statistic(statistics, "fisher", "fwsvd")
    importance = fisher.clamp(min=0.0)
    floor = importance.mean(-1, keepdim=True) * 1e-6
    root = torch.maximum(importance, floor).clamp(min=torch.finfo(torch.float64).tiny).sqrt()  # (b, out)
    W = weights.to(torch.float64)
    U, S, Vh = truncated_svd(root.unsqueeze(-1) * W, rank, method=svd_method, niter=niter, oversample=oversample,
                             generator=generator)
    B = (U * S.unsqueeze(-2)) / root.unsqueeze(-1) / scaling
    return B.contiguous().to(weights.dtype), Vh.contiguous().to(weights.dtype)


def build_layer(base: nn.Linear, rank: int, scaling: float, *, dropout: float, options: dict) -> FactorizedLinear:
    return FactorizedLinear(base, rank, scaling, dropout=dropout)


register(MethodSpec(name="fwsvd", initializer=initialize, base_policy="replace", layer=build_layer,
                    init_needs="calibration data: per-layer Fisher row sums (per-example gradients)",
                    calibration=("fisher",)))

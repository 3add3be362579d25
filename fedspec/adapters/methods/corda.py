"""CorDA (Yang et al., NeurIPS 2024): W_res + s·B·A; B·A = the top-r (ipm) or bottom-r (kpm) part of
SVD(W·C)·C⁻¹, C the layer's input covariance from calibration data."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ...errors import AdapterError
from ..registry import MethodSpec, register
from .common import statistic

MODES = ("ipm", "kpm")


def _damped(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CorDA's damping, per matrix: C̃ = C + λ·I with λ = damp·mean(diag C), damp = 0.01 doubled until
    ‖C̃·C̃⁻¹ − I‖_F < 0.05 (as the reference and PEFT). Returns (C̃, C̃⁻¹)."""
    n = covariance.shape[-1]
    eye = torch.eye(n, dtype=covariance.dtype, device=covariance.device)
    damped, inverses = [], []
    for C in covariance:
        damp = 0.01
        while True:
            fixed = C + eye * C.diagonal().mean() * damp
            inverse = torch.linalg.inv(fixed)
            if torch.dist(fixed @ inverse, eye) < 0.05:
                break
            damp *= 2
            if damp > 1e6:
                raise AdapterError("CorDA: the input covariance cannot be inverted even with heavy damping")
        damped.append(fixed)
        inverses.append(inverse)
    return torch.stack(damped), torch.stack(inverses)


def initialize(
    weights: torch.Tensor,
    rank: int,
    scaling: float,
    *,
    generator: torch.Generator,
    statistics: Mapping[str, torch.Tensor] | None = None,
    mode: str = "ipm",
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CorDA (Yang et al., NeurIPS 2024): the SVD of W·C̃, C̃ the damped input covariance of the layer.

    W·C̃ = U·Σ·Vᵀ gives W = U·Σ·(Vᵀ·C̃⁻¹) exactly; ``mode="ipm"`` (instruction-previewed) keeps the top-r
    components, ``mode="kpm"`` (knowledge-preserved) the bottom-r ones: A = √(Σ_r/s)·(Vᵀ·C̃⁻¹)_r,
    B = U_r·√(Σ_r/s), and the base holds W − s·B·A. C is the uncentered covariance E[x xᵀ] of the layer input
    (statistic ``xx``: each calibration example weighs the same). PEFT scales each sample's XᵀX by 1/max(X)²
    before averaging; fedspec does not (the clipped, summable statistic stays well defined under DP); with
    one calibration sample, or samples of equal scale, the two agree exactly (the result is invariant to a global
    scale of C). Full SVD in float64, as the reference.
    """
    if mode not in MODES:
        raise AdapterError(
            f"adapter.options.mode={mode!r} is not a CorDA mode; choose one of: {', '.join(MODES)}"
        )
    C = statistic(statistics, "xx", "corda")
    damped, inverse = _damped(C)
    W = weights.to(torch.float64)
    U, S, Vh = torch.linalg.svd(W @ damped, full_matrices=False)
    keep = slice(0, rank) if mode == "ipm" else slice(-rank, None)
    U, S, right = U[..., keep], S[..., keep], (Vh @ inverse)[..., keep, :]
    root = (S / scaling).sqrt()
    return (U * root.unsqueeze(-2)).to(weights.dtype), (root.unsqueeze(-1) * right).to(weights.dtype)


register(MethodSpec(name="corda", initializer=initialize, base_policy="residual",
                    init_needs="calibration data: per-layer input covariance", calibration=("inputs",)))

"""EVA (Paischer et al., NeurIPS 2025): W + s·B·A; A = the top-r_l principal components of the layer inputs,
B = 0; the ranks r_l are redistributed over layers by explained variance."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ...errors import AdapterError
from ..registry import MethodSpec, register
from .common import statistic


def activation_pca(statistics: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA's decomposition from the summed statistics: the exact PCA of a layer's inputs.

    Covariance E[x xᵀ] − E[x]E[x]ᵀ (centered, as PEFT's incremental PCA), eigendecomposed in float64.
    Returns (explained-variance ratios (b, in), components (b, in, in) as rows), both in decreasing order.
    """
    xx, x = statistics["xx"].to(torch.float64), statistics["x"].to(torch.float64)
    covariance = xx - x.unsqueeze(-1) * x.unsqueeze(-2)
    covariance = (covariance + covariance.mT) / 2
    values, vectors = torch.linalg.eigh(covariance)
    values, vectors = values.flip(-1).clamp(min=0.0), vectors.flip(-1)
    total = values.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    components = vectors.mT
    # Sign convention of PEFT's svd_flip(u_based_decision=False): the largest-|.| entry of each component > 0.
    pivot = components.abs().argmax(-1, keepdim=True)
    signs = torch.sign(torch.gather(components, -1, pivot))
    return values / total, components * torch.where(signs == 0, 1.0, signs)


def ranks(
    statistics: Mapping[str, Mapping[str, torch.Tensor]],
    rank: int,
    *,
    rho: float = 2.0,
    limits: Mapping[str, int] | None = None,
    **_: object,
) -> dict[str, int]:
    """EVA's rank redistribution: the budget r × (number of layers) goes to the components with the largest
    explained-variance ratio, over all layers together; a layer may get 0 … round(ρ·r) (capped by its size).

    Ties go to the earlier layer (so of two layers with the same input, e.g. query and value, the first gets
    at least as many — PEFT's rule for layers with equal inputs).
    """
    if not rho >= 1.0:
        raise AdapterError(f"adapter.options.rho={rho!r} must be >= 1 (EVA's components per layer = round(rho·r))")
    names = list(statistics)
    candidates: list[tuple[float, int, int]] = []
    for index, name in enumerate(names):
        ratios, _ = activation_pca({k: v.unsqueeze(0) for k, v in statistics[name].items()})
        cap = round(rho * rank)
        if limits is not None:
            cap = min(cap, limits[name])
        for component, ratio in enumerate(ratios[0, :cap].tolist()):
            candidates.append((-ratio, index, component))
    candidates.sort()
    budget = rank * len(names)
    ranks = dict.fromkeys(names, 0)
    for _, index, _ in candidates[:budget]:
        ranks[names[index]] += 1
    return ranks


def initialize(
    weights: torch.Tensor,
    rank: int,
    scaling: float,
    *,
    generator: torch.Generator,
    statistics: Mapping[str, torch.Tensor] | None = None,
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA (Paischer et al., NeurIPS 2025): A = the top-r principal components of the layer's inputs, B = 0
    (so W is kept and the adapted layer equals it at initialization).

    ``rank`` is this layer's rank r_l after :func:`ranks`; the scaling stays α/r for every layer (PEFT's
    ``adjust_scaling_factors=True`` sets α_l = α·r_l/r, so α_l/r_l = α/r). The PCA is exact (an eigendecomposition
    of the summed covariance) instead of PEFT's incremental randomized PCA with a convergence stop (τ): no τ, and
    federated clients need to send only sums. No whitening (PEFT's default ``whiten=False``).
    """
    statistic(statistics, "xx", "eva")
    _, components = activation_pca(statistics)
    A = components[..., :rank, :]
    B = torch.zeros(weights.shape[0], weights.shape[1], rank, dtype=torch.float64)
    return B.to(weights.dtype), A.contiguous().to(weights.dtype)


register(MethodSpec(name="eva", initializer=initialize, base_policy="keep", ranks=ranks,
                    init_needs="calibration data: per-layer input mean and covariance", calibration=("inputs",),
                    calibration_response_only=True))

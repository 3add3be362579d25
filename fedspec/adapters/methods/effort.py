"""Effort (Yan et al., ICML 2025): W_main + U_res·diag(S_res)·V_resᵀ; the r minor triplets train."""

from __future__ import annotations

import torch
from torch import nn

from ..hooks import HookContext, PenaltyStep
from ..inject import AdapterConfig
from ..layers import LowRankCoreLinear
from ..registry import MethodSpec, register
from .common import cast, full_rank, full_svd, gram_gap, layers_of


def build_layer(base: nn.Linear, rank: int, scaling: float, *, dropout: float, options: dict) -> LowRankCoreLinear:
    principal = full_rank(base) - rank if float(options["orthogonality_weight"]) > 0 else 0
    return LowRankCoreLinear(base, rank, scaling, dropout=dropout, base_policy="residual", principal_rank=principal)


def initialize(weights: torch.Tensor, rank: int, scaling: float, *, orthogonality_weight: float = 0.0,
               **_: object) -> dict[str, torch.Tensor]:
    """Effort (Yan et al., ICML 2025): U_res, S_res, V_resᵀ = the ``rank`` minor triplets of an exact SVD train;
    the base keeps W_main = W − s·U_res·diag(S_res)·V_resᵀ, the top k − rank triplets. With an orthogonality loss
    the top factors U_r, V_rᵀ (without Σ) are kept too, which that loss needs."""
    U, S, Vh = full_svd(weights)
    Um, Sm, Vhm = U[..., -rank:], S[..., -rank:], Vh[..., -rank:, :]
    out = {"lora_B.weight": Um, "core.weight": Sm, "lora_A.weight": Vhm,
           "removed_B": Um, "removed_S": scaling * Sm, "removed_A": Vhm}
    if orthogonality_weight > 0:
        keep = S.shape[-1] - rank
        out.update({"principal_B": U[..., :keep], "principal_A": Vh[..., :keep, :]})
    return cast(out, weights.dtype)


class EffortPenalty(PenaltyStep):
    """Effort's optional losses, summed over layers:
    orthogonality ½‖[U_r U_res]ᵀ[U_r U_res] − I‖_F + ½‖[V_r V_res]ᵀ[V_r V_res] − I‖_F (U_r, V_r: the frozen top
    factors) and norm preservation |‖W′‖²_F − ‖W‖²_F|."""

    def __init__(self, model: nn.Module, orthogonality: float, norm: float, lr: float) -> None:
        super().__init__(weight=1.0, lr=lr)
        self.orthogonality, self.norm = orthogonality, norm
        with torch.no_grad():
            self.original_norms = {id(layer): float((layer.base.weight + layer.removed_weight()).pow(2).sum())
                                   for layer in layers_of(model, LowRankCoreLinear)}

    def penalty(self, model: nn.Module) -> torch.Tensor:
        total = 0.0
        for layer in layers_of(model, LowRankCoreLinear):
            if self.orthogonality > 0:
                U = torch.cat([layer.principal_B, layer.lora_B.weight], dim=1)
                V = torch.cat([layer.principal_A, layer.lora_A.weight], dim=0).T
                total = total + self.orthogonality * 0.5 * (gram_gap(U) + gram_gap(V))
            if self.norm > 0:
                adapted = layer.base.weight + layer.delta_weight()
                total = total + self.norm * (adapted.pow(2).sum() - self.original_norms[id(layer)]).abs()
        return total


def hooks(model: nn.Module, config: AdapterConfig, context: HookContext) -> list:
    orthogonality = float(config.options["orthogonality_weight"])
    norm = float(config.options["norm_weight"])
    if orthogonality <= 0 and norm <= 0:
        return []
    return [EffortPenalty(model, orthogonality, norm, context.lr)]


register(MethodSpec(name="effort", initializer=initialize, base_policy="residual", layer=build_layer,
                    init_needs="weights (full SVD)", federated="nonlinear", hooks=hooks))

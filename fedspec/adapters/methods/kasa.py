"""KaSA (Wang et al., ICLR 2025): W_world + s·B·diag(λ)·A; W's r minor triplets dropped; β‖λ‖² and
orthogonality losses as a step after each update."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import AdapterError
from ..hooks import HookContext, PenaltyStep
from ..inject import AdapterConfig
from ..layers import LowRankCoreLinear
from ..registry import MethodSpec, register
from .common import cast, factor_gaps, full_rank, full_svd, kaiming_uniform, layers_of


def build_layer(base: nn.Linear, rank: int, scaling: float, *, dropout: float, options: dict) -> LowRankCoreLinear:
    if rank >= full_rank(base):
        raise AdapterError(f"adapter.rank={rank}: KaSA drops the r smallest singular triplets and must keep at least "
                           f"one; choose adapter.rank < {full_rank(base)}")
    return LowRankCoreLinear(base, rank, scaling, dropout=dropout, base_policy="truncated")


def initialize(weights: torch.Tensor, rank: int, scaling: float, *, generator: torch.Generator,
               **_: object) -> dict[str, torch.Tensor]:
    """KaSA (Wang et al., ICLR 2025): the base drops W's r smallest singular triplets (kept here as the fixed
    ``removed_*`` tensors, so the truncation can be rebuilt from W); B = 0, A Kaiming-uniform, λ ~ N(0, 1), as PEFT's
    ``KasaConfig``: ΔW = 0, so the layer starts at W_world = W − (minor part), not at W."""
    b, m, n = weights.shape
    U, S, Vh = full_svd(weights)
    return cast({
        "removed_B": U[..., -rank:], "removed_S": S[..., -rank:], "removed_A": Vh[..., -rank:, :],
        "lora_B.weight": torch.zeros(b, m, rank, dtype=weights.dtype),
        "lora_A.weight": kaiming_uniform((b, rank, n), n, generator, weights.dtype),
        "core.weight": torch.randn(b, rank, generator=generator, dtype=weights.dtype),
    }, weights.dtype)


class KasaPenalty(PenaltyStep):
    """KaSA's auxiliary loss, summed over layers as PEFT's ``_get_kasa_loss``:
    β‖λ‖² + γ(‖BᵀB − I‖_F + ‖AAᵀ − I‖_F)."""

    def __init__(self, beta: float, gamma: float, lr: float) -> None:
        super().__init__(weight=1.0, lr=lr)
        self.beta, self.gamma = beta, gamma

    def penalty(self, model: nn.Module) -> torch.Tensor:
        return sum(self.beta * (layer.core.weight ** 2).sum() + self.gamma * factor_gaps(layer)
                   for layer in layers_of(model, LowRankCoreLinear))


def hooks(model: nn.Module, config: AdapterConfig, context: HookContext) -> list:
    beta, gamma = float(config.options["beta"]), float(config.options["gamma"])
    return [KasaPenalty(beta, gamma, context.lr)] if beta > 0 or gamma > 0 else []


register(MethodSpec(name="kasa", initializer=initialize, base_policy="truncated", layer=build_layer,
                    init_needs="weights (full SVD)", federated="nonlinear", hooks=hooks))

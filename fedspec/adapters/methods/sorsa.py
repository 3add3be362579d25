"""SORSA (Cao & Song, 2024): W_res + s·U_p·diag(Σ_p)·V_pᵀ from the top-r SVD; an orthonormal regularizer
applied as a separate step."""

from __future__ import annotations

import torch
from torch import nn

from ..hooks import HookContext, PenaltyStep
from ..inject import AdapterConfig
from ..layers import LowRankCoreLinear
from ..registry import MethodSpec, register
from .common import cast, core_layer, factor_gaps, full_svd, layers_of


def initialize(weights: torch.Tensor, rank: int, scaling: float, **_: object) -> dict[str, torch.Tensor]:
    """SORSA (Cao & Song, 2024): U_p, Σ_p, V_pᵀ = the top-r triplets of an exact SVD; the base keeps
    W_res = W − s·U_p·diag(Σ_p)·V_pᵀ (s = α/r, 1 by default), so the layer equals W at initialization."""
    U, S, Vh = full_svd(weights)
    U, S, Vh = U[..., :rank], S[..., :rank], Vh[..., :rank, :]
    return cast({"lora_B.weight": U, "core.weight": S, "lora_A.weight": Vh,
                  "removed_B": U, "removed_S": scaling * S, "removed_A": Vh}, weights.dtype)


class OrthonormalStep(PenaltyStep):
    """SORSA's regularizer L_orth = the mean of ‖U_pᵀU_p − I‖_F and ‖V_pᵀV_p − I‖_F over every factor matrix (two
    per layer, as SORSA's ``calc_ortho``, against which its γ = 4e-4 is set), applied as
    θ ← θ − γ·∇L_orth after the optimizer step (``lr=1``): its strength γ does not depend on the learning rate and it
    is never clipped, as in SORSA, where the gradient of (γ/η)·L_orth is added after clipping. fedspec keeps it out
    of Adam's moments (SORSA's reference uses AdamW), so under DP it stays a parameter-only post-processing step."""

    def penalty(self, model: nn.Module) -> torch.Tensor:
        layers = layers_of(model, LowRankCoreLinear)
        return sum(factor_gaps(layer) for layer in layers) / (2 * len(layers))


def hooks(model: nn.Module, config: AdapterConfig, context: HookContext) -> list:
    gamma = float(config.options["gamma"])
    return [OrthonormalStep(weight=gamma, lr=1.0)] if gamma > 0 else []


register(MethodSpec(name="sorsa", initializer=initialize, base_policy="residual", layer=core_layer("residual"),
                    init_needs="weights (exact SVD)", federated="nonlinear", hooks=hooks))

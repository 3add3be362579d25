"""DoRA (Liu et al., ICML 2024): μ ⊙ (W + s·B·A)/‖W + s·B·A‖_row; the norm is a constant in backward."""

from __future__ import annotations

import torch

from ..layers import DoRALinear
from ..registry import MethodSpec, register
from .lora import initialize as lora_initialize


def build_layer(base, rank, scaling, *, dropout, options) -> DoRALinear:
    return DoRALinear(base, rank, scaling, dropout=dropout)


def initialize(weights: torch.Tensor, rank: int, scaling: float, *, generator: torch.Generator,
               **options: object) -> dict[str, torch.Tensor]:
    """DoRA (Liu et al., ICML 2024): the LoRA init (A Gaussian, B = 0); the layer sets μ = ‖W‖_row itself."""
    B, A = lora_initialize(weights, rank, scaling, generator=generator)
    return {"lora_B.weight": B, "lora_A.weight": A}


register(MethodSpec(name="dora", initializer=initialize, base_policy="keep", layer=build_layer,
                    init_needs="weights (row norms)", federated="nonlinear"))

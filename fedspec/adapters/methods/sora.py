"""SoRA (Ding et al., EMNLP 2023): W + s·B·diag(g)·A; a proximal soft-threshold of the gate g after every step."""

from __future__ import annotations

import torch
from torch import nn

from ..hooks import HookContext
from ..inject import AdapterConfig
from ..layers import LowRankCoreLinear
from ..registry import MethodSpec, register
from .common import cast, core_layer, kaiming_uniform, layers_of


def initialize(weights: torch.Tensor, rank: int, scaling: float, *, generator: torch.Generator,
               **_: object) -> dict[str, torch.Tensor]:
    """SoRA (Ding et al., EMNLP 2023): A Kaiming-uniform, B = 0, gate g ~ N(0, 1); ΔW = 0 at start."""
    b, m, n = weights.shape
    return cast({
        "lora_A.weight": kaiming_uniform((b, rank, n), n, generator, weights.dtype),
        "lora_B.weight": torch.zeros(b, m, rank, dtype=weights.dtype),
        "core.weight": torch.randn(b, rank, generator=generator, dtype=weights.dtype),
    }, weights.dtype)


class SoftThreshold:
    """SoRA's proximal step after each optimizer step: g ← sign(g)·max(|g| − τ, 0), the proximal operator of
    τ‖g‖₁. τ = ``sparse_lambda`` per step, whatever the learning rate, as the reference's SparseAdamW does it (its
    run_glue.py passes sparse_lambda_2: 1e-3 by default, 3e-4 in the GLUE scripts; the variant that multiplies by the
    lr is unused there). Not lr·λ: fedspec's learning rates span Adam's 5e-3 to DP-SGD's 1–16 on clipped gradients,
    and lr·λ = 1 a step zeroed every gate ~ N(0, 1) within a few steps. The reference's second term, an L1 loss
    λ₁·mean|g| inside Adam, is left out: under DP-SGD a parameter-only loss term never reaches the clipped gradient
    (see ``fedspec.adapters.hooks``)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        for layer in layers_of(model, LowRankCoreLinear):
            g = layer.core.weight
            g.copy_(torch.sign(g) * (g.abs() - self.threshold).clamp_min(0))


def hooks(model: nn.Module, config: AdapterConfig, context: HookContext) -> list:
    return [SoftThreshold(float(config.options["sparse_lambda"]))]


register(MethodSpec(name="sora", initializer=initialize, base_policy="keep", layer=core_layer("keep"),
                    init_needs="nothing (random)", federated="nonlinear", hooks=hooks))

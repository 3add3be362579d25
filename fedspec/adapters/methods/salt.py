"""SALT (Elsayed et al., 2025): U·ReLU(Σ′)·Vᵀ; a scale and shift of the top-r singular values, a LoRA X·Y
inside the rest of the spectrum."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import AdapterError
from ..hooks import HookContext, PenaltyStep
from ..inject import AdapterConfig
from ..layers import SaltSpectrum, SpectralLinear
from ..registry import MethodSpec, register
from .common import cast, factory, full_rank, full_svd, kaiming_uniform, layers_of


def build_layer(base, rank, scaling, *, dropout, options) -> SpectralLinear:
    k = full_rank(base)
    lora_rank = int(options["lora_rank"])
    if lora_rank < 0 or (rank < k and lora_rank > k - rank):
        raise AdapterError(f"adapter.options.lora_rank={lora_rank} must be in [0, {k - rank}] (the residual "
                           f"spectrum has k - adapter.rank = {k - rank} values)")
    spectrum = SaltSpectrum(k, rank, lora_rank, **factory(base))
    return SpectralLinear(base, k, spectrum, dropout=dropout, base_policy="owned")


def initialize(weights: torch.Tensor, rank: int, scaling: float, *, generator: torch.Generator, lora_rank: int = 8,
               **_: object) -> dict[str, torch.Tensor]:
    """SALT (Elsayed et al., 2025): the full thin SVD, frozen; scale α = 1, shift β = 0 for the top r values; the
    LoRA X·Y inside the residual spectrum starts as in the SAM2 code (X Kaiming-uniform, Y = 0), so Σ′ = Σ and the
    layer equals W at initialization (the older SAM code's 0.01·randn for both would not)."""
    b = weights.shape[0]
    U, S, Vh = full_svd(weights)
    k = S.shape[-1]
    out = {"left.weight": U, "right.weight": Vh, "spectrum.sigma": S,
           "spectrum.scale": torch.ones(b, rank, dtype=weights.dtype),
           "spectrum.shift": torch.zeros(b, rank, dtype=weights.dtype)}
    if lora_rank > 0 and k > rank:
        out["spectrum.lora_X"] = kaiming_uniform((b, k - rank, lora_rank), lora_rank, generator, weights.dtype)
        out["spectrum.lora_Y"] = torch.zeros(b, lora_rank, k - rank, dtype=weights.dtype)
    return cast(out, weights.dtype)


class SaltPenalty(PenaltyStep):
    """SALT's regularizer, summed over layers: ‖diag(α⊙σ+β) − diag(σ)‖_F + ‖X·Y‖_F."""

    def penalty(self, model: nn.Module) -> torch.Tensor:
        total = 0.0
        for layer in layers_of(model, SpectralLinear):
            spectrum = layer.spectrum
            total = total + torch.linalg.vector_norm(spectrum.top_values() - spectrum.sigma[: spectrum.rank])
            if spectrum.lora_rank > 0:
                total = total + torch.linalg.matrix_norm(spectrum.lora_X @ spectrum.lora_Y)
        return total


def hooks(model: nn.Module, config: AdapterConfig, context: HookContext) -> list:
    weight = float(config.options["reg_weight"])
    return [SaltPenalty(weight=weight, lr=context.lr)] if weight > 0 else []


register(MethodSpec(name="salt", initializer=initialize, base_policy="owned", layer=build_layer,
                    init_needs="weights (full SVD)", federated="nonlinear", hooks=hooks))

"""LoRA (Hu et al., 2022): W + s·B·A; A Gaussian, B = 0, so the adapted model equals the base at start."""

from __future__ import annotations

import torch

from ..registry import MethodSpec, register


def initialize(
    weights: torch.Tensor, rank: int, scaling: float, *, generator: torch.Generator, **_: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA as in the paper (Hu et al., 2022): A ~ N(0, 1/r²) (PEFT's "gaussian" init), B = 0, so ΔW = 0."""
    b, out_features, in_features = weights.shape
    A = torch.randn(b, rank, in_features, generator=generator, dtype=weights.dtype) / rank
    B = torch.zeros(b, out_features, rank, dtype=weights.dtype)
    return B, A


register(MethodSpec(name="lora", initializer=initialize, base_policy="keep"))

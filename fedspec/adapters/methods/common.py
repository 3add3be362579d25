"""Pieces several methods share: factor splits, seeded random inits, statistics, penalties' building blocks.

A piece used by one method lives in that method's file; only what two or more use is here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ...errors import AdapterError
from ..inject import adapter_layers
from ..layers import LowRankCoreLinear, adapter_dtype


def split_singular_values(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """B = U·√(Σ/s), A = √(Σ/s)·Vᵀ, so that s·B·A = U·Σ·Vᵀ exactly as PiSSA does it."""
    root = (S / scaling).sqrt()
    return U * root.unsqueeze(-2), root.unsqueeze(-1) * Vh


def full_svd(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(weights, full_matrices=False)


def kaiming_uniform(shape: tuple[int, ...], fan_in: int, generator: torch.Generator, dtype) -> torch.Tensor:
    """nn.Linear's default (Kaiming uniform with a = √5): U(−1/√fan_in, 1/√fan_in), PEFT's LoRA-A init."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator, dtype=dtype) * 2 - 1) * bound


def cast(tensors: dict[str, torch.Tensor], dtype) -> dict[str, torch.Tensor]:
    """An initializer's named tensors in the weights' dtype, contiguous (the layer's ``set_initial`` loads them)."""
    return {k: v.to(dtype).contiguous() for k, v in tensors.items()}


def statistic(statistics: Mapping[str, torch.Tensor] | None, key: str, method: str) -> torch.Tensor:
    """A data-driven initializer's calibration statistic in float64, or an error that says how to provide it."""
    if not statistics or key not in statistics:
        raise AdapterError(
            f"adapter.method={method} initializes from calibration data; pass calibration=... to fedspec.adapt "
            "(see fedspec.adapters.collect_calibration)"
        )
    return statistics[key].to(torch.float64)


def full_rank(base: nn.Linear) -> int:
    return min(base.in_features, base.out_features)


def factory(base: nn.Linear) -> dict:
    """Where and in which dtype a layer's own parts live: float32 at least, as every adapter tensor."""
    return {"device": base.weight.device, "dtype": adapter_dtype(base.weight)}


def core_layer(base_policy: str, *, core: str = "diagonal", fixed_factors: bool = False):
    """The layer builder of a low-rank-with-core method that needs no checks of its own."""

    def build(base: nn.Linear, rank: int, scaling: float, *, dropout: float, options: dict) -> LowRankCoreLinear:
        return LowRankCoreLinear(base, rank, scaling, dropout=dropout, base_policy=base_policy, core=core,
                                 fixed_factors=fixed_factors)

    return build


def layers_of(model: nn.Module, cls: type) -> list:
    """The model's adapter layers of one shape, in module order."""
    return [layer for layer in adapter_layers(model).values() if isinstance(layer, cls)]


def gram_gap(columns: torch.Tensor) -> torch.Tensor:
    """‖MᵀM − I‖_F for M with orthonormal columns as the target."""
    gram = columns.T @ columns
    return torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))


def factor_gaps(layer: LowRankCoreLinear) -> torch.Tensor:
    """‖BᵀB − I‖_F + ‖AAᵀ − I‖_F: B's columns and A's rows orthonormal (SORSA, KaSA, AdaLoRA)."""
    return gram_gap(layer.lora_B.weight) + gram_gap(layer.lora_A.weight.T)

"""LoRA-XS (Bałazy et al., 2024): W + U_rΣ_r·R·V_rᵀ; frozen SVD bases, a trainable r×r R. Linear in R:
FedAvg is exact."""

from __future__ import annotations

import torch

from ...svd import PassBuffer, truncated_svd
from ..registry import MethodSpec, register
from .common import cast, core_layer


def initialize(weights: torch.Tensor, rank: int, scaling: float, *, generator: torch.Generator,
               svd_method: str = "exact", niter: int = 4, oversample: int = 8, pass_precision: str = "full",
               pass_buffer: PassBuffer | None = None, init_std: float = 1e-5, **_: object) -> dict[str, torch.Tensor]:
    """LoRA-XS (Bałazy et al., 2024): frozen B = U_r·Σ_r and A = V_rᵀ from a top-r SVD (no residual subtraction:
    the base keeps W); the r×r R ~ N(0, ``init_std``²), 1e-5 as in the paper, so the layer is W to ~1e-5."""
    b = weights.shape[0]
    U, S, Vh = truncated_svd(weights, rank, method=svd_method, niter=niter, oversample=oversample,
                             generator=generator, pass_precision=pass_precision,
                             pass_buffer=pass_buffer)
    return cast({
        "lora_B.weight": U * S.unsqueeze(-2), "lora_A.weight": Vh,
        "core.weight": init_std * torch.randn(b, rank, rank, generator=generator, dtype=weights.dtype),
    }, weights.dtype)


register(MethodSpec(name="lora_xs", initializer=initialize, base_policy="keep",
                    layer=core_layer("keep", core="full", fixed_factors=True),
                    init_needs="weights (top-r SVD)", federated="linear"))

"""LoRA-GA (Wang et al., NeurIPS 2024): W_res + s·B·A; A and B from the SVD of the mean loss gradient
(ArB2r, stable scale)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ...errors import AdapterError
from ...svd import truncated_svd
from ..registry import MethodSpec, register
from .common import statistic

DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")


SCALES = ("stable", "weight_svd", "gd_scale", "unit")


def initialize(
    weights: torch.Tensor,
    rank: int,
    scaling: float,
    *,
    generator: torch.Generator,
    statistics: Mapping[str, torch.Tensor] | None = None,
    direction: str = "ArB2r",
    scale: str = "stable",
    stable_gamma: float = 16.0,
    svd_method: str = "randomized",
    niter: int = 4,
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA (Wang et al., NeurIPS 2024), PEFT's formula: the 2r-truncated SVD of the mean loss gradient
    G = U·S·Vᵀ, then (default ``direction="ArB2r"``) A = Vᵀ[:r], B = U[:, r:2r]·diag(S[r:2r]); the other
    directions as PEFT (``ArBr`` interleaved, ``A2rBr``, ``random`` from the seeded generator).

    ``scale``: ``"stable"`` (default) B *= m^{1/4}/√γ (m = out features, γ = ``stable_gamma`` = 16);
    ``"weight_svd"`` B *= σ₁(W)/S_B[0]; ``"gd_scale"`` A, B /= s; ``"unit"`` none. The base holds W − s·B·A.
    G is the per-example average gradient of the calibration examples (PEFT: the average of per-batch mean
    gradients; equal for equal batches). Randomized SVD as PEFT (q = 4r, 4 power iterations) but from the
    seeded generator; ``svd_method="exact"`` for the exact one.
    """
    if direction not in DIRECTIONS:
        raise AdapterError(f"adapter.options.direction={direction!r} is not allowed; choose one of: "
                           f"{', '.join(DIRECTIONS)}")
    if scale not in SCALES:
        raise AdapterError(
            f"adapter.options.scale={scale!r} is not allowed; choose one of: {', '.join(SCALES)}"
        )
    G = statistic(statistics, "grad", "lora_ga").to(torch.float32 if weights.dtype != torch.float64 else torch.float64)
    out_features, in_features = weights.shape[-2:]
    if 2 * rank > min(out_features, in_features):
        raise AdapterError(
            f"adapter.rank={rank}: LoRA-GA takes 2r singular directions of the gradient, so 2·rank must be at most "
            f"{min(out_features, in_features)} for a {out_features}x{in_features} layer"
        )
    q = min(4 * rank, out_features, in_features)
    U, S, Vh = truncated_svd(G, 2 * rank, method=svd_method, niter=niter, oversample=q - 2 * rank, generator=generator)
    if direction == "ArBr":
        a_rows, b_cols = slice(1, 2 * rank, 2), slice(0, 2 * rank, 2)
    elif direction == "A2rBr":
        a_rows, b_cols = slice(rank, 2 * rank), slice(0, rank)
    elif direction == "ArB2r":
        a_rows, b_cols = slice(0, rank), slice(rank, 2 * rank)
    else:
        picked = torch.randperm(2 * rank, generator=generator)[:rank]
        a_rows = b_cols = picked
    A = Vh[..., a_rows, :]
    S_B = S[..., b_cols]
    B = U[..., :, b_cols] * S_B.unsqueeze(-2)
    if scale == "stable":
        B = B * (out_features**0.25 / stable_gamma**0.5)
    elif scale == "weight_svd":
        _, weight_S, _ = truncated_svd(weights, 1, method="exact")
        ratio = torch.where(S_B[..., :1] > 0, weight_S[..., :1] / S_B[..., :1], torch.ones_like(S_B[..., :1]))
        B = B * ratio.unsqueeze(-1)
    elif scale == "gd_scale":
        A, B = A / scaling, B / scaling
    return B.contiguous().to(weights.dtype), A.contiguous().to(weights.dtype)


register(MethodSpec(name="lora_ga", initializer=initialize, base_policy="residual",
                    init_needs="calibration data: per-layer mean loss gradient", calibration=("gradients",)))

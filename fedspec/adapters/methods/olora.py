"""OLoRA (Büyükakyüz, 2024): W_res + s·B·A; B = the first r columns of Q, A = the first r rows of R, QR(W)."""

from __future__ import annotations

import torch

from ..registry import MethodSpec, register


def initialize(
    weights: torch.Tensor, rank: int, scaling: float, *, generator: torch.Generator, **_: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA (Büyükakyüz, 2024): ``Q, R = qr(W)``, B = Q[:, :r] (orthonormal columns), A = R[:r, :].

    As PEFT's ``init_lora_weights="olora"``: the factors are NOT divided by s, so the base becomes
    W − s·Q_r·R_r and the adapted layer equals W at initialization for any α. QR signs depend on the LAPACK
    backend; a federation computes them once, on the server (the factors travel, not the recipe).
    """
    Q, R = torch.linalg.qr(weights.to(torch.float32 if weights.dtype != torch.float64 else torch.float64))
    return Q[..., :rank].contiguous().to(weights.dtype), R[..., :rank, :].contiguous().to(weights.dtype)


register(MethodSpec(name="olora", initializer=initialize, base_policy="residual"))

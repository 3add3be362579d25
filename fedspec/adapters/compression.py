"""Shape 5, compression: an ``nn.Linear`` replaced by two smaller ones, y = s·B·(A·x) + b (FWSVD).

The original weight is dropped (that is the point of compressing); only the bias survives, frozen. The factors
use the low-rank adapter names (``lora_A``: in → r, ``lora_B``: r → out, both ``nn.Linear``), so Opacus computes
their per-sample gradients with its own Linear rule and the low-rank federated rules (FedSVD, FFA-LoRA, FedIT)
apply to them unchanged: ΔW = s·B·A is the whole weight here.
"""

from __future__ import annotations

import torch
from torch import nn


class FactorizedLinear(nn.Module):
    """``scaling · lora_B(lora_A(x)) + bias`` in place of a dense ``nn.Linear``."""

    base_policy = "replace"

    def __init__(self, base: nn.Linear, rank: int, scaling: float, *, dropout: float = 0.0) -> None:
        super().__init__()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        with torch.no_grad():
            self.lora_A.weight.zero_()
            self.lora_B.weight.zero_()
        # Frozen, and a Parameter rather than a buffer (Opacus never sees a buffer next to trainable factors).
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank = rank
        self.scaling = scaling
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lora_B(self.lora_A(self.dropout(x))) * self.scaling
        return y if self.bias is None else y + self.bias

    def delta_weight(self) -> torch.Tensor:
        """The whole weight s·B·A (float32 at least)."""
        compute = torch.promote_types(self.lora_B.weight.dtype, torch.float32)
        return self.scaling * (self.lora_B.weight.to(compute) @ self.lora_A.weight.to(compute))

    @torch.no_grad()
    def set_factors(self, B: torch.Tensor, A: torch.Tensor) -> None:
        self.lora_B.weight.copy_(B)
        self.lora_A.weight.copy_(A)

    def merge(self) -> None:
        """Nothing to fold into: the factored form is already the layer (and the cheaper one to apply)."""

    def unmerge(self) -> None:
        """See :meth:`merge`."""

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` with weight s·B·A, computing the same function."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None,
            device=self.lora_A.weight.device, dtype=self.lora_A.weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.delta_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.requires_grad_(False)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"scaling={self.scaling:g}")

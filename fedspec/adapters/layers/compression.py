"""Shape 5, compression: an ``nn.Linear`` replaced by two smaller ones, y = s·B·(A·x) + b (FWSVD).

The original weight is dropped (that is the point of compressing); only the bias survives, frozen. The factors
use the low-rank adapter names (``lora_A``: in → r, ``lora_B``: r → out, both ``nn.Linear``), so Opacus computes
their per-sample gradients with its own Linear rule and the low-rank federated rules (FedSVD, FFA-LoRA, FedIT)
apply to them unchanged: ΔW = s·B·A is the whole weight here.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterLayer, check_dropout


class FactorizedLinear(AdapterLayer):
    """``scaling · lora_B(lora_A(x)) + bias`` in place of a dense ``nn.Linear`` (base policy ``replace``)."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, *, dropout: float = 0.0) -> None:
        super().__init__()
        check_dropout(dropout, "replace")
        factory = {"device": base.weight.device, "dtype": torch.promote_types(base.weight.dtype, torch.float32)}
        self._in_features, self._out_features = base.in_features, base.out_features
        self.base_dtype = base.weight.dtype  # what the merged layer computes in: the model's precision
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
        self.base_policy = "replace"
        self.merged = False

    @property
    def in_features(self) -> int:
        return self._in_features

    @property
    def out_features(self) -> int:
        return self._out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)  # the factors are float32 on a low-precision model
        y = self.adapter_forward(self.dropout(x).to(compute)).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x)) * self.scaling

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        """The factors; the frozen bias is a copy of the original layer's, not adapter state."""
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    def delta_weight(self) -> torch.Tensor:
        """The whole weight s·B·A (float32 at least)."""
        compute = torch.promote_types(self.lora_B.weight.dtype, torch.float32)
        return self.scaling * (self.lora_B.weight.to(compute) @ self.lora_A.weight.to(compute))

    def adapted_weight(self) -> torch.Tensor:
        return self.delta_weight()

    @torch.no_grad()
    def set_factors(self, B: torch.Tensor, A: torch.Tensor) -> None:
        self.lora_B.weight.copy_(B)
        self.lora_A.weight.copy_(A)

    def set_initial(self, tensors: dict[str, torch.Tensor]) -> None:
        self.set_factors(tensors["lora_B.weight"], tensors["lora_A.weight"])

    def merge(self) -> None:
        """Nothing to fold into: the factored form is already the layer (and the cheaper one to apply)."""

    def unmerge(self) -> None:
        """See :meth:`merge`."""

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` with weight s·B·A in the model's precision, computing the same function."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None,
            device=self.lora_A.weight.device, dtype=self.base_dtype,
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


"""DoRA (Liu et al., ICML 2024): magnitude × direction on top of the low-rank shape.

    W′ = diag(μ / n) · (W + s·B·A),   n = ‖W + s·B·A‖ per output row, treated as a constant in backward

y = μ ⊙ (W x + s·B A x) / n + b, exactly PEFT's ``use_dora=True`` forward (the bias is not rescaled; with dropout,
the base path sees x and the DoRA terms dropout(x), as in PEFT). μ (one value
per output, ``magnitude``) is a :class:`~fedspec.adapters.layers.Diagonal`, so its per-sample gradient
Σ_t g_t ⊙ h_t has an exact Opacus rule; A and B are the ``nn.Linear`` factors of :class:`LowRankLinear`.

Merge writes W′ into the base weight and caches n, as PEFT does, so unmerge can invert it:
W = W′ · n / μ − s·B·A. The cache is local (never saved or sent).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import adapter_dtype
from .lowrank import LowRankLinear
from .parts import Diagonal


class DoRALinear(LowRankLinear):
    def __init__(self, base: nn.Linear, rank: int, scaling: float, *, dropout: float = 0.0) -> None:
        super().__init__(base, rank, scaling, dropout=dropout, base_policy="keep")
        factory = {"device": base.weight.device, "dtype": adapter_dtype(base.weight)}
        self.magnitude = Diagonal(base.out_features, **factory)
        self._cached_norm: torch.Tensor | None = None

    def set_initial(self, tensors: dict[str, torch.Tensor]) -> None:
        super().set_initial(tensors)
        self.reset_magnitude()

    def lora_factors(self) -> None:
        """None: the row normalization makes W′ − W no low-rank product (PEFT stores DoRA in its own format)."""
        return None

    def direction_weight(self) -> torch.Tensor:
        """V = W + s·B·A in float32 at least (the base holds W while unmerged)."""
        return self.base.weight.to(adapter_dtype(self.base.weight)) + LowRankLinear.delta_weight(self)

    def weight_norm(self) -> torch.Tensor:
        """‖W + s·B·A‖ per output row, detached: DoRA treats it as a constant in backward."""
        with torch.no_grad():
            return torch.linalg.vector_norm(self.direction_weight(), dim=1)

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """μ ← ‖W + s·B·A‖_row: the adapted layer then equals its direction, i.e. the base when B·A = 0."""
        self.magnitude.weight.copy_(self.weight_norm().to(self.magnitude.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        x_in = self.dropout(x)
        compute = adapter_dtype(x)  # the adapter's own tensors are float32 at least (a low-precision base)
        base_in = nn.functional.linear(x_in, self.base.weight)
        direction = base_in.to(compute) + self.lora_B(self.lora_A(x_in.to(compute))) * self.scaling
        y = self.magnitude(direction / self.weight_norm().to(compute))
        if not isinstance(self.dropout, nn.Identity):  # PEFT: the base path sees x, the DoRA correction dropout(x)
            y = y + (nn.functional.linear(x, self.base.weight) - base_in).to(compute)
        y = y.to(x.dtype)
        return y if self.base.bias is None else y + self.base.bias

    def adapted_weight(self) -> torch.Tensor:
        V = self.direction_weight()
        return V * (self.magnitude.weight.to(V.dtype) / torch.linalg.vector_norm(V, dim=1).detach()).unsqueeze(1)

    def delta_weight(self) -> torch.Tensor:
        """W′ − W (not only s·B·A: the magnitude rescales the base rows too)."""
        return self.adapted_weight() - self.base.weight.to(adapter_dtype(self.base.weight))

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._cached_norm = self.weight_norm()
            self.base.weight.copy_(self.adapted_weight().to(self.base.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            if self._cached_norm is None:
                raise RuntimeError("DoRA unmerge needs the weight norm cached by merge() in this process")
            compute = adapter_dtype(self.base.weight)
            factor = (self._cached_norm.to(compute) / self.magnitude.weight.to(compute)).unsqueeze(1)
            original = self.base.weight.to(compute) * factor - LowRankLinear.delta_weight(self)
            self.base.weight.copy_(original.to(self.base.weight.dtype))
            self._cached_norm = None
            self.merged = False

    def to_linear(self) -> nn.Linear:
        linear = super().to_linear()
        if not self.merged:
            with torch.no_grad():
                linear.weight.copy_(self.adapted_weight())
        return linear

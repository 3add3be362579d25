"""Shape 3, spectrum: y = base(x) + left(g(right(x))), i.e. W′ = base + L·g(θ)·R with frozen bases.

``right`` (k×n) and ``left`` (m×k) are frozen ``nn.Linear`` submodules holding the bases (Vᵀ and U of an SVD, or
U_r and P·L_r of LoLDU's LU); ``spectrum`` is the trainable map g between them:
- :class:`~fedspec.adapters.layers.Diagonal`: SVFit (top-r σ′), CLIP-SVD (all k values s);
- :class:`~fedspec.adapters.layers.SaltSpectrum`: SALT (scale/shift of the top r, LoRA inside the rest, ReLU);
- :class:`~fedspec.adapters.layers.ScaledDiagonal`: LoLDU (z and the scalar σ).

The factors are applied to x (k-dimensional in between); the dense m×n weight is only built to merge.

Base policies: ``residual`` (SVFit, LoLDU): the base holds W − L·diag(init_spectrum)·R, where ``init_spectrum`` is
the starting diagonal of g, a fixed tensor; ``owned`` (CLIP-SVD, SALT): the base weight is zero, the bases and the
spectrum carry all of W (the full thin SVD reconstructs W to float rounding).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterLayer, adapter_dtype


class SpectralLinear(AdapterLayer):
    def __init__(
        self,
        base: nn.Linear,
        size: int,
        spectrum: nn.Module,
        *,
        scaling: float = 1.0,
        dropout: float = 0.0,
        base_policy: str = "residual",
    ) -> None:
        super().__init__()
        if base_policy not in ("residual", "owned"):
            raise ValueError(f"the spectrum shape supports base_policy 'residual' or 'owned', got {base_policy!r}")
        factory = self._setup(base, scaling, dropout, base_policy)
        self.size = size
        self.right = nn.Linear(base.in_features, size, bias=False, **factory).requires_grad_(False)
        self.spectrum = spectrum
        self.left = nn.Linear(size, base.out_features, bias=False, **factory).requires_grad_(False)
        if base_policy == "residual":
            self.init_spectrum = self._frozen_factor(size, factory=factory)

    def fixed_tensor_names(self) -> tuple[str, ...]:
        names = ("left.weight", "right.weight")
        names += tuple(f"spectrum.{n}" for n in getattr(self.spectrum, "fixed_names", ()))
        return names + (("init_spectrum",) if self.base_policy == "residual" else ())

    def removed_weight(self) -> torch.Tensor | None:
        if self.base_policy != "residual":
            return None
        compute = adapter_dtype(self.left.weight)
        return (self.left.weight.to(compute) * self.init_spectrum.to(compute)) @ self.right.weight.to(compute)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.left(self.spectrum(self.right(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        compute = adapter_dtype(self.left.weight)
        L, R, g = self.left.weight.to(compute), self.right.weight.to(compute), self.spectrum.matrix().to(compute)
        middle = L * g if g.ndim == 1 else L @ g
        return self.scaling * middle @ R

    @torch.no_grad()
    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For a residual base, L·(s·g − diag(init_spectrum))·R (rank ``size``); None for an owned base: the
        spectrum then carries all of W, a full-rank update."""
        if self.base_policy != "residual":
            return None
        compute = adapter_dtype(self.left.weight)
        g = self.spectrum.matrix().to(compute)
        middle = self.scaling * (torch.diag(g) if g.ndim == 1 else g) - torch.diag(self.init_spectrum.to(compute))
        return self.left.weight.to(compute) @ middle, self.right.weight.to(compute)

    def extra_repr(self) -> str:
        return f"size={self.size}, {super().extra_repr()}"

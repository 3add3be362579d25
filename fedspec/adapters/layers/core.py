"""Shape 2, low rank with a core: y = base(x) + s·B·C·A·x, C diagonal (r) or full (r×r).

SORSA (U_p, Σ_p, V_pᵀ), KaSA (B, λ, A), AdaLoRA (P, Λ, Q), SoRA (B, g, A), LoRA-XS (frozen U_rΣ_r and V_rᵀ, r×r R),
and Effort (the minor singular triplets, all three trained) are this module with different initializers, masks
and hooks. A and B are ``nn.Linear`` submodules and C is a :class:`~fedspec.adapters.layers.Diagonal` or an
``nn.Linear``, so every trainable tensor has an exact Opacus rule.

Base policies: ``keep`` (AdaLoRA, SoRA, LoRA-XS); ``residual`` (SORSA, Effort: the base holds W − R with R the
adapter's starting value); ``truncated`` (KaSA: R is W's r minor components, which the adapter does not start
from). R = removed_B·diag(removed_S)·removed_A is kept as fixed tensors so the base can always be rebuilt from W.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterLayer, adapter_dtype
from .parts import Diagonal


class LowRankCoreLinear(AdapterLayer):
    """``core="diagonal"`` or ``"full"``; ``fixed_factors=True`` makes A and B fixed (frozen, sent once: LoRA-XS);
    ``principal_rank`` > 0 also keeps the top singular factors of W (``principal_B``, ``principal_A``, fixed) for a
    regularizer that needs them (Effort's orthogonality loss)."""

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        scaling: float,
        *,
        dropout: float = 0.0,
        base_policy: str = "keep",
        core: str = "diagonal",
        fixed_factors: bool = False,
        principal_rank: int = 0,
    ) -> None:
        super().__init__()
        factory = self._setup(base, scaling, dropout, base_policy)
        if core not in ("diagonal", "full"):
            raise ValueError(f"core must be 'diagonal' or 'full', got {core!r}")
        self.rank = rank
        self.core_kind = core
        self.fixed_factors = fixed_factors
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.core = Diagonal(rank, **factory) if core == "diagonal" else nn.Linear(rank, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        if base_policy in ("residual", "truncated"):
            self.removed_A = self._frozen_factor(rank, base.in_features, factory=factory)
            self.removed_S = self._frozen_factor(rank, factory=factory)
            self.removed_B = self._frozen_factor(base.out_features, rank, factory=factory)
        self.principal_rank = principal_rank
        if principal_rank > 0:
            self.principal_A = self._frozen_factor(principal_rank, base.in_features, factory=factory)
            self.principal_B = self._frozen_factor(base.out_features, principal_rank, factory=factory)

    def fixed_tensor_names(self) -> tuple[str, ...]:
        names: tuple[str, ...] = ()
        if self.fixed_factors:
            names += ("lora_A.weight", "lora_B.weight")
        if self.base_policy in ("residual", "truncated"):
            names += ("removed_A", "removed_S", "removed_B")
        if self.principal_rank > 0:
            names += ("principal_A", "principal_B")
        return names

    def removed_weight(self) -> torch.Tensor | None:
        if self.base_policy not in ("residual", "truncated"):
            return None
        compute = adapter_dtype(self.removed_B)
        return (self.removed_B.to(compute) * self.removed_S.to(compute)) @ self.removed_A.to(compute)

    def core_matrix(self) -> torch.Tensor:
        """C as an r×r matrix."""
        weight = self.core.weight
        return torch.diag(weight) if self.core_kind == "diagonal" else weight

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.core(self.lora_A(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        compute = adapter_dtype(self.lora_B.weight)
        B, A = self.lora_B.weight.to(compute), self.lora_A.weight.to(compute)
        if self.core_kind == "diagonal":
            return self.scaling * (B * self.core.weight.to(compute)) @ A
        return self.scaling * B @ self.core.weight.to(compute) @ A

    @torch.no_grad()
    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """s·(B·C)·A, minus R = (removed_B·diag(removed_S))·removed_A for a residual or truncated base (rank 2r)."""
        compute = adapter_dtype(self.lora_B.weight)
        B = self.scaling * self.lora_B.weight.to(compute) @ self.core_matrix().to(compute)
        A = self.lora_A.weight.to(compute)
        if self.base_policy in ("residual", "truncated"):
            B = torch.cat([B, -self.removed_B.to(compute) * self.removed_S.to(compute)], dim=1)
            A = torch.cat([A, self.removed_A.to(compute)], dim=0)
        return B, A

    def extra_repr(self) -> str:
        return f"rank={self.rank}, core={self.core_kind!r}, {super().extra_repr()}"

"""Shape 1, the low-rank additive adapter: y = W_base·x + b + s·B·(A·x).

Laid out for Opacus: the trainable factors are ``nn.Linear`` submodules (exact per-sample gradients from
Opacus' own Linear rule), and the frozen tensors are ``nn.Parameter(requires_grad=False)``, never buffers.
No per-sample gradient is ever computed for the frozen base weight.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterLayer, zero_factor


class LowRankLinear(AdapterLayer):
    """A frozen ``nn.Linear`` plus ``scaling · lora_B(lora_A(x))``.

    ``init_lora_A`` / ``init_lora_B`` hold the factors the residual was computed from when the base policy is
    "residual" (PiSSA, MiLoRA): the original weight is ``base.weight + scaling · init_B · init_A``.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        scaling: float,
        *,
        dropout: float = 0.0,
        base_policy: str = "keep",
    ) -> None:
        super().__init__()
        factory = self._setup(base, scaling, dropout, base_policy)
        self.lora_A = zero_factor(base.in_features, rank, factory)
        self.lora_B = zero_factor(rank, base.out_features, factory)
        self.rank = rank
        if base_policy == "residual":
            self.init_lora_A = nn.Parameter(torch.zeros(rank, base.in_features, **factory), requires_grad=False)
            self.init_lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory), requires_grad=False)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x)) * self.scaling

    def fixed_tensor_names(self) -> tuple[str, ...]:
        return ("init_lora_A", "init_lora_B") if self.base_policy == "residual" else ()

    def removed_weight(self) -> torch.Tensor | None:
        if self.base_policy != "residual":
            return None
        compute = torch.promote_types(self.init_lora_B.dtype, torch.float32)
        return self.scaling * (self.init_lora_B.to(compute) @ self.init_lora_A.to(compute))

    def delta_weight(self) -> torch.Tensor:
        """s·B·A, computed in float32 at least so a merge does not lose precision in low-precision models."""
        compute = torch.promote_types(self.lora_B.weight.dtype, torch.float32)
        return self.scaling * (self.lora_B.weight.to(compute) @ self.lora_A.weight.to(compute))

    @torch.no_grad()
    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """s·B·A, and for a residual base s·(B·A − B₀·A₀) = [s·B | −s·B₀]·[A ; A₀] (rank 2r), as PEFT's PiSSA
        conversion does."""
        compute = torch.promote_types(self.lora_B.weight.dtype, torch.float32)
        B, A = self.scaling * self.lora_B.weight.to(compute), self.lora_A.weight.to(compute)
        if self.base_policy == "residual":
            B = torch.cat([B, -self.scaling * self.init_lora_B.to(compute)], dim=1)
            A = torch.cat([A, self.init_lora_A.to(compute)], dim=0)
        return B, A

    @torch.no_grad()
    def set_factors(self, B: torch.Tensor, A: torch.Tensor) -> None:
        self.lora_B.weight.copy_(B)
        self.lora_A.weight.copy_(A)

    def set_initial(self, tensors: dict[str, torch.Tensor]) -> None:
        """Starting factors from the initializer; a residual base becomes W − s·B0·A0."""
        B, A = tensors["lora_B.weight"], tensors["lora_A.weight"]
        self.set_factors(B, A)
        if self.base_policy == "residual":
            self.set_residual_init(B, A)

    @torch.no_grad()
    def set_residual_init(self, B0: torch.Tensor, A0: torch.Tensor) -> None:
        """Turn the base into W - s·B0·A0, where W is the current original weight.

        When the layer already holds a residual, W is rebuilt from the old init factors first, so loading an
        adapter whose init differs from the current one stays correct.
        """
        if self.base_policy != "residual":
            raise ValueError("set_residual_init needs base_policy='residual'")
        weight = self.base.weight
        compute = torch.promote_types(weight.dtype, torch.float32)
        # W_res = W_old + s·B_old·A_old − s·B0·A0 = W_old + s·[B_old, B0]·[A_old; −A0]: one low-rank update
        # (rank r on first initialization, 2r when replacing an earlier residual), done in place — a single
        # pass over W — when the weight is already float32/64.
        B_cat, A_cat = B0.to(compute), -A0.to(compute)
        if self.init_lora_B.any():  # a residual is already in place: undo it in the same update
            B_cat = torch.cat([self.init_lora_B.to(compute), B_cat], dim=1)
            A_cat = torch.cat([self.init_lora_A.to(compute), A_cat], dim=0)
        if weight.dtype == compute:
            weight.addmm_(B_cat, A_cat, alpha=self.scaling)
        else:  # half precision: add in float32, round once
            weight.copy_(torch.addmm(weight.to(compute), B_cat, A_cat, alpha=self.scaling).to(weight.dtype))
        self.init_lora_B.copy_(B0)
        self.init_lora_A.copy_(A0)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, {super().extra_repr()}"

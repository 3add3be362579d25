"""Shape 4, factor: W′ = U·diag(σ)·Vᵀ kept factored, the factors themselves train — SST (sparse spectral training).

The k singular triplets are split into r *sampled* ones, whose vectors train (``sel_left``: m×r, ``sel_right``:
r×n, ``nn.Linear``), and the k−r others, whose vectors are frozen (``rest_left``, ``rest_right``). All k singular
values train (``spectrum``, a :class:`~fedspec.adapters.layers.Diagonal`, ordered [sampled | rest]). The adapter
owns the weight: the base weight is zero and only its bias is used.

:meth:`resample` folds the trained vectors back, optionally re-orthogonalizes by an SVD of U·diag(σ)·Vᵀ (SST's
periodic re-SVD, which also re-ranks the spectrum), and draws a new set of r triplets, multinomially with
probability ∝ σ_i and without replacement. The frozen vectors change there, so they are *server* tensors: in a
federation the server resamples between rounds and broadcasts them.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterLayer, adapter_dtype
from .parts import Diagonal


class FactorLinear(AdapterLayer):
    def __init__(self, base: nn.Linear, size: int, rank: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        factory = self._setup(base, 1.0, dropout, "owned")
        if not 1 <= rank <= size:
            raise ValueError(f"rank must be in [1, {size}], got {rank}")
        self.size, self.rank = size, rank
        m, n = base.out_features, base.in_features
        self.sel_right = nn.Linear(n, rank, bias=False, **factory)
        self.rest_right = nn.Linear(n, size - rank, bias=False, **factory).requires_grad_(False)
        self.spectrum = Diagonal(size, **factory)
        self.sel_left = nn.Linear(rank, m, bias=False, **factory)
        self.rest_left = nn.Linear(size - rank, m, bias=False, **factory).requires_grad_(False)

    def server_tensor_names(self) -> tuple[str, ...]:
        return ("rest_left.weight", "rest_right.weight")

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.spectrum(torch.cat([self.sel_right(x), self.rest_right(x)], dim=-1))
        return self.sel_left(z[..., : self.rank]) + self.rest_left(z[..., self.rank:])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U m×k, σ k, Vᵀ k×n) in the [sampled | rest] order, float32 at least."""
        compute = adapter_dtype(self.sel_left.weight)
        U = torch.cat([self.sel_left.weight, self.rest_left.weight], dim=1).to(compute)
        Vh = torch.cat([self.sel_right.weight, self.rest_right.weight], dim=0).to(compute)
        return U, self.spectrum.weight.to(compute), Vh

    def delta_weight(self) -> torch.Tensor:
        U, S, Vh = self.factors()
        return (U * S) @ Vh

    @torch.no_grad()
    def set_factors(self, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, chosen: torch.Tensor) -> None:
        """Load factors (any order) and make ``chosen`` (r indices) the trainable triplets."""
        mask = torch.ones(S.numel(), dtype=torch.bool)
        mask[chosen] = False
        order = torch.cat([chosen, torch.arange(S.numel())[mask]])
        U, S, Vh = U[:, order], S[order], Vh[order]
        r = self.rank
        self.sel_left.weight.copy_(U[:, :r])
        self.rest_left.weight.copy_(U[:, r:])
        self.sel_right.weight.copy_(Vh[:r])
        self.rest_right.weight.copy_(Vh[r:])
        self.spectrum.weight.copy_(S)

    @torch.no_grad()
    def resample(self, generator: torch.Generator, *, resvd: bool) -> torch.Tensor:
        """Draw a new trainable set (∝ σ, without replacement); first re-SVD the factored weight if ``resvd``.
        Returns the chosen indices (into the re-ordered spectrum)."""
        U, S, Vh = self.factors()
        if resvd:
            # SVD of U·diag(σ)·Vᵀ through thin QRs of U and Vᵀ: k×k work on the core, exact for the product.
            Qu, Ru = torch.linalg.qr(U.double())
            Qv, Rv = torch.linalg.qr(Vh.double().T)
            Uc, S, Vhc = torch.linalg.svd((Ru * S.double()) @ Rv.T)
            U, Vh = (Qu @ Uc).to(U.dtype), (Vhc @ Qv.T).to(Vh.dtype)
            S = S.to(self.spectrum.weight.dtype)
        weights = S.abs().double().cpu()
        # A floor keeps the draw defined when fewer than r singular values are non-zero.
        weights = weights.clamp_min(float(weights.max()) * 1e-12 if float(weights.max()) > 0 else 1.0)
        chosen = torch.multinomial(weights, self.rank, replacement=False, generator=generator)
        self.set_factors(U, S, Vh, chosen)
        return chosen

    def extra_repr(self) -> str:
        return f"size={self.size}, rank={self.rank}, {super().extra_repr()}"

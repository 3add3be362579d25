"""Small trainable modules the structured adapter shapes are built from, each with an exact Opacus rule.

Opacus computes per-sample gradients layer by layer from the layer's input (activations) and the gradient of
its output (backprops). ``nn.Linear`` has a built-in rule; these modules register their own grad sampler and
norm sampler (ghost clipping), so Opacus never falls back to functorch — which would also compute per-sample
gradients of every frozen tensor in the module. Frozen tensors inside them are ``nn.Parameter``\\ s with
``requires_grad=False`` (never buffers: Opacus refuses trainable modules with buffers); the rules return
gradients only for the tensors that train.

The rules are registered the first time one of these modules is built, so importing fedspec does not import
Opacus (several seconds) for users who never train privately.

Per example i, with activations x (…, k) summed over tokens t and backprops g = ∂L/∂y:
- :class:`Diagonal`        y = x ⊙ w:                 ∂L_i/∂w = Σ_t g_t ⊙ x_t
- :class:`ScaledDiagonal`  y = c·(x ⊙ z):             ∂L_i/∂z = c·Σ_t g_t ⊙ x_t,  ∂L_i/∂c = Σ_t Σ_j z_j g_tj x_tj
- :class:`SaltSpectrum`    y = ReLU(Σ′)·x (SALT):     see :func:`_salt_grad_sample`
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

_REGISTERED = False


def _tokens_sum(backprops: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """Σ_t g_t ⊙ x_t per example: (n, …, k) × (n, …, k) → (n, k)."""
    return torch.einsum("n...k,n...k->nk", backprops, activations.to(backprops.dtype))


class Diagonal(nn.Module):
    """y = x ⊙ weight over the last dimension: a diagonal core (AdaLoRA λ, SoRA gates, KaSA λ, SORSA Σ_p), a
    trainable spectrum (SVFit σ′, CLIP-SVD s, SST Σ) or DoRA's magnitude."""

    def __init__(self, size: int, *, device=None, dtype=None) -> None:
        super().__init__()
        register_opacus_rules()
        self.weight = nn.Parameter(torch.ones(size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    def matrix(self) -> torch.Tensor:
        """The diagonal as a vector (the spectrum shapes multiply it into their bases)."""
        return self.weight

    def extra_repr(self) -> str:
        return f"size={self.weight.numel()}"


class ScaledDiagonal(nn.Module):
    """y = scale · (x ⊙ weight): LoLDU's trainable diagonal z (``weight``) and scalar σ (``scale``)."""

    def __init__(self, size: int, *, device=None, dtype=None) -> None:
        super().__init__()
        register_opacus_rules()
        self.weight = nn.Parameter(torch.ones(size, device=device, dtype=dtype))
        self.scale = nn.Parameter(torch.ones(1, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.weight * self.scale)

    def matrix(self) -> torch.Tensor:
        return self.weight * self.scale

    def extra_repr(self) -> str:
        return f"size={self.weight.numel()}"


class SaltSpectrum(nn.Module):
    """SALT's spectrum map y = ReLU(Σ′)·x in the singular basis, with

        Σ′ = blockdiag(diag(scale ⊙ σ_top + shift), diag(σ_rest) + lora_X·lora_Y)

    ``sigma`` (all k singular values) is frozen; ``scale``, ``shift`` (r each), ``lora_X`` ((k−r)×r_L) and
    ``lora_Y`` (r_L×(k−r)) train. The ReLU acts elementwise on the whole matrix Σ′ as in the reference code
    (``F.relu(new_s)``), so negative off-diagonal entries of X·Y are clipped too; the zero off-diagonal blocks stay
    zero. The map is applied to x in the singular basis — Σ′ is (k−r)² — rather than rebuilding the m×n weight at
    every forward as the reference does.
    """

    fixed_names = ("sigma",)

    def __init__(self, size: int, rank: int, lora_rank: int, *, device=None, dtype=None) -> None:
        super().__init__()
        register_opacus_rules()
        factory = {"device": device, "dtype": dtype}
        self.rank = rank
        rest = size - rank
        self.sigma = nn.Parameter(torch.zeros(size, **factory), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(rank, **factory))
        self.shift = nn.Parameter(torch.zeros(rank, **factory))
        self.lora_rank = lora_rank if rest > 0 else 0
        if self.lora_rank > 0:
            self.lora_X = nn.Parameter(torch.zeros(rest, self.lora_rank, **factory))
            self.lora_Y = nn.Parameter(torch.zeros(self.lora_rank, rest, **factory))

    def top_values(self) -> torch.Tensor:
        return self.scale * self.sigma[: self.rank] + self.shift

    def rest_block(self) -> torch.Tensor | None:
        """diag(σ_rest) + X·Y before the ReLU, or None when there is no residual LoRA."""
        if self.lora_rank == 0:
            return None
        return torch.diag(self.sigma[self.rank:]) + self.lora_X @ self.lora_Y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rank
        top = x[..., :r] * F.relu(self.top_values())
        block = self.rest_block()
        rest = x[..., r:] * F.relu(self.sigma[r:]) if block is None else x[..., r:] @ F.relu(block).T
        return torch.cat([top, rest], dim=-1)

    def matrix(self) -> torch.Tensor:
        """ReLU(Σ′) as a dense k×k matrix (for merging)."""
        r, k = self.rank, self.sigma.numel()
        out = torch.zeros(k, k, dtype=self.sigma.dtype, device=self.sigma.device)
        out[:r, :r] = torch.diag(F.relu(self.top_values()))
        block = self.rest_block()
        out[r:, r:] = torch.diag(F.relu(self.sigma[r:])) if block is None else F.relu(block)
        return out

    def extra_repr(self) -> str:
        return f"size={self.sigma.numel()}, rank={self.rank}, lora_rank={self.lora_rank}"


# --- Opacus rules ---------------------------------------------------------------------------------------------


def _diagonal_grad_sample(layer: Diagonal, activations, backprops):
    if not layer.weight.requires_grad:
        return {}
    return {layer.weight: _tokens_sum(backprops, activations[0])}


def _scaled_diagonal_grad_sample(layer: ScaledDiagonal, activations, backprops):
    per_entry = _tokens_sum(backprops, activations[0])  # Σ_t g ⊙ x, (n, k)
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = per_entry * layer.scale
    if layer.scale.requires_grad:
        out[layer.scale] = (per_entry * layer.weight).sum(-1, keepdim=True)
    return out


def _salt_grad_sample(layer: SaltSpectrum, activations, backprops):
    """Top block: y_j = ReLU(a_j) x_j with a = scale⊙σ_top + shift, so ∂L_i/∂scale = Σ_t g x ⊙ σ_top ⊙ 1[a>0] and
    ∂L_i/∂shift = Σ_t g x ⊙ 1[a>0]. Rest block: y = ReLU(M) x with M = D + XY, so ∂L_i/∂M = (Σ_t g_t x_tᵀ) ⊙ 1[M>0]
    =: G_i, and ∂L_i/∂X = G_i Yᵀ, ∂L_i/∂Y = Xᵀ G_i."""
    x = activations[0].to(backprops.dtype)
    r = layer.rank
    out = {}
    top = _tokens_sum(backprops[..., :r], x[..., :r]) * (layer.top_values() > 0)
    if layer.scale.requires_grad:
        out[layer.scale] = top * layer.sigma[:r]
    if layer.shift.requires_grad:
        out[layer.shift] = top
    if layer.lora_rank > 0 and (layer.lora_X.requires_grad or layer.lora_Y.requires_grad):
        G = torch.einsum("n...i,n...j->nij", backprops[..., r:], x[..., r:]) * (layer.rest_block() > 0)
        if layer.lora_X.requires_grad:
            out[layer.lora_X] = G @ layer.lora_Y.T
        if layer.lora_Y.requires_grad:
            out[layer.lora_Y] = layer.lora_X.T @ G
    return out


def register_opacus_rules() -> None:
    """Register the grad and norm samplers of the modules above with Opacus (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from ...privacy.grad_samplers import register_rule  # imports Opacus: only once a part is built

    register_rule(Diagonal, _diagonal_grad_sample)
    register_rule(ScaledDiagonal, _scaled_diagonal_grad_sample)
    register_rule(SaltSpectrum, _salt_grad_sample)
    _REGISTERED = True

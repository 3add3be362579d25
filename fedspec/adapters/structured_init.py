"""Initializers of the structured shapes (low rank with a core, spectrum, factor) and DoRA.

Each takes a batch of same-shape weights ``W`` (b, out, in) in float32/float64 and returns a dict of batched
tensors (leading dimension b) named as the layer's parameters (``"lora_A.weight"``, ``"core.weight"``,
``"removed_S"``, ...); the layer's ``set_initial`` loads them and derives its base. Decompositions run in the
compute dtype (float32, or float64 for a float64 model; a float32 SVD reconstructs W to ~1e-6 relative, and the
residual methods equal W at start by construction whatever the SVD's precision) and never draw from the global
RNG: random parts come from the generator the injector passes.
"""

from __future__ import annotations

import math

import torch

from ..svd import PassBuffer, truncated_svd
from . import initializers


def _full_svd(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(weights, full_matrices=False)


def _kaiming_uniform(shape: tuple[int, ...], fan_in: int, generator: torch.Generator, dtype) -> torch.Tensor:
    """nn.Linear's default (Kaiming uniform with a = √5): U(−1/√fan_in, 1/√fan_in), PEFT's LoRA-A init."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator, dtype=dtype) * 2 - 1) * bound


def _cast(tensors: dict[str, torch.Tensor], dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype).contiguous() for k, v in tensors.items()}


# --- shape 2: low rank with a core -----------------------------------------------------------------------------


def sorsa(weights: torch.Tensor, rank: int, scaling: float, **_: object) -> dict[str, torch.Tensor]:
    """SORSA (Cao & Song, 2024): U_p, Σ_p, V_pᵀ = the top-r triplets of an exact SVD; the base keeps
    W_res = W − s·U_p·diag(Σ_p)·V_pᵀ (s = α/r, 1 by default), so the layer equals W at initialization."""
    U, S, Vh = _full_svd(weights)
    U, S, Vh = U[..., :rank], S[..., :rank], Vh[..., :rank, :]
    return _cast({"lora_B.weight": U, "core.weight": S, "lora_A.weight": Vh,
                  "removed_B": U, "removed_S": scaling * S, "removed_A": Vh}, weights.dtype)


def effort(weights: torch.Tensor, rank: int, scaling: float, *, orthogonality_weight: float = 0.0,
           **_: object) -> dict[str, torch.Tensor]:
    """Effort (Yan et al., ICML 2025): U_res, S_res, V_resᵀ = the ``rank`` minor triplets of an exact SVD train;
    the base keeps W_main = W − s·U_res·diag(S_res)·V_resᵀ, the top k − rank triplets. With an orthogonality loss
    the top factors U_r, V_rᵀ (without Σ) are kept too, which that loss needs."""
    U, S, Vh = _full_svd(weights)
    Um, Sm, Vhm = U[..., -rank:], S[..., -rank:], Vh[..., -rank:, :]
    out = {"lora_B.weight": Um, "core.weight": Sm, "lora_A.weight": Vhm,
           "removed_B": Um, "removed_S": scaling * Sm, "removed_A": Vhm}
    if orthogonality_weight > 0:
        keep = S.shape[-1] - rank
        out.update({"principal_B": U[..., :keep], "principal_A": Vh[..., :keep, :]})
    return _cast(out, weights.dtype)


def kasa(weights: torch.Tensor, rank: int, scaling: float, *, generator: torch.Generator,
         **_: object) -> dict[str, torch.Tensor]:
    """KaSA (Wang et al., ICLR 2025): the base drops W's r smallest singular triplets (kept here as the fixed
    ``removed_*`` tensors, so the truncation can be rebuilt from W); B = 0, A Kaiming-uniform, λ ~ N(0, 1), as PEFT's
    ``KasaConfig``: ΔW = 0, so the layer starts at W_world = W − (minor part), not at W."""
    b, m, n = weights.shape
    U, S, Vh = _full_svd(weights)
    return _cast({
        "removed_B": U[..., -rank:], "removed_S": S[..., -rank:], "removed_A": Vh[..., -rank:, :],
        "lora_B.weight": torch.zeros(b, m, rank, dtype=weights.dtype),
        "lora_A.weight": _kaiming_uniform((b, rank, n), n, generator, weights.dtype),
        "core.weight": torch.randn(b, rank, generator=generator, dtype=weights.dtype),
    }, weights.dtype)


def adalora(weights: torch.Tensor, rank: int, scaling: float, *, generator: torch.Generator,
            **_: object) -> dict[str, torch.Tensor]:
    """AdaLoRA (Zhang et al., ICLR 2023): Λ = 0, P and Q ~ N(0, 0.02²) as PEFT; the layer equals W at start."""
    b, m, n = weights.shape
    return _cast({
        "lora_B.weight": 0.02 * torch.randn(b, m, rank, generator=generator, dtype=weights.dtype),
        "lora_A.weight": 0.02 * torch.randn(b, rank, n, generator=generator, dtype=weights.dtype),
        "core.weight": torch.zeros(b, rank, dtype=weights.dtype),
    }, weights.dtype)


def sora(weights: torch.Tensor, rank: int, scaling: float, *, generator: torch.Generator,
         **_: object) -> dict[str, torch.Tensor]:
    """SoRA (Ding et al., EMNLP 2023): A Kaiming-uniform, B = 0, gate g ~ N(0, 1); ΔW = 0 at start."""
    b, m, n = weights.shape
    return _cast({
        "lora_A.weight": _kaiming_uniform((b, rank, n), n, generator, weights.dtype),
        "lora_B.weight": torch.zeros(b, m, rank, dtype=weights.dtype),
        "core.weight": torch.randn(b, rank, generator=generator, dtype=weights.dtype),
    }, weights.dtype)


def lora_xs(weights: torch.Tensor, rank: int, scaling: float, *, generator: torch.Generator,
            svd_method: str = "exact", niter: int = 4, oversample: int = 8, pass_precision: str = "full",
            pass_buffer: PassBuffer | None = None, init_std: float = 1e-5, **_: object) -> dict[str, torch.Tensor]:
    """LoRA-XS (Bałazy et al., 2024): frozen B = U_r·Σ_r and A = V_rᵀ from a top-r SVD (no residual subtraction:
    the base keeps W); the r×r R ~ N(0, ``init_std``²), 1e-5 as in the paper, so the layer is W to ~1e-5."""
    b = weights.shape[0]
    U, S, Vh = truncated_svd(weights, rank, method=svd_method, niter=niter, oversample=oversample,
                             generator=generator, pass_precision=pass_precision,
                             pass_buffer=pass_buffer)
    return _cast({
        "lora_B.weight": U * S.unsqueeze(-2), "lora_A.weight": Vh,
        "core.weight": init_std * torch.randn(b, rank, rank, generator=generator, dtype=weights.dtype),
    }, weights.dtype)


# --- shape 3: spectrum -----------------------------------------------------------------------------------------


def svfit(weights: torch.Tensor, rank: int, scaling: float, **_: object) -> dict[str, torch.Tensor]:
    """SVFit (Sun et al., 2024): bases U_r, V_rᵀ of the top r triplets (exact SVD), σ′ starts at σ_{1..r}; the base
    keeps W_e = W − U_r·diag(σ)·V_rᵀ."""
    U, S, Vh = _full_svd(weights)
    U, S, Vh = U[..., :rank], S[..., :rank], Vh[..., :rank, :]
    return _cast({"left.weight": U, "right.weight": Vh, "spectrum.weight": S, "init_spectrum": S}, weights.dtype)


def clip_svd(weights: torch.Tensor, rank: int, scaling: float, **_: object) -> dict[str, torch.Tensor]:
    """CLIP-SVD (Koleilat et al., 2025): the full thin SVD W = U·diag(s)·Vᵀ (all k values, exact reconstruction);
    s trains, U and V are frozen; the adapter owns the weight."""
    U, S, Vh = _full_svd(weights)
    return _cast({"left.weight": U, "right.weight": Vh, "spectrum.weight": S}, weights.dtype)


def salt(weights: torch.Tensor, rank: int, scaling: float, *, generator: torch.Generator, lora_rank: int = 8,
         **_: object) -> dict[str, torch.Tensor]:
    """SALT (Elsayed et al., 2025): the full thin SVD, frozen; scale α = 1, shift β = 0 for the top r values; the
    LoRA X·Y inside the residual spectrum starts as in the SAM2 code (X Kaiming-uniform, Y = 0), so Σ′ = Σ and the
    layer equals W at initialization (the older SAM code's 0.01·randn for both would not)."""
    b = weights.shape[0]
    U, S, Vh = _full_svd(weights)
    k = S.shape[-1]
    out = {"left.weight": U, "right.weight": Vh, "spectrum.sigma": S,
           "spectrum.scale": torch.ones(b, rank, dtype=weights.dtype),
           "spectrum.shift": torch.zeros(b, rank, dtype=weights.dtype)}
    if lora_rank > 0 and k > rank:
        out["spectrum.lora_X"] = _kaiming_uniform((b, k - rank, lora_rank), lora_rank, generator, weights.dtype)
        out["spectrum.lora_Y"] = torch.zeros(b, lora_rank, k - rank, dtype=weights.dtype)
    return _cast(out, weights.dtype)


def loldu(weights: torch.Tensor, rank: int, scaling: float, **_: object) -> dict[str, torch.Tensor]:
    """LoLDU (Shi et al., 2024): LU with partial pivoting W = P·L·U_lu, D = diag(U_lu), U = D⁻¹·U_lu. The bases are
    P·L_r (the permutation folded into L's first r columns: an m×r matrix, not a dense m×m P) and U_r (first r rows
    of U); z starts at D_{1..r}, the scalar σ at α/r; the base keeps W − σ·P·L_r·diag(z)·U_r."""
    # One LU per matrix: with torch 2.13's CPU build, a *batched* torch.linalg.lu after torch.set_num_threads (as
    # every simulated client calls) stops in MKL ("Parameter 6 was incorrect on entry to SLASWP") and hangs.
    P, L, U_lu = (torch.stack(t) for t in zip(*(torch.linalg.lu(w) for w in weights)))
    D = torch.diagonal(U_lu, dim1=-2, dim2=-1)[..., :rank]
    left = P @ L[..., :rank]
    right = U_lu[..., :rank, :] / D.unsqueeze(-1)
    b = weights.shape[0]
    scale = torch.full((b, 1), scaling, dtype=weights.dtype)
    return _cast({"left.weight": left, "right.weight": right, "spectrum.weight": D, "spectrum.scale": scale,
                  "init_spectrum": scaling * D}, weights.dtype)


# --- shape 4: factor -------------------------------------------------------------------------------------------


def sst(weights: torch.Tensor, rank: int, scaling: float, *, generator: torch.Generator,
        **_: object) -> dict[str, torch.Tensor]:
    """SST (Zhao et al., 2024): the full thin SVD of W; r triplets drawn multinomially ∝ σ (without replacement)
    become the trainable ones, ordered first."""
    U, S, Vh = _full_svd(weights)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in
                                          ("sel_left.weight", "rest_left.weight", "sel_right.weight",
                                           "rest_right.weight", "spectrum.weight")}
    for i in range(weights.shape[0]):
        chosen = torch.multinomial(S[i].clamp_min(1e-30).cpu(), rank, replacement=False, generator=generator)
        mask = torch.ones(S.shape[-1], dtype=torch.bool)
        mask[chosen] = False
        order = torch.cat([chosen, torch.arange(S.shape[-1])[mask]])
        Ui, Si, Vi = U[i][:, order], S[i][order], Vh[i][order]
        out["sel_left.weight"].append(Ui[:, :rank])
        out["rest_left.weight"].append(Ui[:, rank:])
        out["sel_right.weight"].append(Vi[:rank])
        out["rest_right.weight"].append(Vi[rank:])
        out["spectrum.weight"].append(Si)
    return _cast({k: torch.stack(v) for k, v in out.items()}, weights.dtype)


# --- DoRA ------------------------------------------------------------------------------------------------------


def dora(weights: torch.Tensor, rank: int, scaling: float, *, generator: torch.Generator,
         **options: object) -> dict[str, torch.Tensor]:
    """DoRA (Liu et al., ICML 2024): the LoRA init (A Gaussian, B = 0); the layer sets μ = ‖W‖_row itself."""
    B, A = initializers.lora_gaussian(weights, rank, scaling, generator=generator)
    return {"lora_B.weight": B, "lora_A.weight": A}

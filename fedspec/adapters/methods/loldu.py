"""LoLDU (Shi et al., 2024): W_res + σ·P·L_r·diag(z)·U_r from an LU with pivoting; z and the scalar σ train
(in a federation σ is the server's, which makes the method linear in what clients train)."""

from __future__ import annotations

import torch

from ..layers import ScaledDiagonal, SpectralLinear
from ..registry import MethodSpec, register
from .common import cast, factory


def build_layer(base, rank, scaling, *, dropout, options) -> SpectralLinear:
    return SpectralLinear(base, rank, ScaledDiagonal(rank, **factory(base)), dropout=dropout, base_policy="residual")


def initialize(weights: torch.Tensor, rank: int, scaling: float, **_: object) -> dict[str, torch.Tensor]:
    """LoLDU (Shi et al., 2024): LU with partial pivoting W = P·L·U_lu, D = diag(U_lu), U = D⁻¹·U_lu. The bases are
    P·L_r (the permutation folded into L's first r columns: an m×r matrix, not a dense m×m P) and U_r (first r rows
    of U); z starts at D_{1..r}, the scalar σ at α/r; the base keeps W − σ·P·L_r·diag(z)·U_r."""
    # One LU per matrix: with torch 2.13's CPU build, a *batched* torch.linalg.lu after torch.set_num_threads (as
    # every simulated client calls) stops in MKL ("Parameter 6 was incorrect on entry to SLASWP") and hangs.
    P, L, U_lu = (torch.stack(t) for t in zip(*(torch.linalg.lu(w) for w in weights)))
    D = torch.diagonal(U_lu, dim1=-2, dim2=-1)[..., :rank]
    left = P @ L[..., :rank]
    # A (near-)zero pivot — a dead input column, or leading columns that depend on earlier ones — keeps its row of
    # U_lu undivided: z starts at that pivot (≈ 0), so the product is unchanged, and no inf or NaN reaches the model.
    tiny = torch.finfo(D.dtype).eps * D.abs().amax(-1, keepdim=True)
    right = U_lu[..., :rank, :] / torch.where(D.abs() > tiny, D, torch.ones_like(D)).unsqueeze(-1)
    b = weights.shape[0]
    scale = torch.full((b, 1), scaling, dtype=weights.dtype)
    return cast({"left.weight": left, "right.weight": right, "spectrum.weight": D, "spectrum.scale": scale,
                  "init_spectrum": scaling * D}, weights.dtype)


register(MethodSpec(name="loldu", initializer=initialize, base_policy="residual", layer=build_layer,
                    init_needs="weights (LU)", federated="linear", federated_frozen=("spectrum.scale",)))

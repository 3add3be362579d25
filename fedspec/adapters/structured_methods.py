"""The registered methods of shapes 2–4 (low rank with a core, spectrum, factor) and DoRA.

Each registration is one combination: a layer (shape + structural options), an initializer, a base policy, the
trainable mask (the layer's fixed and server tensors, plus ``federated_frozen``), hooks, and the federated rule.
Where a paper leaves a choice open, the choice is stated in the initializer's or hook's docstring.

Federated rules ("linear": FedAvg of what clients train is exactly the average of their ΔW; "nonlinear": FedAvg is
an approximation):
- linear: LoRA-XS (R), SVFit (σ′), CLIP-SVD (s), LoLDU (z; its scalar σ is server-owned in a federation).
- nonlinear: SORSA, KaSA, AdaLoRA, SoRA, Effort (products of trained factors); SALT (α, β average exactly while
  every adapted singular value stays ≥ 0, the X·Y product does not); DoRA (row normalization); SST (the server
  resamples and re-SVDs between rounds, so the frozen vectors are broadcast every round).
"""

from __future__ import annotations

from torch import nn

from ..errors import AdapterError
from . import structured_hooks as hooks
from . import structured_init as init
from .core import LowRankCoreLinear
from .factor import FactorLinear
from .layer import _compute_dtype
from .magnitude import DoRALinear
from .parts import Diagonal, SaltSpectrum, ScaledDiagonal
from .registry import MethodSpec, register
from .spectral import SpectralLinear


def _full_rank(base: nn.Linear) -> int:
    return min(base.in_features, base.out_features)


def _factory(base: nn.Linear) -> dict:
    """Where and in which dtype a layer's own parts live: float32 at least, as every adapter tensor."""
    return {"device": base.weight.device, "dtype": _compute_dtype(base.weight)}


def _core_layer(base_policy: str, *, core: str = "diagonal", fixed_factors: bool = False):
    def build(base: nn.Linear, rank: int, scaling: float, *, dropout: float, options: dict) -> LowRankCoreLinear:
        return LowRankCoreLinear(base, rank, scaling, dropout=dropout, base_policy=base_policy, core=core,
                                 fixed_factors=fixed_factors)

    return build


def _kasa_layer(base: nn.Linear, rank: int, scaling: float, *, dropout: float, options: dict) -> LowRankCoreLinear:
    if rank >= _full_rank(base):
        raise AdapterError(f"adapter.rank={rank}: KaSA drops the r smallest singular triplets and must keep at least "
                           f"one; choose adapter.rank < {_full_rank(base)}")
    return LowRankCoreLinear(base, rank, scaling, dropout=dropout, base_policy="truncated")


def _effort_layer(base: nn.Linear, rank: int, scaling: float, *, dropout: float, options: dict) -> LowRankCoreLinear:
    principal = _full_rank(base) - rank if float(options["orthogonality_weight"]) > 0 else 0
    return LowRankCoreLinear(base, rank, scaling, dropout=dropout, base_policy="residual", principal_rank=principal)


def _svfit_layer(base, rank, scaling, *, dropout, options) -> SpectralLinear:
    return SpectralLinear(base, rank, Diagonal(rank, **_factory(base)), dropout=dropout, base_policy="residual")


def _clip_svd_layer(base, rank, scaling, *, dropout, options) -> SpectralLinear:
    k = _full_rank(base)
    return SpectralLinear(base, k, Diagonal(k, **_factory(base)), dropout=dropout, base_policy="owned")


def _salt_layer(base, rank, scaling, *, dropout, options) -> SpectralLinear:
    k = _full_rank(base)
    lora_rank = int(options["lora_rank"])
    if lora_rank < 0 or (rank < k and lora_rank > k - rank):
        raise AdapterError(f"adapter.options.lora_rank={lora_rank} must be in [0, {k - rank}] (the residual "
                           f"spectrum has k - adapter.rank = {k - rank} values)")
    spectrum = SaltSpectrum(k, rank, lora_rank, **_factory(base))
    return SpectralLinear(base, k, spectrum, dropout=dropout, base_policy="owned")


def _loldu_layer(base, rank, scaling, *, dropout, options) -> SpectralLinear:
    return SpectralLinear(base, rank, ScaledDiagonal(rank, **_factory(base)), dropout=dropout, base_policy="residual")


def _sst_layer(base, rank, scaling, *, dropout, options) -> FactorLinear:
    return FactorLinear(base, _full_rank(base), rank, dropout=dropout)


def _dora_layer(base, rank, scaling, *, dropout, options) -> DoRALinear:
    return DoRALinear(base, rank, scaling, dropout=dropout)


# --- shape 2: low rank with a core -----------------------------------------------------------------------------

register(MethodSpec(
    name="sorsa", shape="core", initializer=init.sorsa, base_policy="residual", layer=_core_layer("residual"),
    summary="W_res + s·U_p·diag(Σ_p)·V_pᵀ; top-r SVD; orthonormal regularizer as a separate step",
    init_needs="weights (exact SVD)", federated="nonlinear", hooks=hooks.sorsa_hooks,
    options={"gamma": 4e-4},
))
register(MethodSpec(
    name="kasa", shape="core", initializer=init.kasa, base_policy="truncated", layer=_kasa_layer,
    summary="W_world + s·B·diag(λ)·A; W's r minor triplets dropped; β‖λ‖² + γ·orthogonality losses",
    init_needs="weights (full SVD)", federated="nonlinear", hooks=hooks.kasa_hooks,
    options={"beta": 1e-4, "gamma": 1e-3},
))
register(MethodSpec(
    name="adalora", shape="core", initializer=init.adalora, base_policy="keep", layer=_core_layer("keep"),
    summary="W + s·P·diag(λ)·Q; importance-based rank budget (cubic schedule), orthogonal regularizer",
    init_needs="nothing (random)", federated="nonlinear", hooks=hooks.adalora_hooks,
    options={"target_rank": None, "tinit": 0, "tfinal": 0, "delta_t": 1, "beta1": 0.85, "beta2": 0.85,
             "orth_reg_weight": 0.5},
))
register(MethodSpec(
    name="sora", shape="core", initializer=init.sora, base_policy="keep", layer=_core_layer("keep"),
    summary="W + s·B·diag(g)·A; proximal soft-threshold of the gate g after every step",
    init_needs="nothing (random)", federated="nonlinear", hooks=hooks.sora_hooks,
    options={"sparse_lambda": 1.0},
))
register(MethodSpec(
    name="lora_xs", shape="core", initializer=init.lora_xs, base_policy="keep",
    layer=_core_layer("keep", core="full", fixed_factors=True),
    summary="W + U_rΣ_r·R·V_rᵀ; frozen SVD bases, trainable r×r R",
    init_needs="weights (top-r SVD)", federated="linear",
    options={"init_std": 1e-5},
))
register(MethodSpec(
    name="effort", shape="core", initializer=init.effort, base_policy="residual", layer=_effort_layer,
    summary="W_main + U_res·diag(S_res)·V_resᵀ; the r minor triplets train (DESIGN's shape 4 as a core shape)",
    init_needs="weights (full SVD)", federated="nonlinear", hooks=hooks.effort_hooks,
    options={"orthogonality_weight": 0.0, "norm_weight": 0.0},
))

# --- shape 3: spectrum -----------------------------------------------------------------------------------------

register(MethodSpec(
    name="svfit", shape="spectrum", initializer=init.svfit, base_policy="residual", layer=_svfit_layer,
    summary="W_e + U_r·diag(σ′)·V_rᵀ; only the top-r singular values train",
    init_needs="weights (exact SVD)", federated="linear",
))
register(MethodSpec(
    name="clip_svd", shape="spectrum", initializer=init.clip_svd, base_policy="owned", layer=_clip_svd_layer,
    summary="U·diag(s)·Vᵀ at full rank; all k singular values train (adapter.rank unused)",
    init_needs="weights (full SVD)", federated="linear",
))
register(MethodSpec(
    name="salt", shape="spectrum", initializer=init.salt, base_policy="owned", layer=_salt_layer,
    summary="U·ReLU(Σ′)·Vᵀ; scale/shift of the top-r values, LoRA X·Y inside the rest of the spectrum",
    init_needs="weights (full SVD)", federated="nonlinear", hooks=hooks.salt_hooks,
    options={"lora_rank": 8, "reg_weight": 0.0},
))
register(MethodSpec(
    name="loldu", shape="spectrum", initializer=init.loldu, base_policy="residual", layer=_loldu_layer,
    summary="W_res + σ·P·L_r·diag(z)·U_r; LU with pivoting, z and the scalar σ train",
    init_needs="weights (LU)", federated="linear", federated_frozen=("spectrum.scale",),
))

# --- shape 4: factor -------------------------------------------------------------------------------------------

register(MethodSpec(
    name="sst", shape="factor", initializer=init.sst, base_policy="owned", layer=_sst_layer,
    summary="U·diag(Σ)·Vᵀ factored; all Σ and r sampled (u_i, v_i) pairs train; resampling ∝ σ and re-SVD",
    init_needs="weights (full SVD)", federated="nonlinear", hooks=hooks.sst_hooks,
    server_step=hooks.sst_server_step, options={"resample_every": 50, "resvd_every": 4},
))

# --- DoRA ------------------------------------------------------------------------------------------------------

register(MethodSpec(
    name="dora", shape="dora", initializer=init.dora, base_policy="keep", layer=_dora_layer,
    summary="μ ⊙ (W + s·B·A)/‖W + s·B·A‖_row; the norm is a constant in backward",
    init_needs="weights (row norms)", federated="nonlinear",
))

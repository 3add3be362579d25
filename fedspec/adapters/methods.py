"""The registered methods: each is one line of shape + initializer + base policy."""

from __future__ import annotations

from . import initializers
from .registry import MethodSpec, register

register(
    MethodSpec(
        name="lora",
        shape="lowrank",
        initializer=initializers.lora_gaussian,
        base_policy="keep",
        summary="W + s·B·A; A Gaussian, B = 0",
    )
)
register(
    MethodSpec(
        name="pissa",
        shape="lowrank",
        initializer=initializers.pissa,
        weights_dtype=initializers.pissa_weights_dtype,
        base_policy="residual",
        summary="W_res + s·B·A; B·A = top-r SVD of W",
    )
)
register(
    MethodSpec(
        name="milora",
        shape="lowrank",
        initializer=initializers.milora,
        base_policy="residual",
        summary="W_res + s·B·A; B·A = bottom-r SVD of W",
    )
)

# --- low-rank additive methods with their own initializers (OLoRA, SoMA, CorDA, EVA, LoRA-GA) and FWSVD's
# Fisher-weighted compression. Data-driven ones declare the calibration statistics they read. ---------------------
from . import compression, data_driven, schedules  # noqa: E402

register(
    MethodSpec(
        name="olora",
        shape="lowrank",
        initializer=data_driven.olora,
        base_policy="residual",
        summary="W_res + s·B·A; B = first r columns of Q, A = first r rows of R, QR(W)",
    )
)
register(
    MethodSpec(
        name="soma",
        shape="lowrank",
        initializer=initializers.milora,
        base_policy="residual",
        summary="W_res + s·B·A; B·A = bottom-r SVD of W; weight decay cosine-annealed 0.05 → 1e-5",
        hooks=schedules.soma_hooks,
        options={"weight_decay": 0.05, "weight_decay_end": 1e-5},
    )
)
register(
    MethodSpec(
        name="corda",
        shape="lowrank",
        initializer=data_driven.corda,
        base_policy="residual",
        summary="W_res + s·B·A; B·A = top-r (ipm) or bottom-r (kpm) part of SVD(W·C)·C⁻¹",
        init_needs="calibration data: per-layer input covariance",
        calibration=("inputs",),
        options={"mode": "ipm"},
    )
)
register(
    MethodSpec(
        name="eva",
        shape="lowrank",
        initializer=data_driven.eva,
        base_policy="keep",
        summary="W + s·B·A; A = top-r_l principal components of the layer inputs, B = 0; r_l by explained variance",
        init_needs="calibration data: per-layer input mean and covariance",
        calibration=("inputs",),
        ranks=data_driven.eva_ranks,
        options={"rho": 2.0},
    )
)
register(
    MethodSpec(
        name="lora_ga",
        shape="lowrank",
        initializer=data_driven.lora_ga,
        base_policy="residual",
        summary="W_res + s·B·A; A, B from the SVD of the mean loss gradient (ArB2r, stable scale)",
        init_needs="calibration data: per-layer mean loss gradient",
        calibration=("gradients",),
        options={"direction": "ArB2r", "scale": "stable", "stable_gamma": 16.0},
    )
)
register(
    MethodSpec(
        name="fwsvd",
        shape="compression",
        initializer=data_driven.fwsvd,
        base_policy="replace",
        layer=compression.factorized_layer,
        summary="s·B·A + b in place of W; B·A = Î⁻¹·SVD_r(Î·W), Î = √(row sums of the Fisher)",
        init_needs="calibration data: per-layer Fisher row sums (per-example gradients)",
        calibration=("fisher",),
    )
)


# Shapes 2–4 (low rank with a core, spectrum, factor) and DoRA, grouped in their own module.
from . import structured_methods  # noqa: E402,F401

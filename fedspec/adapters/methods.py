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

# Shapes 2–4 (low rank with a core, spectrum, factor) and DoRA, grouped in their own module.
from . import structured_methods  # noqa: E402,F401

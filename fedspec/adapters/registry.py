"""One registry of adapter methods.

A method is not a class per paper: it is a small record that combines a *shape* (the layer type that
computes the adapted weight), an *initializer* (which decomposition of what gives the starting factors)
and a *base policy* (whether the frozen base keeps W or holds a residual W - s·B·A). Registering a method
is one call to :func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import AdapterError

# An initializer gets the layer's weight (out, in) in float32/64, the rank and the scaling s, and returns
# the starting factors (B0 of shape (out, r), A0 of shape (r, in)) in the same dtype.
Initializer = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    shape: str  # "lowrank": W_base + s·B·A; "compression": s·B·A + bias in place of the layer
    initializer: Initializer
    # "keep": the base stays W.  "residual": the base becomes W - s·B0·A0, so the adapted layer equals W at
    # initialization; B0 and A0 are saved with the adapter so the residual can always be rebuilt from W.
    # "replace": W is dropped for the factors (compression).
    base_policy: str
    summary: str
    init_needs: str = "weights only"
    # How a server aggregates the method exactly: "lowrank" (ΔW = s·B·A: FedSVD, FFA-LoRA or FedIT apply),
    # "linear" (ΔW linear in the trained tensors: FedAvg of them is exact), "nonlinear" (FedAvg of the trained
    # tensors is an approximation, documented by the method).
    federated: str = "lowrank"
    # Builds the training hooks the method needs from (model, AdapterConfig); see adapters/hooks.py.
    hooks: Callable[..., list] | None = None
    # --- data-driven initialization (CorDA, EVA, LoRA-GA, FWSVD) ---
    # The calibration statistics the initializer reads (kinds of fedspec.adapters.calibration.KINDS); a method
    # with any cannot be initialized without calibration=... (an AdapterError, never a silent fallback).
    calibration: tuple[str, ...] = ()
    # Per-layer ranks from the calibration statistics (EVA): (per-layer statistics, rank, **options) ->
    # {layer: rank}; a layer given rank 0 keeps its plain nn.Linear.
    ranks: Callable[..., dict] | None = None
    # Names of the method's own options (adapter.options.* in the config), checked when the config is built.
    options: tuple[str, ...] = ()


FEDERATED_KINDS = ("lowrank", "linear", "nonlinear")
# "replace": the layer's weight is replaced by the adapter's own factors (compression, FWSVD).
BASE_POLICIES = ("keep", "residual", "replace")
METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS:
        raise ValueError(f"adapter method {spec.name!r} is already registered")
    if spec.base_policy not in BASE_POLICIES:
        raise ValueError(f"base_policy must be one of {BASE_POLICIES}, got {spec.base_policy!r}")
    if spec.federated not in FEDERATED_KINDS:
        raise ValueError(f"federated must be one of {FEDERATED_KINDS}, got {spec.federated!r}")
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        allowed = ", ".join(sorted(METHODS))
        raise AdapterError(f"adapter.method={name!r} is not a registered method; choose one of: {allowed}") from None

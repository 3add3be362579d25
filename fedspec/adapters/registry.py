"""One registry of adapter methods.

A method is not a class per paper: it is a small record that combines a *shape* (the layer type that
computes the adapted weight), an *initializer* (which decomposition of what gives the starting factors)
and a *base policy* (whether the frozen base keeps W or holds a residual W - s·B·A). Registering a method
is one call to :func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import AdapterError
from .layer import BASE_POLICIES

# An initializer gets the layer's weight (out, in) in float32/64, the rank and the scaling s, and returns
# the starting factors (B0 of shape (out, r), A0 of shape (r, in)) in the same dtype.
Initializer = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    shape: str  # "lowrank": W_base + s·B·A; "core": + s·B·C·A; "spectrum": + U·g(σ;θ)·Vᵀ; "factor"; "dora";
    # "compression": s·B·A + bias in place of the layer
    initializer: Initializer
    # "keep": the base stays W.  "residual": the base becomes W - s·B0·A0, so the adapted layer equals W at
    # initialization; B0 and A0 are saved with the adapter so the residual can always be rebuilt from W.
    # "truncated" (KaSA), "owned" (the factors carry all of W) and "replace" (W is dropped for the factors:
    # compression): see adapters/layer.py.
    base_policy: str
    summary: str
    init_needs: str = "weights only"
    # How a server aggregates the method exactly: "lowrank" (ΔW = s·B·A: FedSVD, FFA-LoRA or FedIT apply),
    # "linear" (ΔW linear in the trained tensors: FedAvg of them is exact), "nonlinear" (FedAvg of the trained
    # tensors is an approximation, documented by the method).
    federated: str = "lowrank"
    # Builds the training hooks the method needs from (model, AdapterConfig, HookContext); see adapters/hooks.py.
    hooks: Callable[..., list] | None = None
    # --- data-driven initialization (CorDA, EVA, LoRA-GA, FWSVD) ---
    # The calibration statistics the initializer reads (kinds of fedspec.adapters.calibration.KINDS); a method
    # with any cannot be initialized without calibration=... (an AdapterError, never a silent fallback).
    calibration: tuple[str, ...] = ()
    # Per-layer ranks from the calibration statistics (EVA): (per-layer statistics, rank, **options) ->
    # {layer: rank}; a layer given rank 0 keeps its plain nn.Linear.
    ranks: Callable[..., dict] | None = None
    # Builds one adapter layer: (base nn.Linear, rank, scaling, *, dropout, options) -> AdapterLayer.
    # None: the low-rank additive LowRankLinear.
    layer: Callable[..., torch.nn.Module] | None = None
    # The method's own hyperparameters and their defaults (the paper's); adapter.options may override them.
    options: dict = field(default_factory=dict)
    # Layer tensors clients do not train in a federation (the server owns them, e.g. LoLDU's scalar σ, which makes
    # the method linear in what clients train).
    federated_frozen: tuple[str, ...] = ()
    # A step the server runs on the global model after aggregating each round: (model, AdapterConfig, round).
    server_step: Callable[..., None] | None = None
    # The dtype the initializer reads the stacked weights in: (one weight, **options) -> dtype; None: float32
    # (float64 for float64 weights). PiSSA's randomized SVD reads W only through its passes, so it takes the stack
    # in the pass dtype (bf16 under pass_precision="auto" on native-bf16 hardware): one converting copy per weight
    # instead of a float32 stack and a bf16 copy of it.
    weights_dtype: Callable[..., torch.dtype] | None = None

    def resolve_options(self, given: dict) -> dict:
        """The method's options: its defaults updated by ``given`` (only the keys it knows)."""
        return {**self.options, **{k: v for k, v in given.items() if k in self.options}}


FEDERATED_KINDS = ("lowrank", "linear", "nonlinear")
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

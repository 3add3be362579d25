"""One registry of adapter methods (the built-in ones are in :mod:`fedspec.adapters.methods`, one file each).

Registering a method is one call to :func:`register` with a :class:`MethodSpec`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import resources

import torch
import yaml

from ..errors import AdapterError
from .layers import BASE_POLICIES

# An initializer gets a batch of same-shape weights (b, out, in) in float32/64, the rank, the scaling s and keyword
# options (the generator, the method's options, calibration statistics) and returns the starting tensors in the same
# dtype: (B0 (b, out, r), A0 (b, r, in)) for the low-rank additive shape, or a dict named as the layer's parameters.
Initializer = Callable[..., tuple[torch.Tensor, torch.Tensor] | dict[str, torch.Tensor]]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    initializer: Initializer
    # "keep": the base stays W.  "residual": the base becomes W - s·B0·A0, so the adapted layer equals W at
    # initialization; B0 and A0 are saved with the adapter so the residual can always be rebuilt from W.
    # "truncated" (KaSA), "owned" (the factors carry all of W) and "replace" (W is dropped for the factors:
    # compression): see adapters/layers/base.py.
    base_policy: str
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
    # A causal LM's "inputs" statistics over its response tokens only (EVA, as PEFT's use_label_mask), rather than
    # over every real token of the conversation (CorDA, whose reference covers the whole sequence).
    calibration_response_only: bool = False
    # Per-layer ranks from the calibration statistics (EVA): (per-layer statistics, rank, **options) ->
    # {layer: rank}; a layer given rank 0 keeps its plain nn.Linear.
    ranks: Callable[..., dict] | None = None
    # Builds one adapter layer: (base nn.Linear, rank, scaling, *, dropout, options) -> AdapterLayer.
    # None: the low-rank additive LowRankLinear.
    layer: Callable[..., torch.nn.Module] | None = None
    # The method's own hyperparameters and their defaults (the paper's); adapter.options may override them. None:
    # the ``options`` of the method's packaged YAML (configs/adapter/<name>.yaml), where built-in methods keep them.
    options: dict | None = None
    # Layer tensors clients do not train in a federation (the server owns them, e.g. LoLDU's scalar σ, which makes
    # the method linear in what clients train).
    federated_frozen: tuple[str, ...] = ()
    # A step the server runs on the global model after aggregating each round: (model, AdapterConfig, round,
    # run seed).
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
    """Add a method to :data:`METHODS` and return it as registered (with its option defaults filled in)."""
    if spec.name in METHODS:
        raise ValueError(f"adapter method {spec.name!r} is already registered")
    if spec.base_policy not in BASE_POLICIES:
        raise ValueError(f"base_policy must be one of {BASE_POLICIES}, got {spec.base_policy!r}")
    if spec.federated not in FEDERATED_KINDS:
        raise ValueError(f"federated must be one of {FEDERATED_KINDS}, got {spec.federated!r}")
    if spec.options is None:
        spec = replace(spec, options=packaged_options(spec.name))
    METHODS[spec.name] = spec
    return spec


def packaged_options(name: str) -> dict:
    """The option defaults in ``configs/adapter/<name>.yaml`` (none for a method without a packaged YAML)."""
    path = resources.files("fedspec.configs") / "adapter" / f"{name}.yaml"  # where a built-in method's defaults are
    if not path.is_file():
        return {}
    return dict(yaml.safe_load(path.read_text()).get("options") or {})


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        allowed = ", ".join(sorted(METHODS))
        raise AdapterError(f"adapter.method={name!r} is not a registered method; choose one of: {allowed}") from None

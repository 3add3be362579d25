"""Put adapters of a registered method on a model, in place."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import AdapterError
from .layer import AdapterLayer
from .lowrank import LowRankLinear
from .registry import MethodSpec, get_method
from .targets import default_targets, match_targets

CONFIG_ATTRIBUTE = "fedspec_adapter"


@dataclass
class AdapterConfig:
    """Everything needed to rebuild the adapter structure on a fresh copy of the base model."""

    method: str
    rank: int
    alpha: float
    targets: list[str]
    layers: list[str]
    base_policy: str
    train_A: bool = True
    dropout: float = 0.0
    options: dict = field(default_factory=dict)
    # Built for a federation: the method's federated_frozen tensors are frozen (the server owns them).
    federated: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def adapter_config(model: nn.Module) -> AdapterConfig:
    config = getattr(model, CONFIG_ATTRIBUTE, None)
    if config is None:
        raise AdapterError("this model carries no fedspec adapter; call fedspec.adapt(model, method, rank) first")
    return config


def _check_rank(model: nn.Module, names: list[str], rank: int) -> None:
    if rank < 1:
        raise AdapterError(f"adapter.rank={rank} must be a positive integer")
    for name in names:
        layer = model.get_submodule(name)
        limit = min(layer.in_features, layer.out_features)
        if rank > limit:
            raise AdapterError(
                f"adapter.rank={rank} is larger than layer {name!r} allows "
                f"({layer.out_features}x{layer.in_features}: at most {limit}); choose adapter.rank <= {limit}"
            )


@torch.no_grad()
def _initialize(
    layers: dict[str, AdapterLayer], initializer, rank: int, scaling: float, generator: torch.Generator,
    options: dict,
) -> None:
    """Compute starting tensors with one batched initializer call per group of same-shape layers.

    An initializer returns either ``(B0, A0)`` (the low-rank additive shape) or a dict of batched tensors named as
    the layer's parameters; each layer's ``set_initial`` loads its slice and derives its base.
    """
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, layer in layers.items():
        groups[(tuple(layer.base.weight.shape), layer.base.weight.dtype)].append(name)
    for (_, dtype), names in groups.items():
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        weights = torch.stack([layers[n].base.weight.detach().to("cpu", compute) for n in names])
        out = initializer(weights, rank, scaling, generator=generator, **options)
        if isinstance(out, tuple):
            out = {"lora_B.weight": out[0], "lora_A.weight": out[1]}
        for i, name in enumerate(names):
            layer = layers[name]
            layer.set_initial({k: v[i].to(layer.base.weight) for k, v in out.items()})


def _build_layer(spec: MethodSpec, base: nn.Linear, rank: int, scaling: float, dropout: float,
                 options: dict) -> AdapterLayer:
    if spec.layer is None:
        return LowRankLinear(base, rank, scaling, dropout=dropout, base_policy=spec.base_policy)
    return spec.layer(base, rank, scaling, dropout=dropout, options=options)


def _apply_mask(layer: AdapterLayer, spec: MethodSpec, train_A: bool, federated: bool) -> None:
    """The trainable mask: every adapter tensor trains except the fixed and server-owned ones, A when ``train_A``
    is False (FedSVD / FFA-LoRA clients), and the method's ``federated_frozen`` tensors in a federation."""
    frozen = set(layer.fixed_tensor_names()) | set(layer.server_tensor_names())
    if not train_A:
        frozen.add("lora_A.weight")
    if federated:
        frozen.update(spec.federated_frozen)
    for name, p in layer.adapter_tensors().items():
        p.requires_grad_(name not in frozen)


def adapt(
    model: nn.Module,
    method: str,
    rank: int,
    targets: Sequence[str] | None = None,
    *,
    alpha: float | None = None,
    dropout: float = 0.0,
    train_A: bool = True,
    initialize: bool = True,
    seed: int = 0,
    federated: bool = False,
    **options,
) -> nn.Module:
    """Replace the targeted ``nn.Linear`` layers by adapters of ``method`` and freeze everything else.

    ``alpha`` defaults to ``rank`` (scaling s = α/r = 1). ``train_A=False`` freezes A, the mode FedSVD and
    FFA-LoRA clients train in. ``initialize=False`` skips the initializer (factors start at zero, the base is
    untouched) for a model whose adapter state is loaded right after, e.g. a federated client receiving the
    server's factors. ``federated=True`` also freezes the tensors the method's federated rule leaves to the server.
    Other keyword options go to the initializer (``svd_method``, ``niter``, ``oversample``) and, for the keys the
    method declares (``METHODS[method].options``), set its hyperparameters; the rest of them keep their defaults.
    """
    spec = get_method(method)
    if hasattr(model, CONFIG_ATTRIBUTE):
        raise AdapterError("this model already carries a fedspec adapter; start from a fresh base model")
    target_patterns = list(targets) if targets else list(default_targets(model))
    names = match_targets(model, target_patterns)
    _check_rank(model, names, rank)
    alpha = float(alpha) if alpha is not None else float(rank)
    options = {**options, **spec.resolve_options(options)}

    model.requires_grad_(False)
    layers: dict[str, AdapterLayer] = {}
    for name in names:
        layer = _build_layer(spec, model.get_submodule(name), rank, alpha / rank, dropout, options)
        _set_submodule(model, name, layer)
        layers[name] = layer
    if initialize:
        generator = torch.Generator().manual_seed(seed)
        _initialize(layers, spec.initializer, rank, alpha / rank, generator, options)
    for layer in layers.values():
        _apply_mask(layer, spec, train_A, federated)

    config = AdapterConfig(
        method=method,
        rank=rank,
        alpha=alpha,
        targets=target_patterns,
        layers=names,
        base_policy=spec.base_policy,
        train_A=train_A,
        dropout=dropout,
        options={k: v for k, v in options.items() if isinstance(v, (int, float, str, bool))},
        federated=federated,
    )
    # A plain attribute: nn.Module.__setattr__ stores non-module values in __dict__.
    object.__setattr__(model, CONFIG_ATTRIBUTE, config)
    return model

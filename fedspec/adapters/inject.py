"""Put adapters of a registered method on a model, in place."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import AdapterError
from ..svd import batch_chunks
from .lowrank import LowRankLinear
from .registry import get_method
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

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def adapter_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


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
    layers: dict[str, LowRankLinear], initializer, scaling: float, generator: torch.Generator, options: dict
) -> None:
    """Compute starting factors with one batched initializer call per group of same-shape layers (split into
    chunks of bounded size when the layers are large: batching only pays for small matrices)."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, layer in layers.items():
        groups[(tuple(layer.base.weight.shape), layer.base.weight.dtype)].append(name)
    for (_, dtype), group in groups.items():
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        item_bytes = layers[group[0]].base.weight.numel() * compute.itemsize
        for names in batch_chunks(group, item_bytes):  # bounded memory: a 7B model's gate_proj alone is 11 GB
            _initialize_chunk(layers, names, compute, initializer, scaling, generator, options)


def _initialize_chunk(layers, names, compute, initializer, scaling, generator, options) -> None:
    # On the weights' own device (a CUDA model decomposes on the GPU); a single weight is not copied.
    weights = [layers[n].base.weight.detach().to(dtype=compute) for n in names]
    weights = weights[0].unsqueeze(0) if len(weights) == 1 else torch.stack(weights)
    rank = layers[names[0]].rank
    B0, A0 = initializer(weights, rank, scaling, generator=generator, **options)
    for i, name in enumerate(names):
        layer = layers[name]
        B, A = B0[i].to(layer.base.weight), A0[i].to(layer.base.weight)
        layer.set_factors(B, A)
        if layer.base_policy == "residual":
            layer.set_residual_init(B, A)


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
    **options,
) -> nn.Module:
    """Replace the targeted ``nn.Linear`` layers by adapters of ``method`` and freeze everything else.

    ``alpha`` defaults to ``rank`` (scaling s = α/r = 1). ``train_A=False`` freezes A, the mode FedSVD and
    FFA-LoRA clients train in. ``initialize=False`` skips the initializer (factors start at zero, the base is
    untouched) for a model whose adapter state is loaded right after, e.g. a federated client receiving the
    server's factors. Other keyword options go to the initializer (``svd_method``, ``niter``, ``oversample``).
    """
    spec = get_method(method)
    if hasattr(model, CONFIG_ATTRIBUTE):
        raise AdapterError("this model already carries a fedspec adapter; start from a fresh base model")
    target_patterns = list(targets) if targets else list(default_targets(model))
    names = match_targets(model, target_patterns)
    _check_rank(model, names, rank)
    alpha = float(alpha) if alpha is not None else float(rank)

    model.requires_grad_(False)
    layers: dict[str, LowRankLinear] = {}
    for name in names:
        layer = LowRankLinear(
            model.get_submodule(name), rank, alpha / rank, dropout=dropout, base_policy=spec.base_policy
        )
        _set_submodule(model, name, layer)
        layers[name] = layer
    if initialize:
        generator = torch.Generator().manual_seed(seed)
        _initialize(layers, spec.initializer, alpha / rank, generator, options)
    for layer in layers.values():
        layer.lora_B.weight.requires_grad_(True)
        layer.lora_A.weight.requires_grad_(train_A)

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
    )
    # A plain attribute: nn.Module.__setattr__ stores non-module values in __dict__.
    object.__setattr__(model, CONFIG_ATTRIBUTE, config)
    return model

"""Put adapters of a registered method on a model, in place."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import AdapterError
from ..svd import PassBuffer, batch_bytes, batch_chunks
from .calibration import KINDS, Calibration
from .layers import AdapterLayer, LowRankLinear
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
    # Per-layer ranks where they differ between layers (EVA); empty when every layer has ``rank``.
    rank_pattern: dict = field(default_factory=dict)
    # Built for a federation: the method's federated_frozen tensors are frozen (the server owns them).
    federated: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)


def _set_submodule(modules: dict[str, nn.Module], name: str, module: nn.Module) -> None:
    """Replace module `name`; `modules` is the model's ``dict(named_modules())`` ('' is the model itself)."""
    parent_name, _, child = name.rpartition(".")
    setattr(modules[parent_name], child, module)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapted layer (any shape), by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def adapter_config(model: nn.Module) -> AdapterConfig:
    config = getattr(model, CONFIG_ATTRIBUTE, None)
    if config is None:
        raise AdapterError("this model carries no fedspec adapter; call fedspec.adapt(model, method, rank) first")
    return config


def _check_rank(modules: dict[str, nn.Module], ranks: dict[str, int]) -> None:
    for name, layer_rank in ranks.items():
        layer = modules[name]
        limit = min(layer.in_features, layer.out_features)
        if layer_rank > limit:
            raise AdapterError(
                f"adapter.rank={layer_rank} is larger than layer {name!r} allows "
                f"({layer.out_features}x{layer.in_features}: at most {limit}); choose adapter.rank <= {limit}"
            )


@torch.no_grad()
def _initialize(
    layers: dict[str, AdapterLayer],
    originals: dict[str, torch.Tensor],
    ranks: dict[str, int],
    spec: MethodSpec,
    scaling: float,
    generator: torch.Generator,
    options: dict,
    calibration: Calibration | None,
) -> None:
    """Compute starting tensors with one batched initializer call per group of same-shape, same-rank layers
    (split into chunks of bounded size when the layers are large: on a CPU batching only pays for small matrices,
    on a GPU for all; see `fedspec.svd.batch_bytes`).

    An initializer returns either ``(B0, A0)`` (the low-rank additive shape) or a dict of batched tensors named as
    the layer's parameters; each layer's ``set_initial`` loads its slice and derives its base.
    """
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name in layers:
        groups[(tuple(originals[name].shape), originals[name].dtype, ranks[name])].append(name)
    keys = [key for kind in spec.calibration for key in KINDS[kind]]
    buffer = PassBuffer()  # one scratch copy of W for the randomized SVDs of every chunk
    stack_buffer = PassBuffer()  # one reduced-precision stack for every chunk (see _stack_chunk)
    for (_, dtype, rank), group in groups.items():
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        item_bytes = originals[group[0]].numel() * compute.itemsize
        limit = batch_bytes(originals[group[0]].device)
        for names in batch_chunks(group, item_bytes, limit):  # bounded memory: a 7B model's gate_proj alone is 11 GB
            weights = _stack_chunk([originals[n].detach() for n in names], compute, spec, options, stack_buffer)
            _initialize_chunk(layers, originals, names, weights, rank, spec, keys, calibration,
                              scaling, generator, {**options, "pass_buffer": buffer})


def _stack_chunk(tensors: list[torch.Tensor], compute: torch.dtype, spec: MethodSpec, options: dict,
                 stack_buffer: PassBuffer) -> torch.Tensor:
    """A chunk's weights as one batch, on their own device (a CUDA model decomposes on the GPU), in the dtype the
    initializer reads them in: float32/64, or the method's ``weights_dtype`` (PiSSA's bf16 passes), which is stacked
    into reused memory with one converting copy per weight, without a float32 stack first."""
    dtype = spec.weights_dtype(tensors[0], **options) if spec.weights_dtype else compute
    if dtype != compute and not (len(tensors) == 1 and tensors[0].dtype == dtype):
        return stack_buffer.stack(tensors, dtype)
    converted = [t.to(dtype) for t in tensors]  # no copy of a weight that has the dtype already
    return converted[0].unsqueeze(0) if len(converted) == 1 else torch.stack(converted)


def _initialize_chunk(layers, originals, names, weights, rank, spec, keys, calibration, scaling, generator,
                      options) -> None:
    extra = {}
    if keys:
        extra["statistics"] = {
            key: torch.stack([calibration.mean(n, key) for n in names]).to(weights.device) for key in keys
        }
    out = spec.initializer(weights, rank, scaling, generator=generator, **options, **extra)
    if isinstance(out, tuple):
        out = {"lora_B.weight": out[0], "lora_A.weight": out[1]}
    for i, name in enumerate(names):
        # The initializer's own precision (float32 at least): a low-precision base keeps float32 adapter tensors.
        layers[name].set_initial({k: v[i].to(originals[name].device) for k, v in out.items()})


def _layer_ranks(
    modules: dict[str, nn.Module],
    spec: MethodSpec,
    names: list[str],
    rank: int,
    rank_pattern: dict[str, int] | None,
    calibration: Calibration | None,
    initialize: bool,
    options: dict,
) -> dict[str, int]:
    """{layer: rank} of the layers that get an adapter (a layer allocated rank 0 keeps its nn.Linear)."""
    if rank_pattern:
        unknown = [n for n in rank_pattern if n not in names]
        if unknown:
            raise AdapterError(f"rank_pattern names layer {unknown[0]!r}, which adapter.targets does not match")
        ranks = {n: int(rank_pattern.get(n, 0)) for n in names}
    elif spec.ranks is not None and initialize:
        keys = [key for kind in spec.calibration for key in KINDS[kind]]
        per_layer = {n: {key: calibration.mean(n, key) for key in keys} for n in names}
        limits = {n: min(modules[n].in_features, modules[n].out_features) for n in names}
        ranks = spec.ranks(per_layer, rank, limits=limits, **options)
    else:
        ranks = dict.fromkeys(names, rank)
    ranks = {n: r for n, r in ranks.items() if r > 0}
    if not ranks:
        raise AdapterError(f"adapter.method={spec.name}: no layer was given a positive rank")
    return ranks


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
    calibration: Calibration | None = None,
    rank_pattern: dict[str, int] | None = None,
    federated: bool = False,
    **options,
) -> nn.Module:
    """Replace the targeted ``nn.Linear`` layers by adapters of ``method`` and freeze everything else.

    ``alpha`` defaults to ``rank`` (scaling s = α/r = 1). ``train_A=False`` freezes A, the mode FedSVD and
    FFA-LoRA clients train in. ``initialize=False`` skips the initializer (factors start at zero, the base is
    untouched) for a model whose adapter state is loaded right after, e.g. a federated client receiving the
    server's factors. ``federated=True`` also freezes the tensors the method's federated rule leaves to the server.
    Other keyword options go to the initializer (``svd_method``, ``niter``, ``oversample``, ``pass_precision``)
    and, for the keys the method declares (``METHODS[method].options``, e.g. CorDA's ``mode``), set its
    hyperparameters; the rest of them keep their defaults.

    ``calibration``: statistics of data (:func:`fedspec.adapters.collect_calibration`), required by the
    data-driven methods (CorDA, EVA, LoRA-GA, FWSVD) when initializing. ``rank_pattern``: explicit per-layer
    ranks (layers absent or at 0 keep their ``nn.Linear``), e.g. to rebuild an EVA adapter's structure.
    """
    spec = get_method(method)
    if hasattr(model, CONFIG_ATTRIBUTE):
        raise AdapterError("this model already carries a fedspec adapter; start from a fresh base model")
    if rank < 1:
        raise AdapterError(f"adapter.rank={rank} must be a positive integer")
    target_patterns = list(targets) if targets else list(default_targets(model))
    names = match_targets(model, target_patterns)
    if initialize and spec.calibration:
        if calibration is None:
            raise AdapterError(
                f"adapter.method={method} initializes from data: pass calibration=collect_calibration(model, batches, "
                f"layers, kinds={list(spec.calibration)}) to fedspec.adapt (fedspec train and simulate collect it)"
            )
        calibration.require(spec.calibration, names, method)
    alpha = float(alpha) if alpha is not None else float(rank)
    options = {**options, **spec.resolve_options(options)}
    # Looked up once: get_submodule walks the module path on every call, three calls per layer.
    modules = dict(model.named_modules())
    ranks = _layer_ranks(modules, spec, names, rank, rank_pattern, calibration, initialize, options)
    _check_rank(modules, ranks)

    model.requires_grad_(False)
    layers: dict[str, AdapterLayer] = {}
    originals: dict[str, torch.Tensor] = {}
    for name, layer_rank in ranks.items():
        linear = modules[name]
        originals[name] = linear.weight
        layer = _build_layer(spec, linear, layer_rank, alpha / rank, dropout, options)
        _set_submodule(modules, name, layer)
        layers[name] = layer
    if initialize:
        generator = torch.Generator().manual_seed(seed)
        _initialize(layers, originals, ranks, spec, alpha / rank, generator, options, calibration)
    for layer in layers.values():
        _apply_mask(layer, spec, train_A, federated)

    config = AdapterConfig(
        method=method,
        rank=rank,
        alpha=alpha,
        targets=target_patterns,
        layers=list(ranks),
        base_policy=spec.base_policy,
        train_A=train_A,
        dropout=dropout,
        options={k: v for k, v in options.items() if isinstance(v, (int, float, str, bool))},
        rank_pattern=dict(ranks) if any(r != rank for r in ranks.values()) else {},
        federated=federated,
    )
    # A plain attribute: nn.Module.__setattr__ stores non-module values in __dict__.
    object.__setattr__(model, CONFIG_ATTRIBUTE, config)
    return model

"""Adapter state: what to save, send and load; merge into plain layers.

The adapter state holds the factors of every adapted layer, the init factors a residual base was built
from (so the residual can always be rebuilt from the original weights), and every other trainable tensor
of the model (e.g. a classification head). Files are safetensors plus a JSON config — never pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import AdapterError
from .inject import CONFIG_ATTRIBUTE, AdapterConfig, adapt, adapter_config, adapter_layers

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "fedspec-adapter/1"

FACTOR_KEYS = ("lora_A.weight", "lora_B.weight")
INIT_KEYS = ("init_lora_A", "init_lora_B")


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter factors, residual init factors and other trainable tensors, detached (not cloned)."""
    state: dict[str, torch.Tensor] = {}
    layers = adapter_layers(model)
    for name, layer in layers.items():
        keys = FACTOR_KEYS + (INIT_KEYS if layer.base_policy == "residual" else ())
        layer_state = layer.state_dict(keep_vars=False)
        for key in keys:
            state[f"{name}.{key}"] = layer_state[key]
    inside_adapter = tuple(f"{name}." for name in layers)
    for name, param in model.named_parameters():
        if param.requires_grad and not name.startswith(inside_adapter):
            state[name] = param.detach()
    return state


@torch.no_grad()
def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True) -> None:
    """Load tensors produced by :func:`adapter_state`; new residual init factors rebuild the base weight.

    With ``strict`` every key must be known to the model and every adapter factor must be present.
    """
    layers = adapter_layers(model)
    params = dict(model.named_parameters())
    unknown = [k for k in state if k not in params]
    if strict and unknown:
        raise AdapterError(f"adapter state has keys this model does not: {unknown[:5]}")
    for name, layer in layers.items():
        if layer.base_policy == "residual" and f"{name}.init_lora_B" in state:
            B0, A0 = state[f"{name}.init_lora_B"], state[f"{name}.init_lora_A"]
            if not (torch.equal(B0.to(layer.init_lora_B), layer.init_lora_B)
                    and torch.equal(A0.to(layer.init_lora_A), layer.init_lora_A)):
                layer.set_residual_init(B0.to(layer.init_lora_B), A0.to(layer.init_lora_A))
        missing = [f"{name}.{k}" for k in FACTOR_KEYS if f"{name}.{k}" not in state]
        if strict and missing:
            raise AdapterError(f"adapter state lacks {missing[0]}")
    for key, value in state.items():
        if key in params and not key.endswith(INIT_KEYS):
            target = params[key]
            if target.shape != value.shape:
                raise AdapterError(f"adapter state {key!r} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
            target.copy_(value.to(target))


def ranks_in_state(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """{layer: rank} of every adapted layer in an adapter state (the rows of its A factor): the structure a model
    must have to load it, e.g. EVA's per-layer ranks."""
    suffix = "." + FACTOR_KEYS[0]
    return {key[: -len(suffix)]: int(value.shape[0]) for key, value in state.items() if key.endswith(suffix)}


def save_adapter(model: nn.Module, directory: str | Path, *, metadata: dict | None = None) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` (fedspec format) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in adapter_state(model).items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
    config = {"format": FORMAT, **adapter_config(model).to_dict(), "metadata": metadata or {}}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def read_adapter_config(directory: str | Path) -> AdapterConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{path} does not exist; point to a folder written by fedspec.save_adapter")
    raw = json.loads(path.read_text())
    if raw.get("format") != FORMAT:
        raise AdapterError(f"{path} is not a fedspec adapter (format {raw.get('format')!r}, expected {FORMAT!r})")
    fields = AdapterConfig.__dataclass_fields__
    return AdapterConfig(**{k: v for k, v in raw.items() if k in fields})


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Rebuild a saved adapter on a fresh base model (with the original weights) and load its tensors."""
    config = read_adapter_config(directory)
    adapt(
        model,
        config.method,
        config.rank,
        config.layers,
        alpha=config.alpha,
        dropout=config.dropout,
        train_A=config.train_A,
        initialize=False,
        rank_pattern=config.rank_pattern or None,
        **config.options,  # e.g. the schedule a hook follows (SoMA's lr and total_steps)
    )
    state = load_file(str(Path(directory) / WEIGHTS_FILE))
    # Trainable extras (e.g. a head) were trainable when saved; make them so again before loading.
    params = dict(model.named_parameters())
    for key in state:
        if key in params and not key.endswith(FACTOR_KEYS + INIT_KEYS):
            params[key].requires_grad_(True)
    load_adapter_state(model, state)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into a plain ``nn.Linear`` (W_base + s·B·A) for inference, in place; returns the model."""
    for name, layer in adapter_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.to_linear())
    if hasattr(model, CONFIG_ATTRIBUTE):
        object.__delattr__(model, CONFIG_ATTRIBUTE)
    return model


def merge_in_place(model: nn.Module) -> None:
    """Fold the adapters into their base weights but keep the adapter modules, so :func:`unmerge` can undo it."""
    for layer in adapter_layers(model).values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for layer in adapter_layers(model).values():
        layer.unmerge()

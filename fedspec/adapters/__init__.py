"""Spectral adapter layers and the one registry of methods (``METHODS``)."""

from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from .hooks import HookContext, PenaltyStep, TrainingHook, training_hooks
from .inject import AdapterConfig, adapt, adapter_config, adapter_layers
from .layer import AdapterLayer
from .lowrank import LowRankLinear
from .registry import METHODS, MethodSpec, get_method, register
from .state import (
    adapter_roles,
    adapter_state,
    load_adapter,
    load_adapter_state,
    merge,
    merge_in_place,
    read_adapter_config,
    save_adapter,
    unmerge,
)
from .targets import match_targets

__all__ = [
    "METHODS",
    "AdapterConfig",
    "AdapterLayer",
    "HookContext",
    "LowRankLinear",
    "MethodSpec",
    "PenaltyStep",
    "TrainingHook",
    "adapt",
    "adapter_config",
    "adapter_layers",
    "adapter_roles",
    "adapter_state",
    "get_method",
    "load_adapter",
    "load_adapter_state",
    "match_targets",
    "merge",
    "merge_in_place",
    "read_adapter_config",
    "register",
    "save_adapter",
    "training_hooks",
    "unmerge",
]

"""Adapters: the layer shapes (``layers/``), the methods (``methods/``, one file each), and the one registry of
methods (``METHODS``)."""

from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from .calibration import (
    Calibration,
    StatisticsPrivacy,
    calibration_layout,
    collect_calibration,
    sum_calibrations,
)
from .hooks import HookContext, PenaltyStep, TrainingHook, training_hooks
from .inject import AdapterConfig, adapt, adapter_config, adapter_layers
from .layers import AdapterLayer, FactorizedLinear, LowRankLinear
from .peft_export import export_peft, peft_exportable
from .registry import METHODS, MethodSpec, get_method, register
from .state import (
    adapter_roles,
    adapter_state,
    load_adapter,
    load_adapter_state,
    merge,
    merge_in_place,
    ranks_in_state,
    read_adapter_config,
    save_adapter,
    unmerge,
)
from .targets import match_targets

__all__ = [
    "METHODS",
    "AdapterConfig",
    "AdapterLayer",
    "Calibration",
    "FactorizedLinear",
    "HookContext",
    "StatisticsPrivacy",
    "LowRankLinear",
    "MethodSpec",
    "PenaltyStep",
    "TrainingHook",
    "adapt",
    "adapter_config",
    "adapter_layers",
    "adapter_roles",
    "adapter_state",
    "calibration_layout",
    "collect_calibration",
    "export_peft",
    "get_method",
    "load_adapter",
    "load_adapter_state",
    "match_targets",
    "merge",
    "merge_in_place",
    "peft_exportable",
    "ranks_in_state",
    "read_adapter_config",
    "register",
    "save_adapter",
    "sum_calibrations",
    "training_hooks",
    "unmerge",
]

"""fedspec: federated, privacy-preserving fine-tuning of SVD-parameterized adapters.

The core library (this package without ``fedspec.server``/``client``/``strategies``/``simulations``) never
imports Flower, so adapters, the SVD engine, DP training and the centralized baseline work without it.

The names below load on first use: importing ``fedspec`` (or a light module in it, e.g. ``fedspec.errors``)
does not import torch, so a ClientApp that only forwards a message to its node's warm worker starts fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["METHODS", "adapt", "adapter_state", "load_adapter_state", "merge", "__version__"]


def __getattr__(name: str):
    if name in ("METHODS", "adapt", "adapter_state", "load_adapter_state", "merge"):
        from . import adapters

        return getattr(adapters, name)
    raise AttributeError(f"module 'fedspec' has no attribute {name!r}")

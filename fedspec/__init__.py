"""fedspec: federated, privacy-preserving fine-tuning of SVD-parameterized adapters.

The core library (this package without ``fedspec.server``/``client``/``strategies``/``simulations``) never
imports Flower, so adapters, the SVD engine, DP training and the centralized baseline work without it.
"""

from .adapters import METHODS, adapt, adapter_state, load_adapter_state, merge

__version__ = "0.1.0"

__all__ = ["METHODS", "adapt", "adapter_state", "load_adapter_state", "merge", "__version__"]

"""The adapter shapes: the layer types that compute an adapted weight, shared by the methods.

A method (``fedspec.adapters.methods``) picks one of these and says how to fill it. The shapes:

- :class:`LowRankLinear`      W_base + s·B·A (LoRA, PiSSA, MiLoRA, OLoRA, SoMA, CorDA, EVA, LoRA-GA)
- :class:`LowRankCoreLinear`  W_base + s·B·C·A, C diagonal or full (SORSA, KaSA, AdaLoRA, SoRA, LoRA-XS, Effort)
- :class:`SpectralLinear`     W_base + U·g(σ; θ)·Vᵀ (SVFit, CLIP-SVD, SALT, LoLDU)
- :class:`FactorLinear`       U·diag(Σ)·Vᵀ kept factored, r sampled pairs train (SST)
- :class:`DoRALinear`         μ ⊙ (W + s·B·A)/‖W + s·B·A‖_row (DoRA)
- :class:`FactorizedLinear`   s·B·A + b in place of W (FWSVD's compression)

Every one derives from :class:`AdapterLayer` (``base.py``), which holds what they share: the frozen base, tensor
roles, base policies, merge and unmerge. ``parts.py`` holds the small trainable modules (diagonals, SALT's spectrum)
with their exact Opacus per-sample rules.
"""

from .base import BASE_POLICIES, AdapterLayer, adapter_dtype, zero_factor
from .compression import FactorizedLinear
from .core import LowRankCoreLinear
from .factor import FactorLinear
from .lowrank import LowRankLinear
from .magnitude import DoRALinear
from .parts import Diagonal, SaltSpectrum, ScaledDiagonal
from .spectral import SpectralLinear

__all__ = [
    "BASE_POLICIES",
    "AdapterLayer",
    "Diagonal",
    "DoRALinear",
    "FactorLinear",
    "FactorizedLinear",
    "LowRankCoreLinear",
    "LowRankLinear",
    "SaltSpectrum",
    "ScaledDiagonal",
    "SpectralLinear",
    "adapter_dtype",
    "zero_factor",
]

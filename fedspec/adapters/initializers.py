"""Starting factors of the low-rank additive methods.

Every initializer works on a batch of same-shape weights ``W`` of shape (b, out, in), in float32 or
float64, and returns ``(B0, A0)`` of shapes (b, out, r) and (b, r, in). Batching lets the injector make one
SVD call per group of same-shape layers instead of one per layer.
"""

from __future__ import annotations

import torch

from ..svd import PassBuffer, truncated_svd
from ..svd.precision import compute_dtype, pass_dtype


def lora_gaussian(
    weights: torch.Tensor, rank: int, scaling: float, *, generator: torch.Generator, **_: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA as in the paper (Hu et al., 2022): A ~ N(0, 1/r²) (PEFT's "gaussian" init), B = 0, so ΔW = 0."""
    b, out_features, in_features = weights.shape
    A = torch.randn(b, rank, in_features, generator=generator, dtype=weights.dtype) / rank
    B = torch.zeros(b, out_features, rank, dtype=weights.dtype)
    return B, A


def _split_singular_values(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """B = U·√(Σ/s), A = √(Σ/s)·Vᵀ, so that s·B·A = U·Σ·Vᵀ exactly as PiSSA does it."""
    root = (S / scaling).sqrt()
    return U * root.unsqueeze(-2), root.unsqueeze(-1) * Vh


def pissa(
    weights: torch.Tensor,
    rank: int,
    scaling: float,
    *,
    generator: torch.Generator,
    svd_method: str = "randomized",
    niter: int = 4,
    oversample: int = 8,
    pass_precision: str = "full",
    pass_buffer: PassBuffer | None = None,
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA (Meng et al., 2024): the top-r singular triplets of W; the base keeps the residual.

    The randomized path oversamples (PEFT's ``pissa_niter_K`` does not) and draws its sketch from the given
    generator, so the server's SVD is reproducible.
    """
    U, S, Vh = truncated_svd(
        weights, rank, method=svd_method, niter=niter, oversample=oversample, generator=generator,
        pass_precision=pass_precision, pass_buffer=pass_buffer,
    )
    return _split_singular_values(U, S, Vh, scaling)


def pissa_weights_dtype(
    weight: torch.Tensor, *, svd_method: str = "randomized", pass_precision: str = "full", **_: object
) -> torch.dtype:
    """The dtype :func:`pissa` reads its stacked weights in (same defaults): the randomized SVD reads W only
    through its passes, so a stack in the pass dtype is all it needs; the exact SVD needs float32/64."""
    if svd_method == "randomized":
        return pass_dtype(pass_precision, weight)
    return compute_dtype(weight.dtype)


def milora(
    weights: torch.Tensor, rank: int, scaling: float, *, generator: torch.Generator, **_: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """MiLoRA (Wang et al., 2025): the bottom-r (minor) singular triplets of W; the base keeps the residual.

    Always an exact SVD: a randomized range finder only captures the top subspace. The paper has no α/r
    scaling; fedspec divides Σ by s like PiSSA, so s·B·A is exactly the minor part for any α.
    """
    U, S, Vh = truncated_svd(weights, rank, method="exact", smallest=True)
    return _split_singular_values(U, S, Vh, scaling)

"""Initializers of the low-rank additive shape that read more than the weights: OLoRA (QR), and the
data-driven CorDA, EVA and LoRA-GA, plus FWSVD's Fisher-weighted compression.

Same contract as :mod:`fedspec.adapters.initializers`: a batch of same-shape weights ``W`` (b, out, in) in
float32/float64 in, ``(B0, A0)`` of shapes (b, out, r), (b, r, in) out. The data-driven ones also get
``statistics``: {key: (b, ...)} per-example averages from :mod:`fedspec.adapters.calibration`, stacked in the same
layer order as ``W``. Decompositions run in float64 here (covariance inverses and small singular values need it)
and the factors come back in the weights' dtype.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import AdapterError
from ..svd import truncated_svd

CORDA_MODES = ("ipm", "kpm")
LORA_GA_DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
LORA_GA_SCALES = ("stable", "weight_svd", "gd_scale", "unit")


def _statistic(statistics: Mapping[str, torch.Tensor] | None, key: str, method: str) -> torch.Tensor:
    if not statistics or key not in statistics:
        raise AdapterError(
            f"adapter.method={method} initializes from calibration data; pass calibration=... to fedspec.adapt "
            "(see fedspec.adapters.collect_calibration)"
        )
    return statistics[key].to(torch.float64)


def olora(
    weights: torch.Tensor, rank: int, scaling: float, *, generator: torch.Generator, **_: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA (Büyükakyüz, 2024): ``Q, R = qr(W)``, B = Q[:, :r] (orthonormal columns), A = R[:r, :].

    As PEFT's ``init_lora_weights="olora"``: the factors are NOT divided by s, so the base becomes
    W − s·Q_r·R_r and the adapted layer equals W at initialization for any α. QR signs depend on the LAPACK
    backend; a federation computes them once, on the server (the factors travel, not the recipe).
    """
    Q, R = torch.linalg.qr(weights.to(torch.float32 if weights.dtype != torch.float64 else torch.float64))
    return Q[..., :rank].contiguous().to(weights.dtype), R[..., :rank, :].contiguous().to(weights.dtype)


def _damped(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CorDA's damping, per matrix: C̃ = C + λ·I with λ = damp·mean(diag C), damp = 0.01 doubled until
    ‖C̃·C̃⁻¹ − I‖_F < 0.05 (as the reference and PEFT). Returns (C̃, C̃⁻¹)."""
    n = covariance.shape[-1]
    eye = torch.eye(n, dtype=covariance.dtype)
    damped, inverses = [], []
    for C in covariance:
        damp = 0.01
        while True:
            fixed = C + eye * C.diagonal().mean() * damp
            inverse = torch.linalg.inv(fixed)
            if torch.dist(fixed @ inverse, eye) < 0.05:
                break
            damp *= 2
            if damp > 1e6:
                raise AdapterError("CorDA: the input covariance cannot be inverted even with heavy damping")
        damped.append(fixed)
        inverses.append(inverse)
    return torch.stack(damped), torch.stack(inverses)


def corda(
    weights: torch.Tensor,
    rank: int,
    scaling: float,
    *,
    generator: torch.Generator,
    statistics: Mapping[str, torch.Tensor] | None = None,
    mode: str = "ipm",
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CorDA (Yang et al., NeurIPS 2024): the SVD of W·C̃, C̃ the damped input covariance of the layer.

    W·C̃ = U·Σ·Vᵀ gives W = U·Σ·(Vᵀ·C̃⁻¹) exactly; ``mode="ipm"`` (instruction-previewed) keeps the top-r
    components, ``mode="kpm"`` (knowledge-preserved) the bottom-r ones: A = √(Σ_r/s)·(Vᵀ·C̃⁻¹)_r,
    B = U_r·√(Σ_r/s), and the base holds W − s·B·A. C is the uncentered covariance E[x xᵀ] of the layer input
    (statistic ``xx``: each calibration example weighs the same). PEFT scales each sample's XᵀX by 1/max(X)²
    before averaging; fedspec does not (the clipped, summable statistic stays well defined under DP); with
    one calibration sample, or samples of equal scale, the two agree exactly (the result is invariant to a global
    scale of C). Full SVD in float64, as the reference.
    """
    if mode not in CORDA_MODES:
        raise AdapterError(
            f"adapter.options.mode={mode!r} is not a CorDA mode; choose one of: {', '.join(CORDA_MODES)}"
        )
    C = _statistic(statistics, "xx", "corda")
    damped, inverse = _damped(C)
    W = weights.to(torch.float64)
    U, S, Vh = torch.linalg.svd(W @ damped, full_matrices=False)
    keep = slice(0, rank) if mode == "ipm" else slice(-rank, None)
    U, S, right = U[..., keep], S[..., keep], (Vh @ inverse)[..., keep, :]
    root = (S / scaling).sqrt()
    return (U * root.unsqueeze(-2)).to(weights.dtype), (root.unsqueeze(-1) * right).to(weights.dtype)


def activation_pca(statistics: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA's decomposition from the summed statistics: the exact PCA of a layer's inputs.

    Covariance E[x xᵀ] − E[x]E[x]ᵀ (centered, as PEFT's incremental PCA), eigendecomposed in float64.
    Returns (explained-variance ratios (b, in), components (b, in, in) as rows), both in decreasing order.
    """
    xx, x = statistics["xx"].to(torch.float64), statistics["x"].to(torch.float64)
    covariance = xx - x.unsqueeze(-1) * x.unsqueeze(-2)
    covariance = (covariance + covariance.mT) / 2
    values, vectors = torch.linalg.eigh(covariance)
    values, vectors = values.flip(-1).clamp(min=0.0), vectors.flip(-1)
    total = values.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    components = vectors.mT
    # Sign convention of PEFT's svd_flip(u_based_decision=False): the largest-|.| entry of each component > 0.
    pivot = components.abs().argmax(-1, keepdim=True)
    signs = torch.sign(torch.gather(components, -1, pivot))
    return values / total, components * torch.where(signs == 0, 1.0, signs)


def eva_ranks(
    statistics: Mapping[str, Mapping[str, torch.Tensor]],
    rank: int,
    *,
    rho: float = 2.0,
    limits: Mapping[str, int] | None = None,
    **_: object,
) -> dict[str, int]:
    """EVA's rank redistribution: the budget r × (number of layers) goes to the components with the largest
    explained-variance ratio, over all layers together; a layer may get 0 … round(ρ·r) (capped by its size).

    Ties go to the earlier layer (so of two layers with the same input, e.g. query and value, the first gets
    at least as many — PEFT's rule for layers with equal inputs).
    """
    if not rho >= 1.0:
        raise AdapterError(f"adapter.options.rho={rho!r} must be >= 1 (EVA's components per layer = round(rho·r))")
    names = list(statistics)
    candidates: list[tuple[float, int, int]] = []
    for index, name in enumerate(names):
        ratios, _ = activation_pca({k: v.unsqueeze(0) for k, v in statistics[name].items()})
        cap = round(rho * rank)
        if limits is not None:
            cap = min(cap, limits[name])
        for component, ratio in enumerate(ratios[0, :cap].tolist()):
            candidates.append((-ratio, index, component))
    candidates.sort()
    budget = rank * len(names)
    ranks = dict.fromkeys(names, 0)
    for _, index, _ in candidates[:budget]:
        ranks[names[index]] += 1
    return ranks


def eva(
    weights: torch.Tensor,
    rank: int,
    scaling: float,
    *,
    generator: torch.Generator,
    statistics: Mapping[str, torch.Tensor] | None = None,
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA (Paischer et al., NeurIPS 2025): A = the top-r principal components of the layer's inputs, B = 0
    (so W is kept and the adapted layer equals it at initialization).

    ``rank`` is this layer's rank r_l after :func:`eva_ranks`; the scaling stays α/r for every layer (PEFT's
    ``adjust_scaling_factors=True`` sets α_l = α·r_l/r, so α_l/r_l = α/r). The PCA is exact (an eigendecomposition
    of the summed covariance) instead of PEFT's incremental randomized PCA with a convergence stop (τ): no τ, and
    federated clients need to send only sums. No whitening (PEFT's default ``whiten=False``).
    """
    _statistic(statistics, "xx", "eva")
    _, components = activation_pca(statistics)
    A = components[..., :rank, :]
    B = torch.zeros(weights.shape[0], weights.shape[1], rank, dtype=torch.float64)
    return B.to(weights.dtype), A.contiguous().to(weights.dtype)


def lora_ga(
    weights: torch.Tensor,
    rank: int,
    scaling: float,
    *,
    generator: torch.Generator,
    statistics: Mapping[str, torch.Tensor] | None = None,
    direction: str = "ArB2r",
    scale: str = "stable",
    stable_gamma: float = 16.0,
    svd_method: str = "randomized",
    niter: int = 4,
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA (Wang et al., NeurIPS 2024), PEFT's formula: the 2r-truncated SVD of the mean loss gradient
    G = U·S·Vᵀ, then (default ``direction="ArB2r"``) A = Vᵀ[:r], B = U[:, r:2r]·diag(S[r:2r]); the other
    directions as PEFT (``ArBr`` interleaved, ``A2rBr``, ``random`` from the seeded generator).

    ``scale``: ``"stable"`` (default) B *= m^{1/4}/√γ (m = out features, γ = ``stable_gamma`` = 16);
    ``"weight_svd"`` B *= σ₁(W)/S_B[0]; ``"gd_scale"`` A, B /= s; ``"unit"`` none. The base holds W − s·B·A.
    G is the per-example average gradient of the calibration examples (PEFT: the average of per-batch mean
    gradients; equal for equal batches). Randomized SVD as PEFT (q = 4r, 4 power iterations) but from the
    seeded generator; ``svd_method="exact"`` for the exact one.
    """
    if direction not in LORA_GA_DIRECTIONS:
        raise AdapterError(f"adapter.options.direction={direction!r} is not allowed; choose one of: "
                           f"{', '.join(LORA_GA_DIRECTIONS)}")
    if scale not in LORA_GA_SCALES:
        raise AdapterError(
            f"adapter.options.scale={scale!r} is not allowed; choose one of: {', '.join(LORA_GA_SCALES)}"
        )
    G = _statistic(statistics, "grad", "lora_ga").to(torch.float32 if weights.dtype != torch.float64 else torch.float64)
    out_features, in_features = weights.shape[-2:]
    if 2 * rank > min(out_features, in_features):
        raise AdapterError(
            f"adapter.rank={rank}: LoRA-GA takes 2r singular directions of the gradient, so 2·rank must be at most "
            f"{min(out_features, in_features)} for a {out_features}x{in_features} layer"
        )
    q = min(4 * rank, out_features, in_features)
    U, S, Vh = truncated_svd(G, 2 * rank, method=svd_method, niter=niter, oversample=q - 2 * rank, generator=generator)
    if direction == "ArBr":
        a_rows, b_cols = slice(1, 2 * rank, 2), slice(0, 2 * rank, 2)
    elif direction == "A2rBr":
        a_rows, b_cols = slice(rank, 2 * rank), slice(0, rank)
    elif direction == "ArB2r":
        a_rows, b_cols = slice(0, rank), slice(rank, 2 * rank)
    else:
        picked = torch.randperm(2 * rank, generator=generator)[:rank]
        a_rows = b_cols = picked
    A = Vh[..., a_rows, :]
    S_B = S[..., b_cols]
    B = U[..., :, b_cols] * S_B.unsqueeze(-2)
    if scale == "stable":
        B = B * (out_features**0.25 / stable_gamma**0.5)
    elif scale == "weight_svd":
        _, weight_S, _ = truncated_svd(weights, 1, method="exact")
        ratio = torch.where(S_B[..., :1] > 0, weight_S[..., :1] / S_B[..., :1], torch.ones_like(S_B[..., :1]))
        B = B * ratio.unsqueeze(-1)
    elif scale == "gd_scale":
        A, B = A / scaling, B / scaling
    return B.contiguous().to(weights.dtype), A.contiguous().to(weights.dtype)


def fwsvd(
    weights: torch.Tensor,
    rank: int,
    scaling: float,
    *,
    generator: torch.Generator,
    statistics: Mapping[str, torch.Tensor] | None = None,
    svd_method: str = "exact",
    niter: int = 4,
    oversample: int = 8,
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FWSVD (Hsu et al., ICLR 2022): W ≈ (Î⁻¹·U_r·Σ_r)·V_rᵀ from the truncated SVD of Î·W, with
    Î = diag(√(Σ_j F_ij)) the row importance from the empirical Fisher F (statistic ``fisher``): the minimizer of
    ‖Î(W − B·A)‖_F. Returned as B = Î⁻¹U_rΣ_r/s, A = V_rᵀ, so s·B·A is the approximation (A has orthonormal
    rows and B = UΣ-like, the form FedSVD re-factorizes to).

    Rows whose Fisher is 0 (or tiny) would make Î singular: their importance is floored at 1e-6 × the mean
    row importance. The paper computes F on a task-fine-tuned model; here it comes from the calibration examples
    on the model the adapter starts from (the pretrained backbone and the seeded head).
    """
    fisher = _statistic(statistics, "fisher", "fwsvd")
    importance = fisher.clamp(min=0.0)
    floor = importance.mean(-1, keepdim=True) * 1e-6
    root = torch.maximum(importance, floor).clamp(min=torch.finfo(torch.float64).tiny).sqrt()  # (b, out)
    W = weights.to(torch.float64)
    U, S, Vh = truncated_svd(root.unsqueeze(-1) * W, rank, method=svd_method, niter=niter, oversample=oversample,
                             generator=generator)
    B = (U * S.unsqueeze(-2)) / root.unsqueeze(-1) / scaling
    return B.contiguous().to(weights.dtype), Vh.contiguous().to(weights.dtype)

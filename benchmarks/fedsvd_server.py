"""(b) The FedSVD server step for a 7B-shaped adapter set: 32 layers × 7 matrices (q, k, v, o: 4096×4096;
gate, up: 11008×4096; down: 4096×11008), rank 16, float32.

fedspec re-factorizes every B·A with `refactor_lowrank_grouped` (what `strategies.aggregation.refactor_all`
calls): the first round through a thin QR of Aᵀ and an r×r eigendecomposition, every later round through the
r×r rotation alone (A already has orthonormal rows). The baseline is the obvious alternative, a dense
`torch.linalg.svd` of each m×n product B·A: far too slow to run 224 times, so it is timed on a few products
and extrapolated to the whole set by its O(m·n·min(m, n)) cost — the table says which.
"""

from __future__ import annotations

import torch

from fedspec.svd import refactor_lowrank_grouped

from common import Row, interleaved, median, seconds, timed, yes_no

SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
          "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
LAYERS, RANK = 32, 16


def adapter_set(orthonormal_A: bool, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """B after a round of client updates; A as PiSSA leaves it (round 1) or with orthonormal rows (later)."""
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for layer in range(LAYERS):
        for name, (m, n) in SHAPES.items():
            B = torch.randn(m, RANK, generator=g) * 0.02
            A = torch.randn(RANK, n, generator=g) * 0.02
            if orthonormal_A:
                A = torch.linalg.qr(A.mT).Q.mT.contiguous()
            pairs[f"layers.{layer}.{name}"] = (B, A)
    return pairs


def _check(pairs, result) -> tuple[float, float]:
    """Worst relative product error (on 64 sampled rows per layer, without forming m×n products of all
    rows) and worst |A Aᵀ − I| over the whole set."""
    worst_product, worst_orth = 0.0, 0.0
    rows = torch.arange(0, 4096, 64)
    for name, (B, A) in pairs.items():
        B_new, A_new = result[name]
        ref = B[rows].double() @ A.double()
        got = B_new[rows].double() @ A_new.double()
        worst_product = max(worst_product, float((got - ref).norm() / ref.norm()))
        gram = A_new.double() @ A_new.double().T
        worst_orth = max(worst_orth, float((gram - torch.eye(RANK, dtype=torch.float64)).abs().max()))
    return worst_product, worst_orth


def _dense_seconds(quick: bool) -> tuple[float, str]:
    """Dense SVD time for the whole set: measured on one product, extrapolated by m·n·min(m, n)."""
    size = 2048 if quick else 4096
    g = torch.Generator().manual_seed(1)
    B, A = torch.randn(size, RANK, generator=g), torch.randn(RANK, size, generator=g)
    measured = timed(lambda: torch.linalg.svd(B @ A, full_matrices=False))
    per_unit = measured / size**3
    total = LAYERS * sum(per_unit * m * n * min(m, n) for m, n in SHAPES.values())
    return total, f"dense torch.linalg.svd(B·A): one {size}² product timed ({seconds(measured)}), extrapolated by m·n·min(m,n)"


def run(quick: bool) -> list[Row]:
    repeats = 3 if quick else 7
    first_round = adapter_set(orthonormal_A=False)
    later_round = adapter_set(orthonormal_A=True, seed=1)
    results = {}

    def general():
        results["general"] = refactor_lowrank_grouped(first_round)

    def shortcut():
        results["shortcut"] = refactor_lowrank_grouped(later_round, assume_orthonormal_rows=True)

    times = interleaved({"general": general, "shortcut": shortcut}, repeats=repeats)
    dense, how = _dense_seconds(quick)
    rows = []
    for key, pairs, label, needs_target in (
        ("shortcut", later_round, "rounds ≥ 2 (A orthonormal: r×r rotation only)", True),
        ("general", first_round, "round 1 (thin QR of Aᵀ + r×r eigendecomposition)", False),
    ):
        t = median(times[key])
        product_err, orth_err = _check(pairs, results[key])
        rows.append(Row(
            "(b) FedSVD server step",
            f"7B-shaped set, {LAYERS}×7 matrices, r={RANK}, float32, {label}; median of {repeats}",
            seconds(t), f"{seconds(dense)} ({how})", f"{dense / t:,.0f}× faster",
            f"max ‖B'A'−BA‖/‖BA‖ {product_err:.1e}; max |A'A'ᵀ−I| {orth_err:.1e}",
            "whole set ≤ 0.5 s" if needs_target else "—",
            yes_no(t <= 0.5) if needs_target else "—",
        ))
    return rows

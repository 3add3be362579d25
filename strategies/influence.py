"""Bounded influence: no single client can move the global model much further than its peers.

Two bounds, both relative to the round's own cohort so they need no tuning to the model's scale:
- each update's L2 norm (all its tensors together) is clipped to ``norm_factor`` × the median norm of the
  round's updates: an update a million times larger than the others moves the model like one three times larger;
- each aggregation weight is capped at ``weight_factor`` × the median weight: a client claiming 10⁹ records
  counts like one with a few times the typical number.

The median is the lower median: with two updates it is the smaller one, so in a round of two a hostile client
cannot raise its own bound (the mean of two would be its to set). A lone update has no peer to be bounded by: it is
clipped against the median norm of the last round that had peers (``reference_norm``, kept in the checkpoint), and
goes unbounded only in a run whose first rounds have a single reply.
Honest cohorts are rarely touched (DP-SGD updates have similar norms; Dirichlet client sizes stay well within a
few medians), and when nothing is clipped the aggregate is exactly the plain weighted mean. Client-level DP clips
with its own fixed norm.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MIN_COHORT = 2


@dataclass(frozen=True)
class InfluenceBound:
    norm_factor: float | None = 3.0  # None or 0: no norm clipping
    weight_factor: float | None = 5.0  # None or 0: no weight cap

    def __post_init__(self) -> None:
        for key, value in (("federation.update_clip", self.norm_factor), ("federation.weight_cap", self.weight_factor)):
            if value is not None and value != 0 and value < 1:
                raise ValueError(f"{key}={value!r} must be >= 1 (a multiple of the cohort's median) or 0 (off)")


@dataclass(frozen=True)
class Bounded:
    updates: list[dict[str, torch.Tensor]]
    weights: list[float]
    clipped: int  # updates whose norm was clipped
    capped: int  # weights that were capped
    median_norm: float | None = None  # the cohort's (lower) median update norm; None without peers


def update_norm(update: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum(t.double().pow(2).sum() for t in update.values())))


def bound_influence(updates: Sequence[dict[str, torch.Tensor]], weights: Sequence[float], bound: InfluenceBound,
                    reference_norm: float | None = None) -> Bounded:
    """The updates and weights to aggregate, each client's influence bounded (see the module docstring);
    ``reference_norm`` bounds a lone update: the median norm of the last round that had peers."""
    updates, weights = list(updates), [float(w) for w in weights]
    norms = [update_norm(u) for u in updates]
    median = statistics.median_low(norms) if len(updates) >= MIN_COHORT else None
    reference = median if median is not None else reference_norm
    clipped = capped = 0
    if bound.norm_factor and reference is not None:
        limit = bound.norm_factor * reference
        for i, norm in enumerate(norms):
            if norm > limit > 0:
                updates[i] = {k: t * (limit / norm) for k, t in updates[i].items()}
                clipped += 1
    if bound.weight_factor and len(updates) >= MIN_COHORT:  # a lone weight is normalized away in the mean
        cap = bound.weight_factor * statistics.median_low(weights)
        capped = sum(w > cap for w in weights)
        weights = [min(w, cap) for w in weights]
    return Bounded(updates, weights, clipped, capped, median)

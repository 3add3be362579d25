"""A server optimizer on the aggregated update: server learning rate and momentum (FedAvgM, Hsu et al. 2019).

Each round the strategy turns the clients' weighted mean update Δ into the step it applies::

    m ← β·m + Δ          step = η·m

with η = ``strategy.server_lr`` and β = ``strategy.server_momentum`` (η = 1, β = 0: plain FedAvg). Under DP the
server only sees the clients' privatized outputs, so this is post-processing: no client's ε changes.

Momentum smooths the round-to-round swing of label-skewed cohorts: every client's update still counts, but a
round's cohort no longer moves the global model by itself alone.

FedSVD stays exact. The step is applied to ΔB *before* the re-factorization, and a momentum buffer M of a B is
the weight-space step M·A. After the re-factorization A′ spans the same row space as A (clients never train A),
so the buffer is carried over to the new basis as M·A·A′ᵀ, which represents the same weight-space M·A exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .aggregation import A_SUFFIX, B_SUFFIX, AggregationRule

MOMENTUM_PREFIX = "server-momentum."  # checkpoint keys of the momentum buffers


@dataclass
class ServerOptimizer:
    lr: float = 1.0
    momentum: float = 0.0
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # float64, one per trained tensor

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"strategy.server_lr={self.lr!r} must be > 0 (1.0: the plain mean update)")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"strategy.server_momentum={self.momentum!r} must be in [0, 1) (0: no momentum)")

    @property
    def is_identity(self) -> bool:
        return self.lr == 1.0 and self.momentum == 0.0

    def step(self, mean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The update to apply this round, from the clients' weighted mean update ``mean``."""
        if self.is_identity:
            return mean
        if self.momentum == 0.0:
            return {k: self.lr * v.to(torch.float64) for k, v in mean.items()}
        for key, value in mean.items():
            previous = self.buffers.get(key)
            value = value.to(torch.float64)
            self.buffers[key] = value.clone() if previous is None else self.momentum * previous + value
        return {k: self.lr * self.buffers[k] for k in mean}

    def change_basis(self, rule: AggregationRule, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
        """Carry the buffers of B over a FedSVD re-factorization (A → A′): M ← M·A·A′ᵀ, the same step M·A."""
        if not (rule.refactor and self.buffers):
            return
        for key in list(self.buffers):
            if not key.endswith(B_SUFFIX):
                continue
            a_key = key[: -len(B_SUFFIX)] + A_SUFFIX
            old_a, new_a = before[a_key].to(torch.float64), after[a_key].to(torch.float64)
            self.buffers[key] = self.buffers[key] @ (old_a @ new_a.T)

    def forget(self, keys: Iterable[str]) -> None:
        """Drop the buffers of these tensors (their next step starts without momentum)."""
        for key in keys:
            self.buffers.pop(key, None)

    def state(self) -> dict[str, torch.Tensor]:
        """The buffers, for the server's checkpoint."""
        return {MOMENTUM_PREFIX + k: v for k, v in self.buffers.items()}

    def load(self, checkpoint_state: dict[str, torch.Tensor]) -> None:
        """Restore the buffers from a checkpoint state (other keys are ignored)."""
        self.buffers = {k[len(MOMENTUM_PREFIX):]: v.to(torch.float64) for k, v in checkpoint_state.items()
                        if k.startswith(MOMENTUM_PREFIX)}


def split_momentum(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(adapter state, momentum buffers) of a checkpoint state."""
    momentum = {k: v for k, v in state.items() if k.startswith(MOMENTUM_PREFIX)}
    return {k: v for k, v in state.items() if k not in momentum}, momentum

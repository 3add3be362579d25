"""One protocol for what some methods do besides the optimizer step: regularizers (SORSA, KaSA), proximal
steps (SoRA), budget schedules (AdaLoRA), annealed weight decay (SoMA), resampling (SST).

The training loop asks the model's adapter for its hooks (:func:`training_hooks`) and calls each one after every
optimizer step, so a method that needs a hook cannot be trained without it by accident.

Why after the step and not inside the loss: under DP-SGD Opacus replaces each parameter's gradient by the clipped,
noised sum of per-sample gradients, which are computed from layer activations only; a penalty on parameters added to
the loss would silently vanish from the update. A hook instead changes parameters as post-processing of the
privatized step (no privacy cost for parameter-only penalties), and a hook that needs gradients (AdaLoRA's
importance) reads ``p.grad`` after the step, which under DP is the privatized gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class TrainingHook(Protocol):
    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after optimizer step ``step`` (0-based, counted over the whole training: epochs or rounds)."""


@dataclass(frozen=True)
class HookContext:
    """What hooks may need to know about the training they run in.

    ``total_steps`` spans the whole training (all epochs of `fedspec train`, all rounds of a client's schedule),
    for schedules such as AdaLoRA's rank budget; ``optimizer`` is the current call's optimizer (SST resets the
    moment estimates of vectors it resamples); ``seed`` seeds hook randomness (SST's sampling).
    """

    lr: float
    total_steps: int
    optimizer: torch.optim.Optimizer | None = None
    seed: int = 0


class PenaltyStep:
    """A parameter-only penalty applied as its own gradient step after each optimizer step:
    θ ← θ − lr·weight·∇penalty(θ). Subclasses define :meth:`penalty`."""

    def __init__(self, weight: float, lr: float) -> None:
        self.weight = weight
        self.lr = lr

    def penalty(self, model: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, model: nn.Module, step: int) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.enable_grad():
            value = self.penalty(model)
        grads = torch.autograd.grad(value, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p.sub_(self.lr * self.weight * g)


def training_hooks(model: nn.Module, context: HookContext) -> list[TrainingHook]:
    """The hooks the model's adapter method requires (none for a model without a fedspec adapter)."""
    from .inject import CONFIG_ATTRIBUTE
    from .registry import get_method

    config = getattr(model, CONFIG_ATTRIBUTE, None)
    if config is None:
        return []
    spec = get_method(config.method)
    return list(spec.hooks(model, config, context)) if spec.hooks is not None else []

"""SoMA (Yun et al., CVPR 2025): MiLoRA's start (the bottom-r SVD of W) with a weight decay cosine-annealed
from 0.05 to 1e-5 over the whole training.

Decoupled weight decay (AdamW's θ ← θ − η·λ_t·θ) after every optimizer step, on every trainable parameter (what
AdamW's ``weight_decay`` touches). As a hook it depends only on parameters, so under DP-SGD it is post-processing
of the privatized step and costs no privacy. ``step`` is the run's global step (the training loop is told where a
call starts: an epoch, a federated round), so the schedule spans the whole run, not one training call.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import AdapterError
from ..hooks import HookContext
from ..registry import MethodSpec, register
from .milora import initialize


class AnnealedWeightDecay:
    def __init__(self, start: float, end: float, total_steps: int, lr: float) -> None:
        if start < 0 or end < 0:
            raise AdapterError(f"adapter.options.weight_decay={start!r} and weight_decay_end={end!r} must be >= 0")
        if total_steps < 1:
            raise AdapterError(f"the weight-decay schedule needs total_steps >= 1, got {total_steps!r}")
        if lr * start >= 1:
            # θ ← (1 − η·λ)·θ: at η·λ = 1 every trainable tensor is zeroed each step, beyond it its sign flips.
            # λ = 0.05 is an AdamW value (η ~ 1e-4); DP-SGD's rates of 1 and more need a λ scaled down to match.
            raise AdapterError(
                f"SoMA's weight decay would shrink every trainable tensor by a factor 1 − lr·λ = {1 - lr * start:.3g} "
                f"per step (lr {lr:g}, adapter.options.weight_decay={start:g}), zeroing or flipping it: lower "
                f"adapter.options.weight_decay below 1/lr = {1 / lr:.3g} (about 1e-4/lr keeps AdamW's decay per step)")
        self.start, self.end, self.total_steps, self.lr = float(start), float(end), int(total_steps), float(lr)

    def decay(self, step: int) -> float:
        """λ_t = λ_end + ½(λ_start − λ_end)(1 + cos(π·t/T)), held at λ_end after T steps."""
        progress = min(max(step, 0), self.total_steps) / self.total_steps
        return self.end + 0.5 * (self.start - self.end) * (1.0 + math.cos(math.pi * progress))

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        factor = 1.0 - self.lr * self.decay(step)
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(factor)


def hooks(model: nn.Module, config, context: HookContext) -> list[AnnealedWeightDecay]:
    """SoMA (Yun et al., CVPR 2025): weight decay 0.05 → 1e-5, cosine over the whole training
    (``context.total_steps``: all epochs of ``fedspec train``, all rounds of a client's schedule)."""
    options = config.options
    return [AnnealedWeightDecay(options["weight_decay"], options["weight_decay_end"], context.total_steps, context.lr)]


register(MethodSpec(name="soma", initializer=initialize, base_policy="residual", hooks=hooks))

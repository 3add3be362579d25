"""AdaLoRA (Zhang et al., ICLR 2023): W + s·P·diag(λ)·Q; an importance-based rank budget on a cubic
schedule, and an orthogonal regularizer."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import AdapterError
from ..hooks import HookContext, PenaltyStep
from ..inject import AdapterConfig
from ..layers import LowRankCoreLinear
from ..registry import MethodSpec, register
from .common import cast, core_layer, factor_gaps, layers_of


def initialize(weights: torch.Tensor, rank: int, scaling: float, *, generator: torch.Generator,
               **_: object) -> dict[str, torch.Tensor]:
    """AdaLoRA (Zhang et al., ICLR 2023): Λ = 0, P and Q ~ N(0, 0.02²) as PEFT; the layer equals W at start."""
    b, m, n = weights.shape
    return cast({
        "lora_B.weight": 0.02 * torch.randn(b, m, rank, generator=generator, dtype=weights.dtype),
        "lora_A.weight": 0.02 * torch.randn(b, rank, n, generator=generator, dtype=weights.dtype),
        "core.weight": torch.zeros(b, rank, dtype=weights.dtype),
    }, weights.dtype)


class AdaLoRAOrthPenalty(PenaltyStep):
    """AdaLoRA's orthogonal regularizer: the mean over all P and Q matrices of ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F."""

    def penalty(self, model: nn.Module) -> torch.Tensor:
        layers = layers_of(model, LowRankCoreLinear)
        return sum(factor_gaps(layer) for layer in layers) / (2 * len(layers))


class RankAllocator:
    """AdaLoRA's budget schedule and importance-based masking of the singular values λ (PEFT's ``RankAllocator``).

    After every step t: importance I = |p·∇p| of every entry of P, Λ, Q, smoothed Ī ← β₁Ī + (1−β₁)I with
    uncertainty Ū ← β₂Ū + (1−β₂)|I − Ī|; a triplet's score is s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji) with s = Ī·Ū.
    The budget is b₀ = Σ init ranks up to tinit, then b(t) = b_T + (b₀ − b_T)(1 − (t − tinit)/(T − tfinal − tinit))³,
    b_T for the last tfinal steps; every deltaT steps the λ of the lowest-scoring triplets beyond the budget are set
    to 0. ∇p is ``p.grad`` after the optimizer step — under DP, the privatized gradient.

    The smoothed importances live in this object, one per training call (an epoch of `fedspec train`, a client's
    round): with β = 0.85 they forget within a few steps, and nothing computed from one client's gradients is
    carried into another simulated client that shares the process. The step counter and T are global.
    """

    def __init__(self, layers: list[LowRankCoreLinear], *, target_rank: int, total_steps: int, tinit: int,
                 tfinal: int, delta_t: int, beta1: float, beta2: float) -> None:
        if total_steps <= tinit + tfinal:
            raise AdapterError(
                f"AdaLoRA's budget schedule needs more steps than adapter.options.tinit + tfinal = {tinit + tfinal}; "
                f"the training has {total_steps} (raise train.epochs / federation.rounds or lower tinit/tfinal)"
            )
        self.layers = layers
        self.init_budget = sum(layer.rank for layer in layers)
        self.target_budget = target_rank * len(layers)
        self.total_steps, self.tinit, self.tfinal, self.delta_t = total_steps, tinit, tfinal, max(1, delta_t)
        self.beta1, self.beta2 = beta1, beta2
        self.avg: dict[nn.Parameter, torch.Tensor] = {}
        self.unc: dict[nn.Parameter, torch.Tensor] = {}
        # The final-phase pattern of a call that starts after T − tfinal: the triplets alive at its start (λ is
        # exactly 0 for masked ones then, since the previous call ended with a masking).
        self.pattern = [layer.core.weight.detach() != 0 for layer in layers]

    def budget(self, step: int) -> tuple[int, bool]:
        if step <= self.tinit:
            return self.init_budget, False
        if step > self.total_steps - self.tfinal:
            return self.target_budget, True
        progress = 1 - (step - self.tinit) / (self.total_steps - self.tfinal - self.tinit)
        budget = int((self.init_budget - self.target_budget) * progress ** 3 + self.target_budget)
        return budget, step % self.delta_t == 0

    @torch.no_grad()
    def _update_importance(self) -> None:
        for layer in self.layers:
            for p in (layer.lora_A.weight, layer.core.weight, layer.lora_B.weight):
                if p.grad is None:
                    continue
                ipt = (p * p.grad).abs()
                avg = self.avg.get(p, torch.zeros_like(p))
                unc = self.unc.get(p, torch.zeros_like(p))
                self.avg[p] = self.beta1 * avg + (1 - self.beta1) * ipt
                self.unc[p] = self.beta2 * unc + (1 - self.beta2) * (ipt - self.avg[p]).abs()

    def _score(self, p: nn.Parameter) -> torch.Tensor:
        return self.avg.get(p, torch.zeros_like(p)) * self.unc.get(p, torch.zeros_like(p))

    def triplet_scores(self) -> list[torch.Tensor]:
        return [self._score(l.core.weight) + self._score(l.lora_A.weight).mean(1) + self._score(l.lora_B.weight).mean(0)
                for l in self.layers]

    @torch.no_grad()
    def _mask_to_budget(self, budget: int) -> None:
        prune = self.init_budget - budget
        if prune <= 0:
            return
        scores = self.triplet_scores()
        threshold = torch.kthvalue(torch.cat(scores), prune).values
        self.pattern = [s > threshold for s in scores]
        self._apply_pattern()

    @torch.no_grad()
    def _apply_pattern(self) -> None:
        for layer, keep in zip(self.layers, self.pattern):
            layer.core.weight.masked_fill_(~keep, 0.0)

    def after_step(self, model: nn.Module, step: int) -> None:
        final = self.total_steps - self.tfinal
        if step < final:
            self._update_importance()
            budget, mask = self.budget(step)
            if mask:
                self._mask_to_budget(budget)
        elif step == final:
            self._update_importance()
            self._mask_to_budget(self.target_budget)
        else:
            self._apply_pattern()

    def ranks(self) -> list[int]:
        """The current rank of each layer (non-zero λ)."""
        return [int(torch.count_nonzero(layer.core.weight)) for layer in self.layers]


def hooks(model: nn.Module, config: AdapterConfig, context: HookContext) -> list:
    options = config.options
    layers = layers_of(model, LowRankCoreLinear)
    target = options.get("target_rank")
    target = max(1, round(2 * config.rank / 3)) if target is None else int(target)
    if not 1 <= target <= config.rank:
        raise AdapterError(f"adapter.options.target_rank={target} must be in [1, adapter.rank={config.rank}]")
    hooks: list = [RankAllocator(layers, target_rank=target, total_steps=context.total_steps,
                                 tinit=int(options["tinit"]), tfinal=int(options["tfinal"]),
                                 delta_t=int(options["delta_t"]), beta1=float(options["beta1"]),
                                 beta2=float(options["beta2"]))]
    weight = float(options["orth_reg_weight"])
    if weight > 0:
        hooks.insert(0, AdaLoRAOrthPenalty(weight=weight, lr=context.lr))
    return hooks


register(MethodSpec(name="adalora", initializer=initialize, base_policy="keep", layer=core_layer("keep"),
                    init_needs="nothing (random)", federated="nonlinear", hooks=hooks))

"""Training hooks of the structured methods: regularizers, proximal steps, budget schedules, resampling.

All run after the optimizer step (see ``adapters/hooks.py`` for why): parameter-only penalties are a
:class:`~fedspec.adapters.hooks.PenaltyStep` (θ ← θ − lr·w·∇penalty, no privacy cost under DP-SGD), SoRA's proximal
operator and SST's resampling change parameters directly, and AdaLoRA's allocator reads ``p.grad`` — under DP, the
clipped and noised gradient Opacus just applied, so the rank allocation is post-processing of the private release.

Differences from the papers' code, chosen so every method runs in one loop under DP: KaSA's, AdaLoRA's, SALT's and
Effort's auxiliary losses are applied as their own SGD step of size lr·weight after the optimizer step, not added to
the task loss (where Opacus' per-sample clipping would discard them and Adam would rescale them).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterError
from .core import LowRankCoreLinear
from .factor import FactorLinear
from .hooks import HookContext, PenaltyStep
from .inject import AdapterConfig, adapter_layers
from .spectral import SpectralLinear


def _layers(model: nn.Module, cls: type) -> list:
    return [layer for layer in adapter_layers(model).values() if isinstance(layer, cls)]


def _gram_gap(columns: torch.Tensor) -> torch.Tensor:
    """‖MᵀM − I‖_F for M with orthonormal columns as the target."""
    gram = columns.T @ columns
    return torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))


def _factor_gaps(layer: LowRankCoreLinear) -> torch.Tensor:
    """‖BᵀB − I‖_F + ‖AAᵀ − I‖_F: B's columns and A's rows orthonormal (SORSA, KaSA, AdaLoRA)."""
    return _gram_gap(layer.lora_B.weight) + _gram_gap(layer.lora_A.weight.T)


# --- SORSA -----------------------------------------------------------------------------------------------------


class OrthonormalStep(PenaltyStep):
    """SORSA's regularizer L_orth = mean over layers of ‖U_pᵀU_p − I‖_F + ‖V_pᵀV_p − I‖_F, applied as
    θ ← θ − γ·∇L_orth after the optimizer step (``lr=1``): its strength γ does not depend on the learning rate and it
    is never clipped, as in SORSA, where the gradient of (γ/η)·L_orth is added after clipping. fedspec keeps it out
    of Adam's moments (SORSA's reference uses AdamW), so under DP it stays a parameter-only post-processing step."""

    def penalty(self, model: nn.Module) -> torch.Tensor:
        layers = _layers(model, LowRankCoreLinear)
        return sum(_factor_gaps(layer) for layer in layers) / len(layers)


def sorsa_hooks(model: nn.Module, config: AdapterConfig, context: HookContext) -> list:
    gamma = float(config.options["gamma"])
    return [OrthonormalStep(weight=gamma, lr=1.0)] if gamma > 0 else []


# --- KaSA ------------------------------------------------------------------------------------------------------


class KasaPenalty(PenaltyStep):
    """KaSA's auxiliary loss, summed over layers as PEFT's ``_get_kasa_loss``:
    β‖λ‖² + γ(‖BᵀB − I‖_F + ‖AAᵀ − I‖_F)."""

    def __init__(self, beta: float, gamma: float, lr: float) -> None:
        super().__init__(weight=1.0, lr=lr)
        self.beta, self.gamma = beta, gamma

    def penalty(self, model: nn.Module) -> torch.Tensor:
        return sum(self.beta * (layer.core.weight ** 2).sum() + self.gamma * _factor_gaps(layer)
                   for layer in _layers(model, LowRankCoreLinear))


def kasa_hooks(model: nn.Module, config: AdapterConfig, context: HookContext) -> list:
    beta, gamma = float(config.options["beta"]), float(config.options["gamma"])
    return [KasaPenalty(beta, gamma, context.lr)] if beta > 0 or gamma > 0 else []


# --- AdaLoRA ---------------------------------------------------------------------------------------------------


class AdaLoRAOrthPenalty(PenaltyStep):
    """AdaLoRA's orthogonal regularizer: the mean over all P and Q matrices of ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F."""

    def penalty(self, model: nn.Module) -> torch.Tensor:
        layers = _layers(model, LowRankCoreLinear)
        return sum(_factor_gaps(layer) for layer in layers) / (2 * len(layers))


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


def adalora_hooks(model: nn.Module, config: AdapterConfig, context: HookContext) -> list:
    options = config.options
    layers = _layers(model, LowRankCoreLinear)
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


# --- SoRA ------------------------------------------------------------------------------------------------------


class SoftThreshold:
    """SoRA's proximal step after each optimizer step: g ← sign(g)·max(|g| − τ, 0), the proximal operator of
    τ‖g‖₁. τ = lr·λ: the step's learning rate times the L1 coefficient λ (``sparse_lambda``), i.e. the proximal
    gradient step for L + λ‖g‖₁ (the note's "λ multiplied by the learning rate" variant)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        for layer in _layers(model, LowRankCoreLinear):
            g = layer.core.weight
            g.copy_(torch.sign(g) * (g.abs() - self.threshold).clamp_min(0))


def sora_hooks(model: nn.Module, config: AdapterConfig, context: HookContext) -> list:
    return [SoftThreshold(context.lr * float(config.options["sparse_lambda"]))]


# --- SALT ------------------------------------------------------------------------------------------------------


class SaltPenalty(PenaltyStep):
    """SALT's regularizer, summed over layers: ‖diag(α⊙σ+β) − diag(σ)‖_F + ‖X·Y‖_F."""

    def penalty(self, model: nn.Module) -> torch.Tensor:
        total = 0.0
        for layer in _layers(model, SpectralLinear):
            spectrum = layer.spectrum
            total = total + torch.linalg.vector_norm(spectrum.top_values() - spectrum.sigma[: spectrum.rank])
            if spectrum.lora_rank > 0:
                total = total + torch.linalg.matrix_norm(spectrum.lora_X @ spectrum.lora_Y)
        return total


def salt_hooks(model: nn.Module, config: AdapterConfig, context: HookContext) -> list:
    weight = float(config.options["reg_weight"])
    return [SaltPenalty(weight=weight, lr=context.lr)] if weight > 0 else []


# --- Effort ----------------------------------------------------------------------------------------------------


class EffortPenalty(PenaltyStep):
    """Effort's optional losses, summed over layers:
    orthogonality ½‖[U_r U_res]ᵀ[U_r U_res] − I‖_F + ½‖[V_r V_res]ᵀ[V_r V_res] − I‖_F (U_r, V_r: the frozen top
    factors) and norm preservation |‖W′‖²_F − ‖W‖²_F|."""

    def __init__(self, model: nn.Module, orthogonality: float, norm: float, lr: float) -> None:
        super().__init__(weight=1.0, lr=lr)
        self.orthogonality, self.norm = orthogonality, norm
        with torch.no_grad():
            self.original_norms = {id(layer): float((layer.base.weight + layer.removed_weight()).pow(2).sum())
                                   for layer in _layers(model, LowRankCoreLinear)}

    def penalty(self, model: nn.Module) -> torch.Tensor:
        total = 0.0
        for layer in _layers(model, LowRankCoreLinear):
            if self.orthogonality > 0:
                U = torch.cat([layer.principal_B, layer.lora_B.weight], dim=1)
                V = torch.cat([layer.principal_A, layer.lora_A.weight], dim=0).T
                total = total + self.orthogonality * 0.5 * (_gram_gap(U) + _gram_gap(V))
            if self.norm > 0:
                adapted = layer.base.weight + layer.delta_weight()
                total = total + self.norm * (adapted.pow(2).sum() - self.original_norms[id(layer)]).abs()
        return total


def effort_hooks(model: nn.Module, config: AdapterConfig, context: HookContext) -> list:
    orthogonality = float(config.options["orthogonality_weight"])
    norm = float(config.options["norm_weight"])
    if orthogonality <= 0 and norm <= 0:
        return []
    return [EffortPenalty(model, orthogonality, norm, context.lr)]


# --- SST -------------------------------------------------------------------------------------------------------


def _generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


class SpectralResampler:
    """SST's structural update every ``every`` steps: fold the trained vectors, re-SVD every ``resvd_every``-th
    time, draw r new triplets ∝ σ, and reset the optimizer's moment estimates of the tensors that changed meaning
    (the sampled vectors and the re-ordered spectrum). Seeded by (seed, step), so reruns draw the same sets."""

    def __init__(self, every: int, resvd_every: int, context: HookContext) -> None:
        if every < 1:
            raise AdapterError(f"adapter.options.resample_every={every} must be a positive number of steps")
        self.every, self.resvd_every = every, resvd_every
        self.optimizer, self.seed = context.optimizer, context.seed

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        if (step + 1) % self.every:
            return
        count = (step + 1) // self.every
        resample_all(model, _generator(self.seed, step), resvd=self.resvd_every > 0 and count % self.resvd_every == 0)
        if self.optimizer is not None:
            for layer in _layers(model, FactorLinear):
                for p in (layer.sel_left.weight, layer.sel_right.weight, layer.spectrum.weight):
                    self.optimizer.state.pop(p, None)


def resample_all(model: nn.Module, generator: torch.Generator, *, resvd: bool) -> None:
    for layer in _layers(model, FactorLinear):
        layer.resample(generator, resvd=resvd)


def sst_hooks(model: nn.Module, config: AdapterConfig, context: HookContext) -> list:
    if config.federated:  # the server resamples between rounds (sst_server_step)
        return []
    return [SpectralResampler(int(config.options["resample_every"]), int(config.options["resvd_every"]), context)]


def sst_server_step(model: nn.Module, config: AdapterConfig, round_: int) -> None:
    """Federated SST: after aggregating round t, the server folds the averaged vectors, re-SVDs every
    ``resvd_every`` rounds, and draws the next round's r triplets per layer (seeded by the round, so a resumed run
    draws the same); the new frozen vectors are broadcast with the rest of the state."""
    resvd_every = int(config.options["resvd_every"])
    resample_all(model, _generator(0, round_), resvd=resvd_every > 0 and round_ % resvd_every == 0)

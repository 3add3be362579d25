"""Exact per-sample gradient rules for DP-SGD, and the guard that keeps Opacus off its functorch fallback.

Opacus computes per-sample gradients layer by layer: a module type with a registered *grad sampler*
(``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm``, ...) gets an exact einsum; any other module that owns
trainable parameters directly is handed to functorch, which recomputes the module under ``vmap`` and takes
per-sample gradients of **all** its parameters — frozen base weights included (B × d_out × d_in floats per
layer, then discarded). fedspec never allows that: :func:`check_exact_rules` refuses, before training starts,
a model in which such a module also holds frozen tensors, and names the module and the fix.

Adapter layers stay exact in one of two ways (so Opacus never falls back to per-sample gradients of frozen weights):
- trainable factors are ``nn.Linear`` (or other Opacus-supported) submodules — Opacus' own rules apply;
- a module with bare trainable ``nn.Parameter``s registers its rules here with :func:`register_rule`: a grad
  sampler ``(module, activations, backprops) -> {param: per-sample grad}`` and, for ghost clipping, a norm
  sampler returning ``{param: per-sample gradient norm}`` (derived from the grad sampler when omitted). The
  adapters' own building blocks (diagonals, SALT's spectrum: ``fedspec.adapters.layers.parts``) register theirs so.

Ghost clipping (``privacy.grad_sample_mode: ghost``) needs only per-sample gradient *norms*. For
``nn.Linear`` on sequences, Opacus' ghost norm costs O(T²·(d_in + d_out)) per example, while materializing
the per-sample gradient costs O(T·d_in·d_out); for a rank-r adapter factor (d_in or d_out = r) the latter
is far cheaper. :func:`linear_norm_sample` picks the cheaper exact formula per layer and call, and is
registered as the ``nn.Linear`` norm sampler when this module is imported.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping
from opacus.grad_sample.utils import register_grad_sampler, register_norm_sampler
from torch import nn

from ..errors import AdapterError

__all__ = [
    "GRAD_SAMPLE_MODES",
    "check_exact_rules",
    "functorch_fallback_modules",
    "has_norm_rule",
    "has_rule",
    "linear_norm_sample",
    "register_rule",
]

# Values of privacy.grad_sample_mode: Opacus' per-layer hooks, or ghost (fast gradient) clipping.
GRAD_SAMPLE_MODES: tuple[str, ...] = ("hooks", "ghost")

Activations = list[torch.Tensor]
GradSampler = Callable[[nn.Module, Activations, torch.Tensor], dict[nn.Parameter, torch.Tensor]]


def register_rule(module_type: type[nn.Module], grad_sampler: GradSampler, norm_sampler: GradSampler | None = None) -> None:
    """Register exact per-sample rules for a module type that owns trainable parameters directly.

    ``grad_sampler(module, activations, backprops)`` returns, for each *trainable* parameter of the module,
    its per-sample gradient (batch first). ``norm_sampler`` returns per-sample gradient norms for ghost
    clipping; without one, the norms of the grad sampler's output are used (exact, same cost as hooks mode).
    ``backprops`` is already scaled by Opacus for the loss reduction.
    """
    grad_sampler = _covering_every_trainable(grad_sampler)
    register_grad_sampler(module_type)(grad_sampler)
    register_norm_sampler(module_type)(_covering_every_trainable(norm_sampler) if norm_sampler else _norms_of(grad_sampler))


def has_rule(module_type: type[nn.Module]) -> bool:
    return module_type in GradSampleModule.GRAD_SAMPLERS


def has_norm_rule(module_type: type[nn.Module]) -> bool:
    return module_type in GradSampleHooksFastGradientClipping.NORM_SAMPLERS


def _covering_every_trainable(sampler: GradSampler) -> GradSampler:
    """``sampler``, refusing a result that leaves out a trainable parameter of the module.

    Opacus stores what a norm sampler returns in each parameter's ``_norm_sample`` and clips by the norms of
    *all* trainable parameters; one left out keeps the previous batch's norm (or none), so its gradient would be
    clipped by a stale value — a privacy failure, not an error. Checked on every call: it costs a set of ids.
    """

    def checked(module, activations, backprops):
        out = sampler(module, activations, backprops)
        covered = {id(p) for p in out}
        missing = [name for name, p in module.named_parameters() if p.requires_grad and id(p) not in covered]
        if missing:
            raise AdapterError(
                f"the per-sample rule {getattr(sampler, '__qualname__', sampler)} of {type(module).__name__} "
                f"returned nothing for its trainable {', '.join(missing)}: DP-SGD cannot clip a gradient it has "
                "no per-sample value for; return an entry for every parameter with requires_grad"
            )
        return out

    return checked


def _norms_of(grad_sampler: GradSampler) -> GradSampler:
    def norm_sampler(module, activations, backprops):
        return {p: g.reshape(len(g), -1).norm(2, dim=-1) for p, g in grad_sampler(module, activations, backprops).items()}

    return norm_sampler


# --- which modules Opacus would hand to functorch -------------------------------------------------------------


def _owns_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def functorch_fallback_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules Opacus' hooks would route through functorch: they own trainable parameters directly and
    their type has no registered grad sampler. Mirrors ``GradSampleModule.iterate_submodules`` (such a module
    is taken whole, so its children are not visited)."""
    found: dict[str, nn.Module] = {}

    def visit(name: str, module: nn.Module) -> None:
        if _owns_trainable(module) and not has_rule(type(module)):
            found[name] = module
            return
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return found


def check_exact_rules(model: nn.Module) -> None:
    """Refuse a model on which DP-SGD would compute per-sample gradients of frozen tensors.

    Raises AdapterError naming the first module that owns trainable parameters without a registered rule
    while holding (directly or in its children) frozen parameters: functorch would differentiate those too.
    A module whose parameters all train may use the functorch fallback (exact, only slower).
    """
    for name, module in functorch_fallback_modules(model).items():
        frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
        if frozen:
            raise AdapterError(
                f"module {name or '<model>'} ({type(module).__name__}) has trainable parameters but no per-sample "
                f"gradient rule, so Opacus would take per-sample gradients of its frozen {', '.join(frozen[:3])} "
                "with functorch; make its trainable factors nn.Linear submodules or register exact rules with "
                "fedspec.privacy.grad_samplers.register_rule"
            )


# --- nn.Linear: the cheaper exact per-sample norm ------------------------------------------------------------


def linear_norm_sample(layer: nn.Linear, activations: Activations, backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Exact per-sample gradient norms of an ``nn.Linear``, by whichever formula is cheaper.

    For inputs (B, T, d_in) and backprops (B, T, d_out): materializing G_i = Σ_t g_t a_tᵀ costs T·d_in·d_out
    per example; the ghost norm ‖G_i‖² = Σ_{t,s} (g_t·g_s)(a_t·a_s) costs T²·(d_in + d_out). Rank-r adapter
    factors (d_in or d_out = r) favour the first, long sequences through wide layers the second.
    """
    a = activations[0].to(backprops.dtype)
    g = backprops
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        if g.dim() == 2:
            out[layer.weight] = (g.square().sum(-1) * a.square().sum(-1)).sqrt()
        else:
            g3, a3 = g.reshape(len(g), -1, g.shape[-1]), a.reshape(len(a), -1, a.shape[-1])
            steps, d_out, d_in = g3.shape[1], g3.shape[2], a3.shape[2]
            if steps * (d_in + d_out) < d_in * d_out:
                gram_g = torch.bmm(g3, g3.mT)
                gram_a = torch.bmm(a3, a3.mT)
                out[layer.weight] = (gram_g * gram_a).sum(dim=(1, 2)).clamp_min(0).sqrt()
            else:
                out[layer.weight] = torch.linalg.matrix_norm(torch.bmm(g3.mT, a3))
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.reshape(len(g), -1, g.shape[-1]).sum(1).norm(2, dim=-1)
    return out


register_norm_sampler(nn.Linear)(_covering_every_trainable(linear_norm_sample))

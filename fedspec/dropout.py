"""Fast dropout for training on CPU.

On a CPU, a transformer's dropout masks cost as much as a fifth of a training step: ``torch.bernoulli_``
draws one Mersenne-Twister number per element, and SDPA's CPU kernels cannot fuse attention dropout, so
they fall back to a math path with an extra "safe softmax" pass. MiniLM's DP-SGD step (batch 32 × 64
tokens) spends ~160 ms of ~750 ms there.

This module cuts that cost without changing the model:
- a keep mask is drawn 16 bits per element, four elements per 64-bit draw of the same generator
  (``torch.manual_seed`` reproduces it), and applied by one fused masked scale; p is rounded to a multiple
  of 2⁻¹⁶ (0.1 → 0.1000061) and the scale 1/(1−p) uses the rounded p, so the expectation stays exact;
  the sampling noise of the kept fraction is larger than that rounding already at a million elements;
- :class:`FastDropout` is an ``nn.Dropout`` that uses it (everything reading ``.p`` keeps working);
- attention dropout goes through an attention function registered with transformers as ``"fedspec"``:
  eager attention with the fast mask while training on CPU with dropout, SDPA everywhere else (eval,
  GPUs, p = 0, and features the eager path does not cover), so inference and GPU training are unchanged.

Off the CPU, both defer to PyTorch (CUDA dropout is a fused Philox kernel already).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

ATTENTION = "fedspec"
MASK_BITS = 16


def _dropped_lanes(p: float) -> int:
    """How many of the 2¹⁶ lane values drop an element: p rounded to a multiple of 2⁻¹⁶, in units of 2⁻¹⁶."""
    return round(p * 2**MASK_BITS)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> tuple[torch.Tensor, float]:
    """A boolean keep mask of ``shape`` with drop probability p rounded to a multiple of 2⁻¹⁶, and that
    rounded p. Drawn from the default CPU generator."""
    numel = 1
    for size in shape:
        numel *= size
    per_word = 64 // MASK_BITS
    words = torch.empty((numel + per_word - 1) // per_word, dtype=torch.int64)
    words.random_(-(2**63), None)  # the full 64-bit range: every 16-bit lane is uniform
    lanes = words.view(torch.int16)[:numel].view(shape)
    dropped = _dropped_lanes(p)
    return lanes >= dropped - 2 ** (MASK_BITS - 1), dropped / 2**MASK_BITS


class _MaskedScale(torch.autograd.Function):
    """x · keep · scale in one pass, saving only the boolean mask (like ``torch.native_dropout``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.ops.aten.native_dropout_backward(x, keep, scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.ops.aten.native_dropout_backward(grad, keep, ctx.scale), None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout`` with the fast mask on CPU; PyTorch's own dropout elsewhere."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, got {p}")
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return nn.functional.dropout(x, p, training)
    if _dropped_lanes(p) == 2**MASK_BITS:  # p rounds to 1: everything is dropped
        return x * 0.0
    keep, rounded_p = keep_mask(x.shape, p)
    return _MaskedScale.apply(x, keep, 1.0 / (1.0 - rounded_p))


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with the fast CPU mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def _is_plain(module: nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> bool:
    """Whether the eager path covers this call (no cache, GQA, position bias, softcap, sinks, weights out)."""
    extras = ("position_bias", "softcap", "s_aux", "sliding_window")
    return (
        query.shape[2] == key.shape[2]
        and getattr(module, "num_key_value_groups", 1) == 1
        and not kwargs.get("output_attentions", False)
        and all(kwargs.get(name) is None for name in extras)
    )


def eager_attention(query, key, value, attention_mask, *, dropout_p: float, scaling: float | None,
                    causal: bool) -> torch.Tensor:
    """softmax(Q·Kᵀ·scale + mask)·V with fast dropout on the probabilities, in (batch, seq, heads, dim) layout
    as transformers' attention functions return it. A bool mask marks the keys to attend to."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query * scale, key.transpose(-2, -1))
    if causal and attention_mask is None:
        length = query.shape[2]
        attention_mask = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(dropout(probs, dropout_p), value).transpose(1, 2).contiguous()


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-function interface: the eager path while training on CPU with dropout,
    transformers' SDPA function otherwise. (``dropout`` is the interface's name for the probability; it
    shadows this module's function only inside this body.)"""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if dropout == 0.0 or query.device.type != "cpu" or not _is_plain(module, query, key, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    # The same causality rule as SDPA's: a decoder without an explicit mask attends causally.
    causal = query.shape[2] > 1 and attention_mask is None and (
        is_causal if is_causal is not None else getattr(module, "is_causal", True))
    output = eager_attention(query, key, value, attention_mask, dropout_p=dropout, scaling=scaling, causal=causal)
    return output, None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the same masks SDPA gets


def use_fast_dropout(model: nn.Module) -> nn.Module:
    """Swap every ``nn.Dropout`` of ``model`` for :class:`FastDropout` and route SDPA attention through
    the ``"fedspec"`` attention function. In place; returns ``model``."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout and not child.inplace:
                setattr(parent, name, FastDropout(child.p))
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == "sdpa" and hasattr(model, "set_attn_implementation"):
        _register_attention()
        model.set_attn_implementation(ATTENTION)
    return model

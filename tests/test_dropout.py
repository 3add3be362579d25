"""Fast CPU dropout: the mask's law, the masked scale and its gradient, and the "fedspec" attention function
computing exactly what SDPA computes (dropout aside) inside real encoder and decoder models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedspec.dropout import ATTENTION, FastDropout, dropout, eager_attention, keep_mask, use_fast_dropout
from fedspec.models import _tiny_encoder, load_encoder


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_drops_with_probability_p(p):
    torch.manual_seed(0)
    keep, rounded_p = keep_mask((1000, 1001), p)  # an odd size: not a whole number of 64-bit draws
    assert keep.shape == (1000, 1001) and keep.dtype == torch.bool
    assert abs(rounded_p - p) <= 2**-17
    n = keep.numel()
    dropped = n - int(keep.sum())
    assert abs(dropped / n - rounded_p) < 5 * math.sqrt(p * (1 - p) / n)  # five binomial standard deviations


def test_keep_mask_lanes_are_independent():
    """Neighbouring elements share a 64-bit draw: their joint law must still factorize."""
    torch.manual_seed(1)
    keep, p = keep_mask((4_000_000,), 0.5)
    lanes = keep.view(-1, 4).float()
    joint = (lanes[:, :-1] * lanes[:, 1:]).mean(0)  # P(both kept) per pair of adjacent lanes
    assert torch.allclose(joint, torch.full_like(joint, (1 - p) ** 2), atol=5 * 0.5 / math.sqrt(1_000_000))


def test_keep_mask_follows_the_torch_seed():
    torch.manual_seed(3)
    first, _ = keep_mask((64, 64), 0.3)
    torch.manual_seed(3)
    again, _ = keep_mask((64, 64), 0.3)
    assert torch.equal(first, again)
    assert not torch.equal(first, keep_mask((64, 64), 0.3)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_scales_kept_entries_and_gradient_follows_the_mask(dtype):
    torch.manual_seed(0)
    x = (torch.rand(32, 50, dtype=dtype) + 1).requires_grad_()  # no zeros: a zero output means dropped
    y = dropout(x, 0.25)
    kept = y != 0
    scale = 1 / (1 - round(0.25 * 2**16) / 2**16)
    assert 0.6 < kept.float().mean() < 0.9
    torch.testing.assert_close(y[kept], (x[kept].float() * scale).to(dtype))
    weights = torch.randn(32, 50, dtype=dtype)
    (y * weights).sum().backward()
    torch.testing.assert_close(x.grad, (weights.float() * kept * scale).to(dtype))


def test_dropout_is_the_identity_in_eval_and_at_p_zero():
    x = torch.randn(8, 8)
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0) is x
    layer = FastDropout(0.5).eval()
    assert torch.equal(layer(x), x)
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    assert torch.equal(dropout(x, 1 - 2**-20), torch.zeros_like(x))  # rounds to p = 1: no division by zero
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout(x, 1.5)


def _qkv(batch=3, heads=2, length=7, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, dim, generator=g) for _ in range(3)]


@pytest.mark.parametrize("mask_kind", ["none", "padding", "causal", "additive"])
def test_eager_attention_matches_sdpa_without_dropout(mask_kind):
    q, k, v = _qkv()
    mask, causal = None, mask_kind == "causal"
    if mask_kind == "padding":
        lengths = torch.tensor([7, 4, 1])
        mask = (torch.arange(7) < lengths[:, None])[:, None, None, :]
    elif mask_kind == "additive":
        mask = torch.randn(3, 1, 7, 7)
    expected = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal).transpose(1, 2)
    got = eager_attention(q, k, v, mask, dropout_p=0.0, scaling=None, causal=causal)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def _with_negligible_dropout(model: nn.Module) -> nn.Module:
    """Every dropout at p = 1e-9: the fast paths run (p > 0) but round p to 0, so training mode must compute
    exactly what evaluation mode computes."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 1e-9
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 1e-9
    return model


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_fedspec_attention_computes_what_sdpa_computes_in_real_models(name):
    fast = _with_negligible_dropout(load_encoder(name, vocab_size=30522, seed=0))
    stock = _tiny_encoder(name, 30522, seed=0).eval()
    assert fast.config._attn_implementation == ATTENTION and stock.config._attn_implementation == "sdpa"
    ids = torch.randint(1000, 2000, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 3:] = 0
    for attention_mask in (mask, torch.ones_like(mask)):
        expected = stock(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        trained = fast.train()(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        evaluated = fast.eval()(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        real = attention_mask.bool()
        torch.testing.assert_close(trained[real], expected[real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(evaluated, expected, rtol=1e-5, atol=1e-5)


def test_loaded_encoders_use_fast_dropout_and_keep_their_rates():
    encoder = load_encoder("tiny-bert", vocab_size=30522)
    dropouts = [m for m in encoder.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(type(m) is FastDropout for m in dropouts)
    assert {m.p for m in dropouts} == {encoder.config.hidden_dropout_prob}


def test_training_mode_dropout_is_active_and_seeded():
    encoder = load_encoder("tiny-bert", vocab_size=30522).train()
    ids = torch.randint(1000, 2000, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    a = encoder(input_ids=ids).last_hidden_state
    torch.manual_seed(5)
    b = encoder(input_ids=ids).last_hidden_state
    c = encoder(input_ids=ids).last_hidden_state
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_use_fast_dropout_leaves_eager_models_on_their_attention():
    model = _tiny_encoder("tiny-bert", 30522, seed=0)
    model.set_attn_implementation("eager")
    use_fast_dropout(model)
    assert model.config._attn_implementation == "eager"
    assert all(type(m) is FastDropout for m in model.modules() if isinstance(m, nn.Dropout))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_training_keeps_pytorch_dropout_and_sdpa():
    encoder = load_encoder("tiny-bert", vocab_size=30522).cuda().train()
    ids = torch.randint(1000, 2000, (4, 16), device="cuda")
    out = encoder(input_ids=ids).last_hidden_state
    assert out.is_cuda and torch.isfinite(out).all()
    x = torch.ones(1000, 1000, device="cuda")
    y = dropout(x, 0.25)
    assert y.is_cuda and abs(float((y == 0).float().mean()) - 0.25) < 0.01


def test_the_packaged_minilm_has_no_pooler_an_adapter_could_target():
    """fedspec pools itself; BERT's own pooler never runs, so an adapter on it would get no gradient under DP."""
    encoder = load_encoder("minilm")
    assert encoder.pooler is None and not any(".pooler." in n or n.startswith("pooler") for n, _ in
                                              encoder.named_parameters())
    assert "pooler" not in " ".join(n for n, _ in encoder.named_modules())

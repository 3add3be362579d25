"""Exact per-sample gradient rules: no adapter method ever sends Opacus to its functorch fallback (which
would differentiate frozen base weights), fedspec's own rules are exact, and ghost clipping takes the same
step as per-sample hooks."""

from __future__ import annotations

import pytest
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fedspec
from fedspec.adapters import METHODS, adapter_layers
from fedspec.adapters.layers import Diagonal
from fedspec.errors import AdapterError, ConfigError
from fedspec.models import tokenize
from fedspec.privacy.grad_samplers import (
    check_exact_rules,
    functorch_fallback_modules,
    linear_norm_sample,
    register_rule,
)
from fedspec.training import DPSettings, train_steps

from helpers import tiny_classifier

TEXTS = ["the team won the cup", "stocks fell sharply", "a new chip was shown", "rain delayed the match"]
LABELS = torch.tensor([0, 1, 2, 0])


def _model(name: str, method: str, train_A: bool):
    model, tokenizer = tiny_classifier(name)
    # Data-driven methods need calibration statistics to initialize; their layer structure (and so their
    # per-sample gradient rules) is the same without. initialize=False leaves the factors at zero, which would make
    # every adapter gradient zero: give them random values, as an initializer would.
    initialize = not METHODS[method].calibration
    fedspec.adapt(model, method, 4, train_A=train_A, initialize=initialize)
    if not initialize:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in adapter_layers(model).values():
                for p in layer.adapter_tensors().values():
                    p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    model.head.requires_grad_(True)
    return model.train(), tokenize(tokenizer, TEXTS, 10)


@pytest.fixture
def no_functorch(monkeypatch):
    """Make Opacus' functorch fallback raise wherever Opacus would reach for it."""
    import opacus.grad_sample.grad_sample_module as gsm
    import opacus.grad_sample.grad_sample_module_fast_gradient_clipping as fgc

    def refuse(*args, **kwargs):
        raise AssertionError("Opacus fell back to functorch per-sample gradients")

    for module in (gsm, fgc):
        for name in ("ft_compute_per_sample_gradient", "prepare_layer"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse)


CASES = [("tiny-bert", mode, train_A) for mode in ("hooks", "ghost") for train_A in (False, True)] + [
    ("tiny-llama", "hooks", False), ("tiny-llama", "ghost", True)]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize(("model_name", "mode", "train_A"), CASES)
def test_no_method_uses_the_functorch_fallback(model_name, mode, train_A, method, no_functorch):
    """Every registered method, both client modes, both clipping modes: exact per-layer rules only, and no
    frozen tensor ever gets a per-sample gradient (or a per-sample norm)."""
    model, batch = _model(model_name, method, train_A)
    assert functorch_fallback_modules(model) == {}
    check_exact_rules(model)
    params = [p for p in model.parameters() if p.requires_grad]
    loader = DataLoader(TensorDataset(batch.input_ids, batch.attention_mask, LABELS), batch_size=len(LABELS))
    hooks, optimizer, *criterion, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=torch.optim.SGD(params, lr=0.1), data_loader=loader, noise_multiplier=0.0,
        max_grad_norm=1.0, poisson_sampling=False, wrap_model=False, grad_sample_mode=mode,
        criterion=nn.CrossEntropyLoss(),
    )
    loss_fn = criterion[0] if criterion else nn.CrossEntropyLoss()
    try:
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.zero_grad()
        loss_fn(model(batch.input_ids, batch.attention_mask), LABELS).backward()
        optimizer.step()
        for name, p in model.named_parameters():
            if p.requires_grad:  # (LoRA's A gets a zero gradient while B = 0, so check the gradient exists)
                assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name} got no gradient"
            else:
                assert torch.equal(p, before[name]), f"frozen {name} changed"
                assert getattr(p, "grad_sample", None) is None, f"per-sample gradient of frozen {name}"
                assert getattr(p, "_norm_sample", None) is None, f"per-sample norm of frozen {name}"
    finally:
        hooks.cleanup()


class BareScaledLinear(nn.Module):
    """What not to write: a frozen weight and a bare trainable vector in one module without a rule."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return (x @ self.weight.T) * self.scale


class ScaledLinear(nn.Module):
    """The same function, laid out for Opacus: a frozen nn.Linear and fedspec's Diagonal (which has rules)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.base = nn.Linear(d, d, bias=False)
        self.base.requires_grad_(False)
        self.scale = Diagonal(d)

    def forward(self, x):
        return self.scale(self.base(x))


def test_bare_parameter_beside_a_frozen_weight_is_refused_with_the_fix():
    model = nn.Sequential(nn.Linear(6, 6), BareScaledLinear(6), nn.Linear(6, 2))
    model[0].requires_grad_(False)
    assert list(functorch_fallback_modules(model)) == ["1"]
    with pytest.raises(AdapterError, match=r"module 1 \(BareScaledLinear\).*frozen weight.*register_rule"):
        check_exact_rules(model)
    fixed = nn.Sequential(nn.Linear(6, 6), ScaledLinear(6), nn.Linear(6, 2))
    assert functorch_fallback_modules(fixed) == {}
    check_exact_rules(fixed)


def test_training_refuses_a_model_that_would_fall_back():
    model, batch = _model("tiny-bert", "lora", True)
    model.head = BareScaledLinear(model.config.hidden_size)
    with pytest.raises(AdapterError, match="BareScaledLinear"):
        train_steps(model, batch, LABELS, steps=1, batch_size=2, dp=DPSettings(1.0, 1.0, seed=0))


def _per_example(model, x, y):
    grads = []
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    return grads


def test_diagonal_scale_rules_are_exact(no_functorch):
    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(5), nn.Flatten(), nn.Linear(15, 3))
    x, y = torch.randn(4, 3, 5), torch.tensor([0, 1, 2, 1])
    expected = _per_example(model, x, y)
    for mode in ("hooks", "ghost"):
        params = [p for p in model.parameters() if p.requires_grad]
        loader = DataLoader(TensorDataset(x, y), batch_size=4)
        hooks, optimizer, *criterion, _ = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=torch.optim.SGD(params, lr=0.0), data_loader=loader, noise_multiplier=0.0,
            max_grad_norm=1e6, poisson_sampling=False, wrap_model=False, grad_sample_mode=mode,
            loss_reduction="sum", criterion=nn.CrossEntropyLoss(reduction="sum"),
        )
        try:
            optimizer.zero_grad()
            loss_fn = criterion[0] if criterion else nn.CrossEntropyLoss(reduction="sum")
            loss_fn(model(x), y).backward()
            scale = model[0].scale.weight
            per_example = torch.stack([g["0.scale.weight"] for g in expected])
            if mode == "hooks":
                torch.testing.assert_close(scale.grad_sample, per_example)
            else:
                torch.testing.assert_close(scale._norm_sample, per_example.norm(dim=1))
        finally:
            hooks.cleanup()


class TwoScales(nn.Module):
    """Two trainable vectors; its (deliberately wrong) rule below forgets the second."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.first = nn.Parameter(torch.ones(d))
        self.second = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.first * self.second


def _forgets_second(layer: TwoScales, activations, backprops):
    return {layer.first: (backprops * activations[0] * layer.second).reshape(len(backprops), -1, layer.first.numel()).sum(1)}


register_rule(TwoScales, _forgets_second)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_rule_that_leaves_out_a_trainable_parameter_is_refused(mode):
    """Opacus clips by the norms its rules return; a parameter left out would be clipped by a stale norm (ghost)
    or not at all, so the step is refused, naming the rule and the parameter."""
    model = nn.Sequential(TwoScales(4), nn.Linear(4, 2))
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 0])
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    hooks, optimizer, *criterion, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader, noise_multiplier=0.0,
        max_grad_norm=1.0, poisson_sampling=False, wrap_model=False, grad_sample_mode=mode,
        criterion=nn.CrossEntropyLoss(),
    )
    loss_fn = criterion[0] if criterion else nn.CrossEntropyLoss()
    try:
        with pytest.raises(AdapterError, match=r"_forgets_second of TwoScales returned nothing for its trainable second"):
            loss_fn(model(x), y).backward()
    finally:
        hooks.cleanup()


@pytest.mark.parametrize(("steps", "d_in", "d_out"), [(3, 16, 4), (3, 4, 16), (40, 8, 4), (2, 32, 32)])
def test_linear_norm_sampler_is_exact_in_both_regimes(steps, d_in, d_out):
    """Materialized (rank-r factor) and ghost (long sequences) branches both equal the per-example norms."""
    torch.manual_seed(1)
    layer = nn.Linear(d_in, d_out)
    a, g = torch.randn(5, steps, d_in), torch.randn(5, steps, d_out)
    norms = linear_norm_sample(layer, [a], g)
    weight_grads = torch.einsum("nti,ntj->nij", g, a)
    torch.testing.assert_close(norms[layer.weight], weight_grads.flatten(1).norm(dim=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norms[layer.bias], g.sum(1).norm(dim=1), rtol=1e-5, atol=1e-5)
    flat = linear_norm_sample(layer, [a[:, 0]], g[:, 0])
    torch.testing.assert_close(flat[layer.weight], torch.einsum("ni,nj->nij", g[:, 0], a[:, 0]).flatten(1).norm(dim=1))


def test_ghost_clipping_takes_the_same_step_as_hooks():
    """σ = 0 and the same Poisson batches: per-sample clipping by norms (ghost) equals clipping of stored
    per-sample gradients (hooks)."""
    results = {}
    for mode in ("hooks", "ghost"):
        model, batch = _model("tiny-bert", "pissa", False)
        data, labels = tokenize(tiny_classifier()[1], TEXTS * 4, 10), LABELS.repeat(4)
        result = train_steps(model, data, labels, steps=3, batch_size=8, optimizer="sgd", lr=0.5,
                             dp=DPSettings(0.0, 0.05, grad_sample_mode=mode, seed=4))
        assert result.steps == 3
        results[mode] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, value in results["hooks"].items():
        torch.testing.assert_close(results["ghost"][name], value, rtol=1e-4, atol=1e-6)


def test_ghost_clipping_counts_empty_poisson_batches():
    model, batch = _model("tiny-bert", "lora", True)
    before = model.head.weight.detach().clone()
    result = train_steps(model, tokenize(tiny_classifier()[1], TEXTS[:2], 10),
                         LABELS[:2], steps=12, batch_size=1, lr=1e-2,
                         dp=DPSettings(1.0, 1.0, grad_sample_mode="ghost", seed=3))
    assert result.steps == 12 and result.examples < 24
    assert not torch.equal(model.head.weight, before)


def test_grad_sample_mode_is_validated(tiny_cfg):
    assert tiny_cfg().privacy.grad_sample_mode == "hooks"
    assert tiny_cfg("privacy.grad_sample_mode=ghost").privacy.grad_sample_mode == "ghost"
    with pytest.raises(ConfigError, match=r"privacy.grad_sample_mode='flash' is not allowed; choose one of: hooks, ghost"):
        tiny_cfg("privacy.grad_sample_mode=flash")

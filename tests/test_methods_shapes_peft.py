"""Agreement with HF PEFT where it implements the method (KaSA, DoRA, AdaLoRA): the same starting adapted weight,
and the same function and merged weight for the same trained tensors. PEFT is a test dependency only."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fedspec
from fedspec.adapters import HookContext, adapter_layers, training_hooks

peft = pytest.importorskip("peft")


class _Block(nn.Module):
    def __init__(self, out_features: int = 24, in_features: int = 16) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _pair(config, method: str, rank: int = 4, **options):
    torch.manual_seed(0)
    block = _Block()
    ours = copy.deepcopy(block)
    theirs = peft.get_peft_model(block, config)
    fedspec.adapt(ours, method, rank, ["proj"], **options)
    return ours, theirs, adapter_layers(ours)["proj"], theirs.base_model.model.proj


X = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(1))


def test_kasa_truncates_the_base_like_peft_and_computes_the_same_function_and_loss():
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["proj"],
                             kasa_config=peft.KasaConfig(beta=1e-4, gamma=1e-3))
    ours, theirs, layer, peft_layer = _pair(config, "kasa")
    assert torch.allclose(layer.base.weight, peft_layer.base_layer.weight, atol=1e-5)  # W_world
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_(0, 0.1)
        layer.lora_A.weight.copy_(peft_layer.lora_A["default"].weight)
        layer.lora_B.weight.copy_(peft_layer.lora_B["default"].weight)
        layer.core.weight.copy_(peft_layer.lora_diag["default"])
    assert torch.allclose(ours(X), theirs(X), atol=1e-5)
    (penalty,) = training_hooks(ours, HookContext(lr=0.1, total_steps=1))
    expected = float(theirs.base_model._get_kasa_loss().detach())
    assert float(penalty.penalty(ours).detach()) == pytest.approx(expected, rel=1e-5)


def test_dora_matches_peft_forward_and_merged_weight():
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], use_dora=True)
    ours, theirs, layer, peft_layer = _pair(config, "dora", alpha=8.0)
    magnitude = peft_layer.lora_magnitude_vector["default"].weight
    assert torch.allclose(layer.magnitude.weight, magnitude, atol=1e-6)  # both start at ‖W‖_row
    assert torch.allclose(ours(X), theirs(X), atol=1e-5)
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_(0, 0.1)
        magnitude.mul_(1.1)
        layer.lora_A.weight.copy_(peft_layer.lora_A["default"].weight)
        layer.lora_B.weight.copy_(peft_layer.lora_B["default"].weight)
        layer.magnitude.weight.copy_(magnitude)
    assert torch.allclose(ours(X), theirs(X), atol=1e-5)
    merged = theirs.merge_and_unload().proj.weight
    assert torch.allclose(layer.to_linear().weight, merged, atol=1e-5)


def test_adalora_matches_peft_forward_for_the_same_triplets():
    config = peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=4, total_step=10, target_modules=["proj"])
    ours, theirs, layer, peft_layer = _pair(config, "adalora", target_rank=2)
    assert torch.allclose(ours(X), theirs(X), atol=1e-6)  # both start at W (λ = 0)
    with torch.no_grad():
        peft_layer.lora_E["default"].normal_(0, 1.0)
        layer.lora_A.weight.copy_(peft_layer.lora_A["default"])
        layer.lora_B.weight.copy_(peft_layer.lora_B["default"])
        layer.core.weight.copy_(peft_layer.lora_E["default"].view(-1))
    # PEFT scales by α/(r + 1e-5); fedspec by α/r.
    assert torch.allclose(ours(X), theirs(X), rtol=1e-4, atol=1e-6)

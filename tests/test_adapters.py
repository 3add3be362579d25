"""Low-rank additive adapters: initial function, factors, merge, save/load, targets and errors."""

from __future__ import annotations

import pytest
import torch

import fedspec
from fedspec.adapters import (
    METHODS,
    adapter_layers,
    adapter_state,
    load_adapter,
    load_adapter_state,
    merge_in_place,
    save_adapter,
    unmerge,
)
from fedspec.errors import AdapterError
from fedspec.models import tokenize

from helpers import outputs, perturb, tiny_classifier

TEXTS = ["the team won the cup final", "stocks fell sharply after the report", "a new chip was unveiled"]


def _outputs(model, tokenizer) -> torch.Tensor:
    return outputs(model, tokenize(tokenizer, TEXTS, 16))


def test_registry_lists_the_low_rank_methods():
    assert {"lora", "pissa", "milora"} <= set(METHODS)


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
@pytest.mark.parametrize("method", ["lora", "pissa", "milora"])
def test_adapted_model_equals_base_at_initialization(name, method):
    model, tokenizer = tiny_classifier(name)
    before = _outputs(model, tokenizer)
    fedspec.adapt(model, method, 4, svd_method="exact")
    assert torch.allclose(_outputs(model, tokenizer), before, atol=1e-5)


def _original_weight(layer) -> torch.Tensor:
    return layer.base.weight + layer.scaling * layer.init_lora_B @ layer.init_lora_A


@pytest.mark.parametrize(("method", "smallest"), [("pissa", False), ("milora", True)])
def test_residual_methods_start_from_the_top_or_bottom_singular_triplets(method, smallest):
    model, _ = tiny_classifier()
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(("query", "value"))}
    fedspec.adapt(model, method, 4, alpha=8.0, svd_method="exact")
    for name, layer in adapter_layers(model).items():
        W = originals[name].double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        part = slice(-4, None) if smallest else slice(0, 4)
        expected = U[:, part] @ torch.diag(S[part]) @ Vh[part]
        got = layer.scaling * layer.lora_B.weight.double() @ layer.lora_A.weight.double()
        assert torch.allclose(got, expected, atol=1e-5)
        assert torch.allclose(_original_weight(layer).double(), W, atol=1e-5)


# Subspace iteration needs more iterations than block Krylov on these random (flat-spectrum) weights.
@pytest.mark.parametrize(("method", "niter"), [("randomized", 8), ("subspace", 30)])
def test_pissa_randomized_matches_exact_on_the_product(method, niter):
    exact, _ = tiny_classifier()
    randomized, _ = tiny_classifier()
    fedspec.adapt(exact, "pissa", 4, svd_method="exact")
    fedspec.adapt(randomized, "pissa", 4, svd_method=method, niter=niter, oversample=8)
    for (name, a), (_, b) in zip(adapter_layers(exact).items(), adapter_layers(randomized).items()):
        prod_a, prod_b = a.lora_B.weight @ a.lora_A.weight, b.lora_B.weight @ b.lora_A.weight
        assert torch.linalg.norm(prod_a - prod_b) / torch.linalg.norm(prod_a) < 1e-3, name


def test_pissa_stacks_weights_in_the_pass_dtype_without_changing_the_result():
    """With bf16 passes `adapt` stacks each group's weights straight into bf16 (no float32 stack first); the
    factors equal those of the initializer run on the float32 stack, whose passes read the same bf16 values."""
    from fedspec.adapters.methods.pissa import initialize as pissa

    model, _ = tiny_classifier()
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(("query", "value"))}
    options = {"niter": 2, "oversample": 2, "pass_precision": "bfloat16"}
    fedspec.adapt(model, "pissa", 4, ["query", "value"], seed=3, **options)
    B, A = pissa(torch.stack(list(originals.values())), 4, 1.0, generator=torch.Generator().manual_seed(3),
                 **options)
    for i, layer in enumerate(adapter_layers(model).values()):
        assert torch.equal(layer.lora_B.weight, B[i]) and torch.equal(layer.lora_A.weight, A[i])


@pytest.mark.parametrize("precision", ["bfloat16", "full"])
def test_pissa_on_a_bf16_model(precision):
    """A bf16 model's weights feed bf16 passes as they are (no float32 copy) and a float32 SVD otherwise; either
    way the base stays bf16, the adapter tensors are float32 and equal the initializer's result exactly, and the
    residual rebuilds W to bf16 precision."""
    from fedspec.adapters.methods.pissa import initialize as pissa

    model, _ = tiny_classifier()
    model.to(torch.bfloat16)
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(("query", "value"))}
    options = {"niter": 2, "oversample": 2, "pass_precision": precision}
    fedspec.adapt(model, "pissa", 4, ["query", "value"], seed=3, **options)
    B, A = pissa(torch.stack(list(originals.values())).float(), 4, 1.0, generator=torch.Generator().manual_seed(3),
                 **options)
    for i, (name, layer) in enumerate(adapter_layers(model).items()):
        assert layer.base.weight.dtype == torch.bfloat16
        assert layer.lora_B.weight.dtype == layer.init_lora_B.dtype == torch.float32
        assert torch.equal(layer.lora_B.weight, B[i]) and torch.equal(layer.lora_A.weight, A[i])
        rebuilt = layer.base.weight.float() + layer.scaling * layer.init_lora_B.float() @ layer.init_lora_A.float()
        W = originals[name].float()
        assert torch.linalg.norm(rebuilt - W) / torch.linalg.norm(W) < 1e-2


def test_lora_starts_with_zero_B_and_gaussian_A():
    model, _ = tiny_classifier()
    fedspec.adapt(model, "lora", 4)
    for layer in adapter_layers(model).values():
        assert torch.count_nonzero(layer.lora_B.weight) == 0
        assert layer.lora_A.weight.std() > 0


def test_trainable_mask_and_frozen_A_mode():
    model, _ = tiny_classifier()
    fedspec.adapt(model, "pissa", 4, train_A=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("lora_B.weight") for n in trainable)
    assert not any(b.requires_grad for n, b in model.named_parameters() if "init_lora" in n or "base" in n)


def test_merge_and_unmerge_preserve_the_function():
    model, tokenizer = tiny_classifier()
    fedspec.adapt(model, "pissa", 4)
    perturb(model)
    adapted = _outputs(model, tokenizer)
    merge_in_place(model)
    assert torch.allclose(_outputs(model, tokenizer), adapted, atol=1e-5)
    unmerge(model)
    assert torch.allclose(_outputs(model, tokenizer), adapted, atol=1e-5)
    fedspec.merge(model)
    assert not adapter_layers(model)
    assert torch.allclose(_outputs(model, tokenizer), adapted, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_save_load_round_trip_on_a_fresh_base_model(tmp_path, method):
    model, tokenizer = tiny_classifier()
    fedspec.adapt(model, method, 4)
    model.head.requires_grad_(True)
    perturb(model)
    expected = _outputs(model, tokenizer)
    save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    fresh, _ = tiny_classifier()
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(_outputs(fresh, tokenizer), expected)


def test_loading_new_init_factors_rebuilds_the_residual_from_the_original_weight():
    source, tokenizer = tiny_classifier()
    fedspec.adapt(source, "pissa", 4, svd_method="exact")
    perturb(source)
    target, _ = tiny_classifier()
    fedspec.adapt(target, "pissa", 4, initialize=False)  # base untouched, factors zero
    load_adapter_state(target, adapter_state(source))
    assert torch.allclose(_outputs(target, tokenizer), _outputs(source, tokenizer), atol=1e-5)


def test_uninitialized_adapter_starts_at_zero_with_the_base_untouched():
    model, tokenizer = tiny_classifier()
    before = _outputs(model, tokenizer)
    fedspec.adapt(model, "pissa", 4, initialize=False)
    for layer in adapter_layers(model).values():
        assert not layer.lora_A.weight.any() and not layer.lora_B.weight.any()
    assert torch.equal(_outputs(model, tokenizer), before)


def test_zero_factor_is_an_ordinary_linear():
    """zero_factor skips nn.Linear's initializer; everything else must be what nn.Linear builds."""
    from torch import nn

    from fedspec.adapters.layers import zero_factor

    factor, reference = zero_factor(6, 3, {"dtype": torch.float64, "device": "cpu"}), nn.Linear(6, 3, bias=False)
    assert type(factor) is nn.Linear and not factor.weight.any()
    assert factor.weight.dtype == torch.float64 and factor.weight.requires_grad
    assert repr(factor) == repr(reference) and factor.state_dict().keys() == reference.state_dict().keys()
    assert vars(factor).keys() == vars(reference).keys()
    x = torch.randn(2, 6, dtype=torch.float64)
    reference.to(torch.float64).weight.data.copy_(torch.randn(3, 6))
    factor.weight.data.copy_(reference.weight)
    assert torch.equal(factor(x), reference(x))


def test_unknown_method_is_a_clear_error():
    model, _ = tiny_classifier()
    with pytest.raises(AdapterError, match="adapter.method='nope' is not a registered method; choose one of: .*pissa"):
        fedspec.adapt(model, "nope", 4)


def test_rank_larger_than_the_layer_is_a_clear_error():
    model, _ = tiny_classifier()
    with pytest.raises(AdapterError, match=r"adapter.rank=64 is larger than layer .* choose adapter.rank <= 32"):
        fedspec.adapt(model, "pissa", 64)


def test_target_matching_nothing_is_a_clear_error():
    model, _ = tiny_classifier()
    with pytest.raises(AdapterError, match="pattern 'q_proj' matches no nn.Linear layer"):
        fedspec.adapt(model, "lora", 4, ["q_proj"])


def test_the_classification_head_is_never_an_adapter_target(tmp_path):
    """`.*` (every linear layer) adapted the head too: the classifier's forward then failed ('LowRankLinear' object
    has no attribute 'weight'), and the PEFT export could not address it. It trains in full instead."""
    model, tokenizer = tiny_classifier()
    fedspec.adapt(model, "lora", 2, [".*"])
    assert "head" not in adapter_layers(model) and len(adapter_layers(model)) > 0
    model.eval()
    batch = tokenize(tokenizer, ["a text"], 8)
    with torch.no_grad():
        assert model(batch.input_ids, batch.attention_mask).shape == (1, 3)
    fedspec.adapters.export_peft(model, tmp_path / "peft")
    with pytest.raises(AdapterError, match="pattern 'head' matches only the classification head"):
        fedspec.adapt(tiny_classifier()[0], "lora", 2, ["head"])


def test_targets_by_suffix_and_by_regex():
    model, _ = tiny_classifier()
    fedspec.adapt(model, "lora", 2, ["key", r".*layer\.1\..*intermediate\.dense"])
    names = set(adapter_layers(model))
    assert len([n for n in names if n.endswith("key")]) == 2
    assert names - {n for n in names if n.endswith("key")} == {"encoder.encoder.layer.1.intermediate.dense"}


def test_llama_default_targets_are_q_and_v_projections():
    model, _ = tiny_classifier("tiny-llama")
    fedspec.adapt(model, "pissa", 4)
    assert {n.rsplit(".", 1)[-1] for n in adapter_layers(model)} == {"q_proj", "v_proj"}

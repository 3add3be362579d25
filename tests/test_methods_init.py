"""OLoRA, SoMA, CorDA, EVA, LoRA-GA (low-rank additive) and FWSVD (compression): their formulas, the initial
function, merge, save/load, exact per-sample gradients under Opacus, SoMA's schedule, the federated rules,
and `fedspec train` for each."""

from __future__ import annotations

import pytest
import torch

import fedspec
from fedspec.adapters import (
    METHODS,
    Calibration,
    FactorizedLinear,
    HookContext,
    adapter_config,
    adapter_layers,
    adapter_state,
    collect_calibration,
    load_adapter,
    merge_in_place,
    save_adapter,
    training_hooks,
    unmerge,
)
from fedspec.adapters.methods.eva import activation_pca
from fedspec.adapters.methods.eva import ranks as eva_ranks
from fedspec.adapters.methods.soma import AnnealedWeightDecay
from fedspec.adapters.state import INIT_KEYS
from fedspec.adapters.targets import match_targets
from fedspec.errors import AdapterError
from fedspec.models import build_classifier, tokenize
from fedspec.strategies import aggregate, client_update, get_rule
from fedspec.training import DPSettings, train_steps

from helpers import assert_opacus_matches_per_example_loop, outputs, perturb, tiny_classifier

TEXTS = [
    "the team won the cup final", "stocks fell sharply after the report", "a new chip was unveiled today",
    "rain delayed the match", "the bank raised its rates", "scientists found water on the moon",
]
LABELS = torch.tensor([0, 1, 2, 0, 1, 2])
NEW_METHODS = ["olora", "soma", "corda", "eva", "lora_ga", "fwsvd"]


def _batch(tokenizer):
    return tokenize(tokenizer, TEXTS, 16)


def _calibration(model, batch, method, targets=("query", "value")) -> Calibration | None:
    kinds = METHODS[method].calibration
    if not kinds:
        return None
    layers = match_targets(model, list(targets))
    return collect_calibration(model, [(batch.input_ids, batch.attention_mask, LABELS)], layers, kinds)


def _adapted(method: str, rank: int = 4, name: str = "tiny-bert", **options):
    model, tokenizer = tiny_classifier(name)
    batch = _batch(tokenizer)
    calibration = _calibration(model, batch, method)
    fedspec.adapt(model, method, rank, calibration=calibration, **{"svd_method": "exact", **options})
    return model, batch


def _originals(model, targets=("query", "value")) -> dict[str, torch.Tensor]:
    return {n: model.get_submodule(n).weight.detach().double().clone() for n in match_targets(model, list(targets))}


def _ranks(model) -> dict[str, int]:
    return {name: layer.rank for name, layer in adapter_layers(model).items()}


def _product(layer) -> torch.Tensor:
    return layer.scaling * layer.lora_B.weight.double() @ layer.lora_A.weight.double()


# --- the initial function ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
@pytest.mark.parametrize("method", ["olora", "soma", "corda", "eva", "lora_ga"])
def test_adapted_model_equals_the_base_at_initialization(name, method):
    model, tokenizer = tiny_classifier(name)
    batch = _batch(tokenizer)
    before = outputs(model, batch)
    targets = ("q_proj", "v_proj") if name == "tiny-llama" else ("query", "value")
    calibration = _calibration(model, batch, method, targets)
    fedspec.adapt(model, method, 4, calibration=calibration, svd_method="exact")
    assert torch.allclose(outputs(model, batch), before, atol=1e-5)


def test_fwsvd_at_full_rank_is_the_layer_and_at_low_rank_minimizes_the_fisher_weighted_error():
    model, tokenizer = tiny_classifier()
    batch = _batch(tokenizer)
    before = outputs(model, batch)
    originals = _originals(model)
    calibration = _calibration(model, batch, "fwsvd")
    full, _ = tiny_classifier()
    fedspec.adapt(full, "fwsvd", 32, calibration=calibration)
    assert torch.allclose(outputs(full, batch), before, atol=1e-4)
    assert all(isinstance(layer, FactorizedLinear) for layer in adapter_layers(full).values())

    fedspec.adapt(model, "fwsvd", 4, calibration=calibration)
    for name, layer in adapter_layers(model).items():
        W = originals[name]
        assert not hasattr(layer, "base")  # the dense weight is gone
        importance = calibration.mean(name, "fisher").sqrt().unsqueeze(-1)
        weighted = torch.linalg.matrix_norm(importance * (W - _product(layer)))
        U, S, Vh = torch.linalg.svd(W)
        plain = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
        assert weighted <= torch.linalg.matrix_norm(importance * (W - plain)) + 1e-9
        # and it equals the optimum: the truncated SVD of Î·W, mapped back
        U, S, Vh = torch.linalg.svd(importance * W)
        optimum = (U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]) / importance
        assert torch.allclose(_product(layer), optimum, atol=1e-5)


# --- the formulas --------------------------------------------------------------------------------------------


def test_olora_is_the_first_r_columns_and_rows_of_the_qr_decomposition():
    model, _ = tiny_classifier()
    originals = _originals(model)
    fedspec.adapt(model, "olora", 4, alpha=8.0)
    for name, layer in adapter_layers(model).items():
        W = originals[name]
        Q, R = torch.linalg.qr(W)
        B = layer.lora_B.weight.double()
        assert torch.allclose(B.T @ B, torch.eye(4, dtype=torch.float64), atol=1e-5)  # orthonormal columns
        assert torch.allclose(B @ layer.lora_A.weight.double(), Q[:, :4] @ R[:4], atol=1e-5)
        original = layer.base.weight.double() + layer.scaling * layer.init_lora_B.double() @ layer.init_lora_A.double()
        assert torch.allclose(original, W, atol=1e-5)


def test_soma_starts_from_the_minor_singular_triplets():
    model, _ = tiny_classifier()
    originals = _originals(model)
    fedspec.adapt(model, "soma", 4, alpha=8.0)
    for name, layer in adapter_layers(model).items():
        U, S, Vh = torch.linalg.svd(originals[name])
        assert torch.allclose(_product(layer), U[:, -4:] @ torch.diag(S[-4:]) @ Vh[-4:], atol=1e-5)


def _damped(C: torch.Tensor) -> torch.Tensor:
    return C + torch.eye(len(C), dtype=C.dtype) * C.diagonal().mean() * 0.01


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_takes_the_top_or_bottom_components_of_svd_of_w_times_c(mode):
    model, tokenizer = tiny_classifier()
    batch = _batch(tokenizer)
    originals = _originals(model)
    calibration = _calibration(model, batch, "corda")
    fedspec.adapt(model, "corda", 4, alpha=8.0, calibration=calibration, mode=mode)
    for name, layer in adapter_layers(model).items():
        C = _damped(calibration.mean(name, "xx"))
        U, S, Vh = torch.linalg.svd(originals[name] @ C)
        part = slice(0, 4) if mode == "ipm" else slice(-4, None)
        expected = U[:, part] @ torch.diag(S[part]) @ (Vh @ torch.linalg.inv(C))[part]
        assert torch.allclose(_product(layer), expected, atol=1e-5)


def test_corda_ipm_and_kpm_split_the_weight_exactly():
    """IPM's top-r and KPM's bottom-(k−r) parts of W = U·Σ·(Vᵀ·C⁻¹) add up to W."""
    model, tokenizer = tiny_classifier()
    batch = _batch(tokenizer)
    originals = _originals(model)
    calibration = _calibration(model, batch, "corda")
    top, _ = tiny_classifier()
    bottom, _ = tiny_classifier()
    fedspec.adapt(top, "corda", 12, calibration=calibration, mode="ipm")
    fedspec.adapt(bottom, "corda", 20, calibration=calibration, mode="kpm")
    for name in originals:
        total = _product(adapter_layers(top)[name]) + _product(adapter_layers(bottom)[name])
        assert torch.allclose(total, originals[name], atol=1e-5)


def test_eva_takes_the_principal_components_of_the_layer_inputs():
    model, tokenizer = tiny_classifier()
    batch = _batch(tokenizer)
    calibration = _calibration(model, batch, "eva")
    fedspec.adapt(model, "eva", 4, calibration=calibration)
    for name, layer in adapter_layers(model).items():
        assert torch.count_nonzero(layer.lora_B.weight) == 0 and layer.base_policy == "keep"
        xx, x = calibration.mean(name, "xx"), calibration.mean(name, "x")
        values, vectors = torch.linalg.eigh(xx - torch.outer(x, x))
        top = vectors[:, -layer.rank:]
        A = layer.lora_A.weight.double()
        assert torch.allclose(A @ A.T, torch.eye(layer.rank, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(A.T @ A, top @ top.T, atol=1e-4)  # the same subspace (signs are arbitrary)


def _synthetic_inputs(spectra: dict[str, list[float]]) -> Calibration:
    """Input statistics with zero mean and a diagonal covariance of the given spectra."""
    sums = {name: {"xx": torch.diag(torch.tensor(values, dtype=torch.float64)),
                   "x": torch.zeros(len(values), dtype=torch.float64)} for name, values in spectra.items()}
    return Calibration(sums, 1, kinds=("inputs",))


def test_eva_redistributes_the_rank_budget_by_explained_variance():
    # Layer a: two dominant directions; layer b: a flat spectrum. Budget 2 × 2 = 4, at most round(2·2) = 4 each.
    calibration = _synthetic_inputs({"a": [10.0, 10.0, 0.1, 0.1, 0.1, 0.1], "b": [1.0] * 6})
    per_layer = {n: {"xx": calibration.mean(n, "xx"), "x": calibration.mean(n, "x")} for n in ("a", "b")}
    # a's ratios: 10/20.4 ≈ 0.49 twice, then 0.005; b's: 1/6 ≈ 0.167 six times.
    assert eva_ranks(per_layer, 2, rho=2.0) == {"a": 2, "b": 2}
    assert eva_ranks(per_layer, 3, rho=2.0) == {"a": 2, "b": 4}
    assert eva_ranks(per_layer, 2, rho=1.0) == {"a": 2, "b": 2}
    ratios, _ = activation_pca({k: v.unsqueeze(0) for k, v in per_layer["a"].items()})
    assert torch.allclose(ratios.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_eva_layers_get_their_own_ranks_and_a_layer_without_budget_stays_plain():
    model, tokenizer = tiny_classifier()
    spectra = {name: ([50.0] * 6 + [0.01] * 26) if name.endswith("query") else [1.0] * 32
               for name in match_targets(model, ["query", "value"])}
    fedspec.adapt(model, "eva", 2, calibration=_synthetic_inputs(spectra), rho=3.0)
    ranks = {n.rsplit(".", 1)[-1] + n.split(".")[3]: layer.rank for n, layer in adapter_layers(model).items()}
    assert ranks == {"query0": 6, "query1": 2}  # 8 = 2 × 4 layers: 6 + the tie-break for the first layer
    config = adapter_config(model)
    assert config.rank_pattern == {n: layer.rank for n, layer in adapter_layers(model).items()}
    assert type(model.get_submodule("encoder.encoder.layer.0.attention.self.value")) is torch.nn.Linear


def test_lora_ga_follows_peft_arb2r_with_the_stable_scale():
    model, tokenizer = tiny_classifier()
    batch = _batch(tokenizer)
    originals = _originals(model)
    calibration = _calibration(model, batch, "lora_ga")
    fedspec.adapt(model, "lora_ga", 4, alpha=8.0, calibration=calibration, svd_method="exact")
    for name, layer in adapter_layers(model).items():
        G = calibration.mean(name, "grad")
        U, S, Vh = torch.linalg.svd(G)
        m = G.shape[0]
        expected_B = U[:, 4:8] * S[4:8] * (m**0.25 / 16**0.5)
        A, B = layer.lora_A.weight.double(), layer.lora_B.weight.double()
        signs_A = torch.sign((A * Vh[:4]).sum(1))  # singular vectors are defined up to sign
        signs_B = torch.sign((B * expected_B).sum(0))
        assert torch.allclose(A * signs_A.unsqueeze(1), Vh[:4], atol=1e-4)
        assert torch.allclose(B * signs_B, expected_B, atol=1e-4)
        original = layer.base.weight.double() + layer.scaling * layer.init_lora_B.double() @ layer.init_lora_A.double()
        assert torch.allclose(original, originals[name], atol=1e-5)


def test_lora_ga_needs_two_r_directions():
    model, tokenizer = tiny_classifier()
    calibration = _calibration(model, _batch(tokenizer), "lora_ga")
    with pytest.raises(AdapterError, match="2·rank must be at most 32"):
        fedspec.adapt(model, "lora_ga", 20, calibration=calibration)


def test_bad_method_options_are_clear_errors():
    model, tokenizer = tiny_classifier()
    calibration = _calibration(model, _batch(tokenizer), "corda")
    with pytest.raises(AdapterError, match="adapter.options.mode='xpm' is not a CorDA mode; choose one of: ipm, kpm"):
        fedspec.adapt(model, "corda", 4, calibration=calibration, mode="xpm")


# --- merge, save/load ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", NEW_METHODS)
def test_merged_equals_unmerged(method):
    model, batch = _adapted(method)
    perturb(model)
    adapted = outputs(model, batch)
    merge_in_place(model)
    assert torch.allclose(outputs(model, batch), adapted, atol=1e-5)
    unmerge(model)
    assert torch.allclose(outputs(model, batch), adapted, atol=1e-5)
    fedspec.merge(model)
    assert not adapter_layers(model)
    assert torch.allclose(outputs(model, batch), adapted, atol=1e-5)


def test_a_merged_factorized_layer_keeps_the_models_low_precision():
    """FWSVD's layer replaces the weight by float32 factors; merged, it must compute in the model's bfloat16, or the
    next bfloat16 input fails (mat1 and mat2 must have the same dtype)."""
    from torch import nn

    from fedspec.adapters.layers import FactorizedLinear

    layer = FactorizedLinear(nn.Linear(16, 12).bfloat16(), 4, 1.0)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    merged = layer.to_linear()
    assert merged.weight.dtype == torch.bfloat16 and merged(x).dtype == layer(x).dtype == torch.bfloat16


@pytest.mark.parametrize("method", NEW_METHODS)
def test_save_load_round_trip_on_a_fresh_base_model_is_exact(tmp_path, method):
    model, batch = _adapted(method)
    model.head.requires_grad_(True)
    perturb(model)
    expected = outputs(model, batch)
    save_adapter(model, tmp_path / "adapter")
    fresh, _ = tiny_classifier()
    load_adapter(fresh, tmp_path / "adapter")  # no calibration needed: the state holds everything
    assert torch.equal(outputs(fresh, batch), expected)
    assert _ranks(fresh) == _ranks(model)


def test_eva_per_layer_ranks_survive_save_and_load(tmp_path):
    model, tokenizer = tiny_classifier()
    batch = _batch(tokenizer)
    spectra = {name: ([50.0] * 6 + [0.01] * 26) if name.endswith("query") else [1.0] * 32
               for name in match_targets(model, ["query", "value"])}
    fedspec.adapt(model, "eva", 2, calibration=_synthetic_inputs(spectra), rho=3.0)
    perturb(model)
    save_adapter(model, tmp_path / "eva")
    fresh, _ = tiny_classifier()
    load_adapter(fresh, tmp_path / "eva")
    assert torch.equal(outputs(fresh, batch), outputs(model, batch))
    assert _ranks(fresh) == _ranks(model)


# --- DP: exact per-sample gradients, one private step --------------------------------------------------------


@pytest.mark.parametrize(("method", "train_A"), [(m, True) for m in NEW_METHODS] + [("fwsvd", False), ("eva", False)])
def test_per_sample_gradients_match_a_per_example_loop(method, train_A):
    model, batch = _adapted(method, train_A=train_A)
    model.head.requires_grad_(True)
    with torch.no_grad():  # non-zero B (EVA starts at B = 0) so A's gradients are non-trivial
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    model.train()
    assert_opacus_matches_per_example_loop(model, batch, LABELS)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_one_dp_step_changes_exactly_the_trainable_tensors(method):
    model, batch = _adapted(method)
    model.head.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_steps(model, batch, LABELS, steps=1, batch_size=6, lr=1e-2,
                         dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, seed=0))
    assert result.steps == 1
    for name, p in model.named_parameters():
        assert (not torch.equal(p, before[name])) == p.requires_grad, name


# --- SoMA's weight-decay schedule ----------------------------------------------------------------------------


def test_soma_weight_decay_is_cosine_annealed_over_the_run():
    schedule = AnnealedWeightDecay(0.05, 1e-5, total_steps=100, lr=0.1)
    assert schedule.decay(0) == pytest.approx(0.05)
    assert schedule.decay(50) == pytest.approx((0.05 + 1e-5) / 2)
    assert schedule.decay(100) == pytest.approx(1e-5)
    assert schedule.decay(500) == pytest.approx(1e-5)


def test_soma_refuses_a_decay_that_would_zero_or_flip_every_tensor_at_a_dp_sgd_learning_rate():
    """θ ← (1 − lr·λ)·θ with AdamW's λ = 0.05 at the SGD rates DP-SGD uses (16 on SST-2's recipe) shrank every
    trainable tensor by 80 % a step, and above lr 20 flipped its sign each step, without a word."""
    with pytest.raises(AdapterError, match=r"1 − lr·λ = 0 per step \(lr 20, adapter.options.weight_decay=0.05\)"):
        AnnealedWeightDecay(0.05, 1e-5, total_steps=10, lr=20.0)
    AnnealedWeightDecay(0.05, 1e-5, total_steps=10, lr=16.0)  # a strong decay, but still a decay


def test_soma_hook_decays_the_trainable_tensors_at_the_runs_global_step():
    model, _ = tiny_classifier()
    fedspec.adapt(model, "soma", 2)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # The training loop builds the hooks with its lr and the whole run's length, and calls them at global steps.
    (hook,) = training_hooks(model, HookContext(lr=0.5, total_steps=4))
    hook.after_step(model, 2)
    hook.after_step(model, 3)
    schedule = AnnealedWeightDecay(0.05, 1e-5, total_steps=4, lr=0.5)
    factor = (1 - 0.5 * schedule.decay(2)) * (1 - 0.5 * schedule.decay(3))
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p, start[name] * factor, atol=1e-7), name


def test_soma_options_set_the_schedule_ends():
    model, _ = tiny_classifier()
    fedspec.adapt(model, "soma", 2, weight_decay=0.1, weight_decay_end=0.01)
    (hook,) = training_hooks(model, HookContext(lr=0.5, total_steps=4))
    assert (hook.decay(0), hook.decay(4)) == (pytest.approx(0.1), pytest.approx(0.01))


# --- federated rules -----------------------------------------------------------------------------------------


def _global_state(model) -> dict[str, torch.Tensor]:
    """The state a server broadcasts every round (residual init factors travel once, separately)."""
    return {k: v for k, v in adapter_state(model).items() if not k.endswith(INIT_KEYS)}


def _client_states(model, clients: int, rule) -> list[dict[str, torch.Tensor]]:
    """What `clients` clients would send after training: perturbed copies of the trained tensors."""
    state = _global_state(model)
    updates = []
    for k in range(clients):
        generator = torch.Generator().manual_seed(10 + k)
        trained = {key: value + 0.05 * torch.randn(value.shape, generator=generator) for key, value in state.items()}
        updates.append(client_update(trained, state, rule))
    return updates


@pytest.mark.parametrize("method", NEW_METHODS)
@pytest.mark.parametrize("strategy", ["fedsvd", "ffa"])
def test_exact_rules_give_the_average_of_the_clients_adapted_weights(method, strategy):
    """FedSVD / FFA-LoRA: clients train B (A frozen), so each layer's s·B·A is linear in what they train and the
    server's aggregate equals the example-weighted average of the clients' adapted weights — for the residual
    methods, EVA's per-layer ranks, and FWSVD's factors (which are the whole layer) alike."""
    rule = get_rule(strategy)
    model, _ = _adapted(method, train_A=False)
    state = _global_state(model)
    updates = _client_states(model, 3, rule)
    weights = [10.0, 30.0, 60.0]
    new = aggregate(rule, state, updates, weights)
    for name, layer in adapter_layers(model).items():
        A = state[f"{name}.lora_A.weight"].double()
        clients = [(state[f"{name}.lora_B.weight"].double() + u[f"{name}.lora_B.weight"].double()) @ A for u in updates]
        expected = sum(w * c for w, c in zip(weights, clients)) / sum(weights)
        got = new[f"{name}.lora_B.weight"].double() @ new[f"{name}.lora_A.weight"].double()
        assert torch.allclose(got, expected, atol=1e-5), name
        if strategy == "fedsvd":  # re-factorized: A has orthonormal rows
            A_new = new[f"{name}.lora_A.weight"].double()
            assert torch.allclose(A_new @ A_new.T, torch.eye(layer.rank, dtype=torch.float64), atol=1e-5)


def test_fedsvd_re_factorizes_layers_of_different_ranks_exactly():
    model, tokenizer = tiny_classifier()
    spectra = {name: ([50.0] * 6 + [0.01] * 26) if name.endswith("query") else [1.0] * 32
               for name in match_targets(model, ["query", "value"])}
    fedspec.adapt(model, "eva", 2, calibration=_synthetic_inputs(spectra), rho=3.0, train_A=False)
    rule = get_rule("fedsvd")
    state = _global_state(model)
    updates = _client_states(model, 2, rule)
    new = aggregate(rule, state, updates, [1.0, 3.0])
    for name, layer in adapter_layers(model).items():
        A = state[f"{name}.lora_A.weight"].double()
        mean_B = state[f"{name}.lora_B.weight"].double() + (updates[0][f"{name}.lora_B.weight"].double()
                                                            + 3 * updates[1][f"{name}.lora_B.weight"].double()) / 4
        got = new[f"{name}.lora_B.weight"].double() @ new[f"{name}.lora_A.weight"].double()
        assert new[f"{name}.lora_A.weight"].shape[0] == layer.rank
        assert torch.allclose(got, mean_B @ A, atol=1e-5), name


@pytest.mark.parametrize("method", ["corda", "fwsvd"])
def test_fedit_averages_factors_and_is_not_exact_for_products(method):
    """FedIT (clients train A and B, the server averages each) is an approximation: mean(B)·mean(A) differs
    from the clients' average product by the covariance of their updates."""
    rule = get_rule("fedit")
    model, _ = _adapted(method)
    state = _global_state(model)
    updates = _client_states(model, 3, rule)
    new = aggregate(rule, state, updates, [1.0, 1.0, 1.0])
    name = next(iter(adapter_layers(model)))
    B, A = state[f"{name}.lora_B.weight"].double(), state[f"{name}.lora_A.weight"].double()
    average = sum((B + u[f"{name}.lora_B.weight"]) @ (A + u[f"{name}.lora_A.weight"]) for u in updates) / 3
    got = new[f"{name}.lora_B.weight"].double() @ new[f"{name}.lora_A.weight"].double()
    assert not torch.allclose(got, average, atol=1e-6)


def test_every_new_method_uses_the_low_rank_federated_rules():
    for method in NEW_METHODS:
        assert METHODS[method].federated == "lowrank"


# --- fedspec train runs each ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [pytest.param("olora", marks=pytest.mark.slow), *NEW_METHODS[1:]])
def test_fedspec_train_runs_each_method(tiny_cfg, method):
    from fedspec.centralized import train_centralized
    from fedspec.rundir import MetricsLog

    cfg = tiny_cfg(f"adapter={method}", f"run.name=train-{method}", "adapter.calibration_examples=32",
                   "adapter.rank=4", "privacy.noise_multiplier=1.0", "data.num_examples=80", "data.eval_examples=16",
                   "train.batch_size=32")  # later overrides win: 80 records, 2 DP steps
    result = train_centralized(cfg)
    assert len(result.rows) == 2
    init = [r for r in MetricsLog(result.paths.metrics).read() if r["kind"] == "init"][0]
    assert init["calibration_examples"] == (32 if METHODS[method].calibration else 0)
    loaded, _ = build_classifier(cfg.model, 4, seed=cfg.run.seed)  # the generated topics task has 4 classes
    load_adapter(loaded, result.paths.adapter)
    assert adapter_config(loaded).method == method
    assert (result.paths.adapter_peft / "adapter_config.json").is_file() == (method != "fwsvd")

"""Methods of shapes 2–4 and DoRA: initialization, merge, save/load, exact per-sample gradients, one DP step,
tensor roles and the federated rule of each."""

from __future__ import annotations

import pytest
import torch
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModule
from opacus.utils.module_utils import trainable_modules
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fedspec
from fedspec.adapters import (
    METHODS,
    adapter_layers,
    adapter_roles,
    adapter_state,
    load_adapter,
    load_adapter_state,
    merge_in_place,
    save_adapter,
    unmerge,
)
from fedspec.config import check_federated, compose_config
from fedspec.models import tokenize
from fedspec.strategies import aggregate, client_update, get_rule
from fedspec.training import DPSettings, train_steps

from helpers import (
    assert_opacus_matches_per_example_loop,
    outputs,
    per_example_grads,
    perturb,
    tiny_classifier,
)

SHAPE_METHODS = ["sorsa", "kasa", "adalora", "sora", "lora_xs", "effort", "svfit", "clip_svd", "salt", "loldu",
                 "sst", "dora"]
# LoRA-XS starts at W + U_rΣ_r·R·V_rᵀ with R ~ N(0, 1e-10): close to, not equal to, the base; KaSA starts at the
# truncated W_world (tested separately).
STARTS_AT_BASE = [m for m in SHAPE_METHODS if m not in ("kasa", "lora_xs")]
LINEAR = ["lora_xs", "svfit", "clip_svd", "loldu"]
NONLINEAR = ["sorsa", "kasa", "adalora", "sora", "effort", "salt", "sst", "dora"]
SMOOTH_NONLINEAR = [m for m in NONLINEAR if m != "salt"]
TEXTS = ["the team won the cup final", "stocks fell sharply after the report", "a new chip was unveiled today",
         "rain delayed the match", "the bank raised its rates", "scientists found water on the moon"]
LABELS = torch.tensor([0, 1, 2, 0, 1, 2])


def _adapted(method: str, name: str = "tiny-bert", rank: int = 4, **options):
    model, tokenizer = tiny_classifier(name)
    fedspec.adapt(model, method, rank, svd_method="exact", **options)
    return model, tokenizer


def _outputs(model, tokenizer, texts=TEXTS) -> torch.Tensor:
    return outputs(model, tokenize(tokenizer, texts, 16))


def _original_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if n.endswith(("query", "value", "q_proj", "v_proj")) and isinstance(m, torch.nn.Linear)}


def test_every_method_is_registered_with_its_federated_rule_and_a_config():
    for name in SHAPE_METHODS:
        spec = METHODS[name]
        assert spec.federated == ("linear" if name in LINEAR else "nonlinear"), name
        cfg = compose_config([f"adapter={name}"])
        assert cfg.adapter.method == name
        # The YAML lists every option of the method with the Python default (the paper's).
        assert dict(cfg.adapter.options) == spec.options, name


# --- initialization ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
@pytest.mark.parametrize("method", STARTS_AT_BASE)
def test_adapted_model_equals_base_at_initialization(name, method):
    model, tokenizer = tiny_classifier(name)
    before = _outputs(model, tokenizer)
    fedspec.adapt(model, method, 4, svd_method="exact")
    assert torch.allclose(_outputs(model, tokenizer), before, atol=1e-5), method


def test_lora_xs_starts_within_its_init_noise_of_the_base():
    model, tokenizer = tiny_classifier()
    before = _outputs(model, tokenizer)
    fedspec.adapt(model, "lora_xs", 4, svd_method="exact")
    assert (_outputs(model, tokenizer) - before).abs().max() < 1e-4
    for layer in adapter_layers(model).values():
        assert layer.core.weight.std() < 1e-4


def test_kasa_starts_from_w_minus_its_minor_components():
    model, _ = tiny_classifier()
    originals = _original_weights(model)
    fedspec.adapt(model, "kasa", 4)
    for name, layer in adapter_layers(model).items():
        U, S, Vh = torch.linalg.svd(originals[name].double(), full_matrices=False)
        world = (U[:, :-4] * S[:-4]) @ Vh[:-4]
        assert torch.allclose(layer.base.weight.double(), world, atol=1e-5)
        assert torch.count_nonzero(layer.lora_B.weight) == 0  # ΔW = 0: the layer is W_world
        assert torch.allclose(layer.adapted_weight().double(), world, atol=1e-5)
        # The truncation is kept as fixed tensors, so W can be rebuilt: base + removed = W.
        assert torch.allclose((layer.base.weight + layer.removed_weight()).double(), originals[name].double(), atol=1e-5)


@pytest.mark.parametrize(("method", "part"), [("sorsa", "top"), ("effort", "bottom"), ("svfit", "top")])
def test_trained_part_is_the_top_or_bottom_singular_triplets(method, part):
    model, _ = tiny_classifier()
    originals = _original_weights(model)
    fedspec.adapt(model, method, 4)
    for name, layer in adapter_layers(model).items():
        U, S, Vh = torch.linalg.svd(originals[name].double(), full_matrices=False)
        keep = slice(0, 4) if part == "top" else slice(-4, None)
        expected = (U[:, keep] * S[keep]) @ Vh[keep]
        assert torch.allclose(layer.delta_weight().double(), expected, atol=1e-5), name
        assert torch.allclose(layer.adapted_weight().double(), originals[name].double(), atol=1e-5)


def test_spectrum_methods_start_from_the_singular_values():
    model, _ = tiny_classifier()
    originals = _original_weights(model)
    fedspec.adapt(model, "clip_svd", 4)
    for name, layer in adapter_layers(model).items():
        assert torch.allclose(layer.spectrum.weight.double(), torch.linalg.svdvals(originals[name].double()), atol=1e-5)
        assert torch.count_nonzero(layer.base.weight) == 0  # the adapter owns the weight


def test_lora_xs_bases_are_the_top_r_svd_and_frozen():
    model, _ = tiny_classifier()
    originals = _original_weights(model)
    fedspec.adapt(model, "lora_xs", 4, svd_method="exact")
    for name, layer in adapter_layers(model).items():
        U, S, Vh = torch.linalg.svd(originals[name].double(), full_matrices=False)
        assert torch.allclose((layer.lora_B.weight @ layer.lora_A.weight).double(), (U[:, :4] * S[:4]) @ Vh[:4],
                              atol=1e-5)
        assert torch.equal(layer.base.weight, originals[name])  # no residual subtraction
        assert not layer.lora_A.weight.requires_grad and not layer.lora_B.weight.requires_grad
        assert layer.core.weight.requires_grad and layer.core.weight.shape == (4, 4)


def test_loldu_bases_come_from_an_lu_with_pivoting():
    model, _ = tiny_classifier()
    originals = _original_weights(model)
    fedspec.adapt(model, "loldu", 4, alpha=8.0)
    for name, layer in adapter_layers(model).items():
        P, L, U = torch.linalg.lu(originals[name].double())
        leading = P @ L[:, :4] @ U[:4]  # the leading rank-4 part of the LU: P·L_r·D_r·U_r
        assert torch.allclose(layer.delta_weight().double(), 2.0 * leading, atol=1e-5)  # σ·P·L_r·diag(z)·U_r
        assert float(layer.spectrum.scale.detach()) == pytest.approx(2.0)  # σ = α/r
        assert torch.allclose(torch.diagonal(layer.right.weight[:, :4]), torch.ones(4))  # unit upper triangular


def test_loldu_with_a_zero_pivot_keeps_the_layer_finite_and_unchanged():
    """A dead input column gives an exact zero pivot: its basis row stays undivided (z starts at 0 there)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    with torch.no_grad():
        model[0].weight[:, 0] = 0.0
    x = torch.randn(5, 8)
    before = model(x).detach()
    fedspec.adapt(model, "loldu", 2, targets=["0"])
    after = model(x)
    assert torch.isfinite(after).all()
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_sst_samples_r_triplets_and_dora_starts_with_the_row_norms():
    model, _ = tiny_classifier()
    originals = _original_weights(model)
    fedspec.adapt(model, "sst", 4)
    for name, layer in adapter_layers(model).items():
        S = torch.linalg.svdvals(originals[name])
        assert torch.allclose(layer.spectrum.weight.sort(descending=True).values, S, atol=1e-5)
        assert layer.sel_left.weight.shape[1] == 4 and layer.sel_left.weight.requires_grad
        assert not layer.rest_left.weight.requires_grad
    model, _ = tiny_classifier()
    fedspec.adapt(model, "dora", 4)
    for name, layer in adapter_layers(model).items():
        assert torch.allclose(layer.magnitude.weight, originals[name].norm(dim=1), atol=1e-6)


def test_method_options_reach_the_layers_and_bad_ones_fail_early():
    model, _ = tiny_classifier()
    fedspec.adapt(model, "salt", 4, lora_rank=2)
    assert all(layer.spectrum.lora_X.shape == (28, 2) for layer in adapter_layers(model).values())
    with pytest.raises(fedspec.errors.AdapterError, match="adapter.options.lora_rank=30 must be in"):
        fedspec.adapt(tiny_classifier()[0], "salt", 4, lora_rank=30)
    with pytest.raises(fedspec.errors.AdapterError, match="choose adapter.rank < 32"):
        fedspec.adapt(tiny_classifier()[0], "kasa", 32)
    with pytest.raises(fedspec.errors.ConfigError, match="adapter.options.gama.*sorsa has the options: gamma"):
        compose_config(["adapter=sorsa", "+adapter.options.gama=1"])
    cfg = compose_config(["adapter=svfit"])  # `fedspec train` has no strategy to check
    with pytest.raises(fedspec.errors.ConfigError, match="use strategy=fedavg for adapter.method=svfit"):
        check_federated(cfg)  # `fedspec simulate` / the ServerApp do


# --- merge and save/load ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", SHAPE_METHODS)
def test_merged_equals_unmerged_and_merge_gives_plain_linears(method):
    model, tokenizer = _adapted(method)
    perturb(model)
    adapted = _outputs(model, tokenizer)
    merge_in_place(model)
    assert torch.allclose(_outputs(model, tokenizer), adapted, atol=1e-5)
    unmerge(model)
    assert torch.allclose(_outputs(model, tokenizer), adapted, atol=1e-5)
    fedspec.merge(model)
    assert not adapter_layers(model)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith(("query", "value")))
    assert torch.allclose(_outputs(model, tokenizer), adapted, atol=1e-5)


def test_dora_unmerge_restores_the_base_weight_from_the_cached_norm():
    model, _ = _adapted("dora")
    perturb(model)
    layer = next(iter(adapter_layers(model).values()))
    before = layer.base.weight.detach().clone()
    layer.merge()
    assert not torch.allclose(layer.base.weight, before)
    layer.unmerge()
    assert torch.allclose(layer.base.weight, before, atol=1e-6)


@pytest.mark.parametrize("method", SHAPE_METHODS)
def test_save_load_round_trip_on_a_fresh_base_model(tmp_path, method):
    model, tokenizer = _adapted(method)
    model.head.requires_grad_(True)
    perturb(model)
    expected = _outputs(model, tokenizer)
    save_adapter(model, tmp_path / "adapter")
    fresh, _ = tiny_classifier()
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(_outputs(fresh, tokenizer), expected)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in fresh.named_parameters() if p.requires_grad}


def test_loading_new_fixed_tensors_rebuilds_the_base_from_the_original_weight():
    source, tokenizer = _adapted("svfit")
    perturb(source)
    target, _ = tiny_classifier()
    fedspec.adapt(target, "svfit", 4, initialize=False)  # base untouched, bases zero
    load_adapter_state(target, adapter_state(source))
    assert torch.allclose(_outputs(target, tokenizer), _outputs(source, tokenizer), atol=1e-5)
    load_adapter_state(target, adapter_state(source))  # loading the same fixed tensors again changes nothing
    assert torch.allclose(_outputs(target, tokenizer), _outputs(source, tokenizer), atol=1e-5)


# --- DP: exact per-sample gradients, one DP step ----------------------------------------------------------------


def _dp_model(method: str):
    model, tokenizer = _adapted(method)
    model.head.requires_grad_(True)
    perturb(model, 0.1)  # non-zero B etc., so every factor gets a non-trivial gradient
    model.train()
    return model, tokenize(tokenizer, TEXTS, 12)


@pytest.mark.parametrize("method", SHAPE_METHODS)
def test_per_sample_gradients_match_a_per_example_loop_without_functorch(method):
    model, batch = _dp_model(method)
    for name, module in trainable_modules(model):
        assert type(module) in GradSampleModule.GRAD_SAMPLERS, f"{name} ({type(module).__name__}) would use functorch"
    assert_opacus_matches_per_example_loop(model, batch, LABELS)


@pytest.mark.parametrize("method", ["salt", "loldu", "dora", "sst"])
def test_ghost_clipping_norms_match_the_per_example_loop(method):
    model, batch = _dp_model(method)
    expected = per_example_grads(model, batch, LABELS)
    loop_norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in expected.values()))
    params = [p for p in model.parameters() if p.requires_grad]
    loader = DataLoader(TensorDataset(batch.input_ids, batch.attention_mask, LABELS), batch_size=len(LABELS))
    hooks, _, criterion, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=torch.optim.SGD(params, lr=0.0), data_loader=loader, criterion=torch.nn.CrossEntropyLoss(),
        noise_multiplier=0.0, max_grad_norm=1e6, poisson_sampling=False, wrap_model=False, grad_sample_mode="ghost",
    )
    try:
        model.zero_grad(set_to_none=True)
        criterion(model(batch.input_ids, batch.attention_mask), LABELS).backward()
        assert torch.allclose(hooks.per_sample_gradient_norms, loop_norms, rtol=1e-4)
    finally:
        hooks.cleanup()


@pytest.mark.parametrize("method", SHAPE_METHODS)
def test_one_dp_step_changes_only_trainable_tensors(method):
    model, tokenizer = _adapted(method)
    model.head.requires_grad_(True)
    batch = tokenize(tokenizer, TEXTS * 2, 12)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_steps(model, batch, LABELS.repeat(2), steps=1, batch_size=6, lr=1e-2,
                         dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, seed=0))
    assert result.steps == 1
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable, changed - trainable
    assert "head.weight" in changed


# --- roles and the federated rule -------------------------------------------------------------------------------


def test_tensor_roles_say_what_clients_train_what_the_server_owns_and_what_is_sent_once():
    model, _ = tiny_classifier()
    fedspec.adapt(model, "lora_xs", 4, federated=True)
    layer = "encoder.encoder.layer.0.attention.self.query"
    roles = adapter_roles(model)
    assert roles[f"{layer}.core.weight"] == "trained"
    assert roles[f"{layer}.lora_A.weight"] == roles[f"{layer}.lora_B.weight"] == "fixed"
    model, _ = tiny_classifier()
    fedspec.adapt(model, "loldu", 4, federated=True)
    roles = adapter_roles(model)
    assert roles[f"{layer}.spectrum.weight"] == "trained"
    assert roles[f"{layer}.spectrum.scale"] == "server"  # LoLDU's σ stays with the server in a federation
    assert {roles[f"{layer}.{k}"] for k in ("left.weight", "right.weight", "init_spectrum")} == {"fixed"}
    model, _ = tiny_classifier()
    fedspec.adapt(model, "loldu", 4)  # centralized: σ trains
    assert adapter_roles(model)[f"{layer}.spectrum.scale"] == "trained"
    model, _ = tiny_classifier()
    fedspec.adapt(model, "sst", 4, federated=True)
    roles = adapter_roles(model)
    assert roles[f"{layer}.rest_left.weight"] == roles[f"{layer}.rest_right.weight"] == "server"
    assert {roles[f"{layer}.{k}"] for k in ("sel_left.weight", "sel_right.weight", "spectrum.weight")} == {"trained"}
    model, _ = tiny_classifier()
    fedspec.adapt(model, "kasa", 4, federated=True)
    roles = adapter_roles(model)
    assert {roles[f"{layer}.removed_{k}"] for k in "ABS"} == {"fixed"}
    model, _ = tiny_classifier()
    fedspec.adapt(model, "pissa", 4, train_A=False)  # the existing rule, now explicit
    roles = adapter_roles(model)
    assert roles[f"{layer}.lora_A.weight"] == "server" and roles[f"{layer}.lora_B.weight"] == "trained"
    assert roles[f"{layer}.init_lora_A"] == "fixed"


def _federated_round(method: str, scale: float, *, keys: tuple[str, ...] | None = None, clients: int = 3):
    """Clients move their trained tensors by scale·noise; returns (aggregated adapted weights, the weighted average
    of the clients' adapted weights), per layer."""
    model, _ = tiny_classifier()
    fedspec.adapt(model, method, 4, svd_method="exact", federated=True)
    roles = adapter_roles(model)
    trained = {k for k, r in roles.items() if r == "trained" and k.startswith("encoder")
               and (keys is None or k.endswith(keys))}
    global_state = {k: v.clone() for k, v in adapter_state(model).items() if roles[k] != "fixed"}
    generator = torch.Generator().manual_seed(7)
    weights = [1.0, 2.0, 3.0][:clients]
    updates, client_weights = [], []
    for _ in range(clients):
        local = {k: v + scale * torch.randn(v.shape, generator=generator) if k in trained else v.clone()
                 for k, v in global_state.items()}
        load_adapter_state(model, local, strict=False)
        client_weights.append({n: layer.adapted_weight().detach().double() for n, layer in adapter_layers(model).items()})
        updates.append(client_update(local, global_state, get_rule("fedavg"), client_trained=trained))
    new_state = aggregate(get_rule("fedavg"), global_state, updates, weights, client_trained=trained)
    load_adapter_state(model, new_state, strict=False)
    aggregated = {n: layer.adapted_weight().detach().double() for n, layer in adapter_layers(model).items()}
    total = sum(weights)
    averaged = {n: sum(w * cw[n] for w, cw in zip(weights, client_weights)) / total for n in aggregated}
    return aggregated, averaged


def _gap(aggregated, averaged) -> float:
    return max(float((aggregated[n] - averaged[n]).abs().max()) for n in aggregated)


@pytest.mark.parametrize("method", LINEAR)
def test_fedavg_of_a_linear_method_is_the_average_of_the_clients_adapted_weights(method):
    aggregated, averaged = _federated_round(method, 0.05)
    assert _gap(aggregated, averaged) < 1e-5


def test_salt_scale_and_shift_average_exactly_while_the_values_stay_positive():
    aggregated, averaged = _federated_round("salt", 0.01, keys=("spectrum.scale", "spectrum.shift"))
    assert _gap(aggregated, averaged) < 1e-5


@pytest.mark.parametrize("method", SMOOTH_NONLINEAR)
def test_fedavg_of_a_nonlinear_method_is_a_second_order_approximation(method):
    """Documents the approximation: for products of trained factors (and DoRA's normalization, SST's factored
    weight) the FedAvg model differs from the average of the clients' models by a term quadratic in the client
    updates."""
    small = _gap(*_federated_round(method, 0.01))
    large = _gap(*_federated_round(method, 0.02))
    assert small > 1e-7, "not exact"
    assert 2.5 < large / small < 5.5, (small, large)


def test_salt_residual_lora_averages_only_to_first_order():
    """SALT's ReLU acts on every entry of Σ′: the off-diagonal entries of X·Y start at 0, and clients whose entries
    go negative are clipped, so FedAvg of X and Y misses the average model by a term linear in the updates."""
    small = _gap(*_federated_round("salt", 0.01, keys=("lora_X", "lora_Y")))
    large = _gap(*_federated_round("salt", 0.02, keys=("lora_X", "lora_Y")))
    assert small > 1e-5
    assert 1.5 < large / small < 2.5, (small, large)


def test_sst_server_step_redraws_the_trained_vectors_without_changing_the_weight():
    model, _ = tiny_classifier()
    fedspec.adapt(model, "sst", 4, federated=True)
    perturb(model)
    before = {n: layer.adapted_weight().detach().clone() for n, layer in adapter_layers(model).items()}
    chosen = {n: layer.sel_left.weight.detach().clone() for n, layer in adapter_layers(model).items()}
    METHODS["sst"].server_step(model, fedspec.adapters.adapter_config(model), 4, 0)  # round 4: with a re-SVD
    for name, layer in adapter_layers(model).items():
        assert torch.allclose(layer.adapted_weight(), before[name], atol=1e-5)
        assert not torch.equal(layer.sel_left.weight, chosen[name])
        U = torch.cat([layer.sel_left.weight, layer.rest_left.weight], 1)
        assert torch.allclose(U.T @ U, torch.eye(U.shape[1]), atol=1e-5)  # re-orthogonalized


def test_sst_server_step_draws_by_the_run_seed():
    """Runs of different seeds draw different triplets (their seed-to-seed spread is a real one); the same seed
    draws the same (a resumed run)."""
    def drawn(seed: int) -> dict:
        model, _ = tiny_classifier()
        fedspec.adapt(model, "sst", 4, federated=True)
        METHODS["sst"].server_step(model, fedspec.adapters.adapter_config(model), 1, seed)
        return {n: layer.sel_left.weight.detach().clone() for n, layer in adapter_layers(model).items()}

    zero, again, other = drawn(0), drawn(0), drawn(1)
    assert all(torch.equal(zero[n], again[n]) for n in zero)
    assert not all(torch.equal(zero[n], other[n]) for n in zero)


@pytest.mark.parametrize("method", ["sst", "clip_svd"])
def test_dropout_is_refused_where_the_adapter_carries_the_whole_weight(method):
    """Dropout on the input of an adapter that holds all of W would drop the pretrained path itself."""
    from fedspec.errors import AdapterError

    with pytest.raises(AdapterError, match="adapter.dropout=0.1: this method's adapter carries the layer's whole weight"):
        fedspec.adapt(nn.Sequential(nn.Linear(8, 8)), method, 2, targets=["0"], dropout=0.1)
    fedspec.adapt(nn.Sequential(nn.Linear(8, 8)), "lora", 2, targets=["0"], dropout=0.1)

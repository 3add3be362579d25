"""Aggregation math of FedSVD, FFA-LoRA and FedIT: exactness and invariants."""

from __future__ import annotations

import random

import pytest
import torch

from fedspec.strategies import aggregate, client_update, get_rule, trained_keys

LAYERS = {"l0": (24, 16), "l1": (24, 16), "l2": (12, 20)}  # two layers of one shape, one of another
RANK = 4


def _state(seed: int = 0, *, zero_B: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out_f, in_f) in LAYERS.items():
        state[f"{name}.lora_A.weight"] = torch.randn(RANK, in_f, generator=g, dtype=torch.float64)
        B = torch.zeros(out_f, RANK, dtype=torch.float64) if zero_B else torch.randn(out_f, RANK, generator=g, dtype=torch.float64)
        state[f"{name}.lora_B.weight"] = B
    state["head.weight"] = torch.randn(3, 8, generator=g, dtype=torch.float64)
    return state


def _updates(state, rule_name: str, clients: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    keys = trained_keys(state, get_rule(rule_name))
    return [{k: 0.1 * torch.randn(state[k].shape, generator=g, dtype=torch.float64) for k in keys} for _ in range(clients)]


def _product(state, name):
    return state[f"{name}.lora_B.weight"] @ state[f"{name}.lora_A.weight"]


def _weighted(updates, weights, key):
    return sum(w * u[key] for u, w in zip(updates, weights)) / sum(weights)


def test_fedsvd_preserves_B_agg_times_A_prev_exactly():
    state = _state()
    updates, weights = _updates(state, "fedsvd"), [10.0, 30.0, 60.0]
    new = aggregate(get_rule("fedsvd"), state, updates, weights)
    for name in LAYERS:
        B_agg = state[f"{name}.lora_B.weight"] + _weighted(updates, weights, f"{name}.lora_B.weight")
        assert torch.allclose(_product(new, name), B_agg @ state[f"{name}.lora_A.weight"], atol=1e-12)
    assert torch.allclose(new["head.weight"], state["head.weight"] + _weighted(updates, weights, "head.weight"))


def test_fedsvd_A_has_orthonormal_rows_and_B_holds_the_singular_values():
    new = aggregate(get_rule("fedsvd"), _state(), _updates(_state(), "fedsvd"), [1, 1, 1])
    for name in LAYERS:
        A, B = new[f"{name}.lora_A.weight"], new[f"{name}.lora_B.weight"]
        assert torch.allclose(A @ A.T, torch.eye(RANK, dtype=A.dtype), atol=1e-12)
        norms = B.norm(dim=0)
        singular = torch.linalg.svdvals(_product(new, name))[:RANK]
        assert torch.allclose(norms, singular, atol=1e-10)
        assert torch.all(norms[:-1] >= norms[1:])


def test_fedsvd_is_independent_of_client_order():
    state = _state()
    updates, weights = _updates(state, "fedsvd", clients=5), [1.0, 2.0, 3.0, 4.0, 5.0]
    order = list(range(5))
    random.Random(0).shuffle(order)
    a = aggregate(get_rule("fedsvd"), state, updates, weights)
    b = aggregate(get_rule("fedsvd"), state, [updates[i] for i in order], [weights[i] for i in order])
    for name in LAYERS:
        assert torch.allclose(_product(a, name), _product(b, name), atol=1e-12)


def test_fedsvd_with_zero_B_gives_finite_orthonormal_factors():
    state = _state(zero_B=True)
    zero = [{k: torch.zeros_like(v) for k, v in u.items()} for u in _updates(state, "fedsvd")]
    new = aggregate(get_rule("fedsvd"), state, zero, [1, 1, 1])
    for name in LAYERS:
        A = new[f"{name}.lora_A.weight"]
        assert all(torch.isfinite(t).all() for t in new.values())
        assert torch.allclose(A @ A.T, torch.eye(RANK, dtype=A.dtype), atol=1e-12)
        assert torch.count_nonzero(_product(new, name)) == 0


def test_fedsvd_equals_ffa_lora_in_the_first_round_from_a_random_A_start():
    state = _state(zero_B=True)  # LoRA start: random A, B = 0
    updates, weights = _updates(state, "ffa"), [5.0, 1.0, 2.0]
    fedsvd = aggregate(get_rule("fedsvd"), state, updates, weights)
    ffa = aggregate(get_rule("ffa"), state, updates, weights)
    for name in LAYERS:
        assert torch.allclose(_product(fedsvd, name), _product(ffa, name), atol=1e-12)
        assert torch.equal(ffa[f"{name}.lora_A.weight"], state[f"{name}.lora_A.weight"])


def test_fedit_averages_each_factor_separately():
    state = _state()
    updates, weights = _updates(state, "fedit"), [1.0, 1.0, 2.0]
    new = aggregate(get_rule("fedit"), state, updates, weights)
    for key in state:
        assert torch.allclose(new[key], state[key] + _weighted(updates, weights, key), atol=1e-12)


def test_no_replies_leave_the_model_unchanged():
    state = _state()
    for name in ("fedsvd", "ffa", "fedit"):
        new = aggregate(get_rule(name), state, [], [])
        assert all(torch.equal(new[k], state[k]) for k in state)


def test_frozen_A_rules_reject_updates_of_A():
    state = _state()
    bad = _updates(state, "fedit")  # carries A updates
    with pytest.raises(ValueError, match="does not train"):
        aggregate(get_rule("fedsvd"), state, bad, [1, 1, 1])


def test_client_update_is_the_difference_of_the_trained_tensors():
    received = _state()
    trained = {k: v + 1.0 for k, v in received.items()}
    update = client_update(trained, received, get_rule("fedsvd"))
    assert set(update) == set(trained_keys(received, get_rule("fedsvd")))
    assert not any(k.endswith("lora_A.weight") for k in update)
    assert all(torch.allclose(v, torch.ones_like(v)) for v in update.values())


def test_float32_state_stays_float32_and_exact_to_float32_precision():
    state = {k: v.float() for k, v in _state().items()}
    updates = [{k: v.float() for k, v in u.items()} for u in _updates(_state(), "fedsvd")]
    new = aggregate(get_rule("fedsvd"), state, updates, [1, 2, 3])
    assert all(v.dtype == torch.float32 for v in new.values())
    for name in LAYERS:
        B_agg = state[f"{name}.lora_B.weight"] + _weighted(updates, [1, 2, 3], f"{name}.lora_B.weight")
        expected = B_agg @ state[f"{name}.lora_A.weight"]
        assert torch.allclose(_product(new, name), expected, rtol=1e-5, atol=1e-5)


def test_unknown_strategy_is_a_clear_error():
    with pytest.raises(ValueError, match="strategy.name='fedprox' is not a strategy; choose one of: fedsvd, ffa, fedit, fedavg"):
        get_rule("fedprox")


def test_the_configs_strategy_names_are_exactly_the_defined_rules():
    from fedspec.config import STRATEGIES
    from fedspec.strategies import RULES

    assert tuple(RULES) == STRATEGIES

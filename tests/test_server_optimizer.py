"""The server optimizer (server learning rate and momentum on the mean update): FedSVD stays exact in weight
space, FFA/FedIT get plain FedAvgM, the identity setting changes nothing, and the buffers survive a checkpoint."""

from __future__ import annotations

import pytest
import torch

from fedspec.strategies import apply_mean_update, get_rule, trained_keys, weighted_mean
from fedspec.strategies.server_optimizer import MOMENTUM_PREFIX, ServerOptimizer, split_momentum

LAYERS = {"l0": (24, 16), "l1": (10, 20), "l2": (3, 20)}  # the last has m < r: B·A is rank-deficient
RANK = 5
WEIGHTS = [1.0, 2.0, 3.0]


def _state(scale_a: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, (out_f, in_f) in LAYERS.items():
        state[f"{name}.lora_A.weight"] = scale_a * torch.randn(RANK, in_f, generator=g, dtype=torch.float64)
        state[f"{name}.lora_B.weight"] = torch.randn(out_f, RANK, generator=g, dtype=torch.float64)
    state["head.weight"] = torch.randn(2, 16, generator=g, dtype=torch.float64)
    return state


def _updates(state, rule, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [{k: 0.1 * torch.randn(state[k].shape, generator=g, dtype=torch.float64) for k in trained_keys(state, rule)}
            for _ in WEIGHTS]


def _run(rule_name: str, optimizer: ServerOptimizer, rounds: int = 5):
    """Rounds of (weighted mean → server step → apply → basis change), like AdapterStrategy.aggregate_train."""
    rule = get_rule(rule_name)
    state = _state(scale_a=3.0)  # round 1's A is not orthonormal (as PiSSA's sqrt(S)·Vᵀ)
    history = [state]
    for round_ in range(1, rounds + 1):
        mean = weighted_mean(_updates(state, rule, round_), WEIGHTS)
        new_state = apply_mean_update(rule, state, optimizer.step(mean), a_orthonormal=round_ > 1)
        optimizer.change_basis(rule, state, new_state)
        state = new_state
        history.append(state)
    return history


def _weight_space_reference(history, lr: float, momentum: float):
    """FedAvgM on the dense weights W = B·A (and the head): what FedSVD with a server optimizer must equal.
    Round t's client updates ΔB are in the basis A_t the server sent that round (``history[t - 1]``)."""
    rule = get_rule("fedsvd")
    state = history[0]
    W = {name: state[f"{name}.lora_B.weight"] @ state[f"{name}.lora_A.weight"] for name in LAYERS}
    head = state["head.weight"].clone()
    m_w = {name: torch.zeros_like(w) for name, w in W.items()}
    m_head = torch.zeros_like(head)
    out = []
    for round_ in range(1, len(history)):
        sent = history[round_ - 1]
        mean = weighted_mean(_updates(sent, rule, round_), WEIGHTS)
        for name in LAYERS:
            m_w[name] = momentum * m_w[name] + mean[f"{name}.lora_B.weight"] @ sent[f"{name}.lora_A.weight"]
            W[name] = W[name] + lr * m_w[name]
        m_head = momentum * m_head + mean["head.weight"]
        head = head + lr * m_head
        out.append(({k: v.clone() for k, v in W.items()}, head.clone()))
    return out


def test_identity_settings_change_nothing():
    plain, identity = _run("fedsvd", ServerOptimizer(1.0, 0.0)), _run("fedsvd", ServerOptimizer())
    for a, b in zip(plain, identity):
        for key in a:
            assert torch.equal(a[key], b[key])
    mean = {"x": torch.ones(3)}
    assert ServerOptimizer().step(mean) is mean


@pytest.mark.parametrize(("lr", "momentum"), [(1.0, 0.9), (0.5, 0.5), (2.0, 0.0)])
def test_fedsvd_with_server_momentum_is_exact_in_weight_space(lr, momentum):
    """B·A after every round equals dense FedAvgM on W, although A changes basis every round (and the
    buffers with it); A keeps orthonormal rows."""
    rule = get_rule("fedsvd")
    history = _run("fedsvd", ServerOptimizer(lr, momentum))
    reference = _weight_space_reference(history, lr, momentum)
    for state, (W, head) in zip(history[1:], reference):
        for name in LAYERS:
            B, A = state[f"{name}.lora_B.weight"], state[f"{name}.lora_A.weight"]
            torch.testing.assert_close(B @ A, W[name], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(A @ A.T, torch.eye(RANK, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(state["head.weight"], head, rtol=1e-12, atol=1e-12)
    assert rule.refactor


@pytest.mark.parametrize("rule_name", ["ffa", "fedit"])
def test_other_rules_get_plain_fedavgm_per_tensor(rule_name):
    rule = get_rule(rule_name)
    lr, momentum = 0.7, 0.8
    history = _run(rule_name, ServerOptimizer(lr, momentum))
    state, buffers = _state(scale_a=3.0), {}
    for round_ in range(1, len(history)):
        mean = weighted_mean(_updates(state, rule, round_), WEIGHTS)
        for key, value in mean.items():
            buffers[key] = momentum * buffers.get(key, torch.zeros_like(value)) + value
            state = {**state, key: state[key] + lr * buffers[key]}
        for key in state:
            torch.testing.assert_close(history[round_][key], state[key], rtol=1e-12, atol=1e-12)
    if not rule.clients_train_A:  # FFA: A never moves
        assert torch.equal(history[-1]["l0.lora_A.weight"], history[0]["l0.lora_A.weight"])


def test_buffers_round_trip_through_a_checkpoint_state():
    optimizer = ServerOptimizer(1.0, 0.9)
    _run("fedsvd", optimizer, rounds=2)
    saved = {"l0.lora_B.weight": torch.zeros(1), **optimizer.state()}
    assert all(k.startswith(MOMENTUM_PREFIX) for k in optimizer.state())
    adapter, momentum = split_momentum(saved)
    assert set(adapter) == {"l0.lora_B.weight"}
    restored = ServerOptimizer(1.0, 0.9)
    restored.load(momentum)
    assert restored.buffers.keys() == optimizer.buffers.keys()
    for key in optimizer.buffers:
        assert torch.equal(restored.buffers[key], optimizer.buffers[key])


@pytest.mark.parametrize(("lr", "momentum"), [(0.0, 0.0), (-1.0, 0.0), (1.0, 1.0), (1.0, -0.1)])
def test_bad_settings_name_the_key(lr, momentum):
    with pytest.raises(ValueError, match="strategy.server_"):
        ServerOptimizer(lr, momentum)

"""FedSVD over several rounds: the server takes the r×r rotation shortcut once A has orthonormal rows, and
the result is the same as the full re-factorization (same B·A, A orthonormal, B = UΣ)."""

from __future__ import annotations

import pytest
import torch

import fedspec.svd.refactor as refactor_module
from fedspec.strategies import aggregate, get_rule, trained_keys

LAYERS = {"l0": (48, 32), "l1": (48, 32), "l2": (20, 40), "l3": (3, 40)}  # the last one has m < r
RANK = 6


def _state(dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, (out_f, in_f) in LAYERS.items():
        state[f"{name}.lora_A.weight"] = torch.randn(RANK, in_f, generator=g, dtype=torch.float64).to(dtype)
        state[f"{name}.lora_B.weight"] = torch.randn(out_f, RANK, generator=g, dtype=torch.float64).to(dtype)
    return state


def _updates(state, seed: int):
    g = torch.Generator().manual_seed(seed)
    keys = trained_keys(state, get_rule("fedsvd"))
    return [{k: 0.1 * torch.randn(state[k].shape, generator=g, dtype=torch.float64).to(state[k].dtype) for k in keys}
            for _ in range(3)]


def _orthonormality_error(A: torch.Tensor) -> float:
    A = A.double()
    return float((A @ A.mT - torch.eye(A.shape[0], dtype=torch.float64)).abs().max())


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_shortcut_rounds_equal_full_rounds(dtype, tol):
    """Rounds 2..5 from the same state and updates: rotation shortcut == full re-factorization, and both
    keep B·A = (B + mean ΔB)·A_prev exactly with orthonormal A."""
    rule = get_rule("fedsvd")
    state = aggregate(rule, _state(dtype), _updates(_state(dtype), 1), [1.0, 2.0, 3.0])  # round 1: full
    for round_ in range(2, 6):
        updates = _updates(state, round_)
        fast = aggregate(rule, state, updates, [1.0, 2.0, 3.0], a_orthonormal=True)
        full = aggregate(rule, state, updates, [1.0, 2.0, 3.0])
        for name in LAYERS:
            B_key, A_key = f"{name}.lora_B.weight", f"{name}.lora_A.weight"
            B_agg = state[B_key].double() + sum(w * u[B_key].double() for u, w in zip(updates, (1, 2, 3))) / 6
            expected = B_agg @ state[A_key].double()
            for result in (fast, full):
                B_new, A_new = result[B_key], result[A_key]
                assert B_new.dtype == A_new.dtype == dtype
                product = B_new.double() @ A_new.double()
                assert float((product - expected).norm() / expected.norm()) < tol, (round_, name)
                assert _orthonormality_error(A_new) < tol, (round_, name)
            norms_fast, norms_full = fast[B_key].double().norm(dim=0), full[B_key].double().norm(dim=0)
            torch.testing.assert_close(norms_fast, norms_full, rtol=tol * 10, atol=tol * 10)
            assert torch.all(norms_fast[:-1] >= norms_fast[1:] - tol)
        state = fast


def test_shortcut_skips_every_decomposition_of_A(monkeypatch):
    """The rotation path must not QR-factorize A (the point of the shortcut)."""
    calls = []
    original = refactor_module.qr_tall
    monkeypatch.setattr(refactor_module, "qr_tall", lambda X, **kw: calls.append(tuple(X.shape)) or original(X, **kw))
    rule = get_rule("fedsvd")
    state = aggregate(rule, _state(), _updates(_state(), 1), [1.0, 1.0, 1.0])
    assert len(calls) == 3  # round 1: one batched QR of Aᵀ per shape group
    aggregate(rule, state, _updates(state, 2), [1.0, 1.0, 1.0], a_orthonormal=True)
    assert len(calls) == 3


def test_strategy_takes_the_shortcut_after_the_first_refactor(monkeypatch):
    """AdapterStrategy passes a_orthonormal=False until a round has re-factorized, True afterwards (FedSVD
    only); a round without updates re-factorizes nothing and leaves the flag as it was."""
    pytest.importorskip("flwr")
    import fedspec.strategies.flower as flower_module
    from fedspec.strategies.flower import AdapterStrategy

    from helpers import train_reply

    seen: list[bool] = []
    original = flower_module.apply_mean_update

    def spy(rule, state, mean, **kwargs):
        seen.append(kwargs.get("a_orthonormal", False))
        return original(rule, state, mean, **kwargs)

    monkeypatch.setattr(flower_module, "apply_mean_update", spy)

    def replies(state, rule, seed, count=2):
        g = torch.Generator().manual_seed(seed)
        out = []
        for node in range(count):
            update = {k: 0.01 * torch.randn(state[k].shape, generator=g, dtype=state[k].dtype)
                      for k in trained_keys(state, rule)}
            out.append(train_reply(node, {"client-id": node, "num-examples": 10, "train-loss": 1.0, "steps": 2}, update))
        return out

    # round 1 of fedsvd has no updates: nothing is applied, and round 2 still takes the full re-factorization
    for name, counts, expected in (("fedsvd", [0, 2, 2], [False, True]), ("ffa", [2, 2, 2], [False] * 3)):
        seen.clear()
        rule = get_rule(name)
        strategy = AdapterStrategy(rule, client_ids={0: 0, 1: 1})
        state = _state()
        for round_, count in enumerate(counts, start=1):
            strategy._sent_state = state
            state, _ = strategy.aggregate_train(round_, replies(state, rule, round_, count))
        assert seen == expected, name

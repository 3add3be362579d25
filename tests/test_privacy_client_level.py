"""Client-level DP on the server: clipping bound, noise calibration, FedSVD compatibility, the accountant over
rounds, Poisson client sampling, and the guards (uniform weights)."""

from __future__ import annotations

import math

import pytest
import torch

from fedspec.privacy import PrivacyLedger, epsilon
from fedspec.privacy.client_level import (
    client_level_epsilon,
    client_level_ledger,
    noise_std_of_mean,
    plan_client_level_noise,
)
from fedspec.strategies import apply_mean_update, get_rule, weighted_mean
from fedspec.strategies.client_dp import (
    clip_update,
    noise_generator,
    poisson_sample,
    private_mean,
    update_norm,
)

DELTA = 1e-5
TEMPLATE = {"layer.lora_B.weight": torch.zeros(16, 4), "head.weight": torch.zeros(3, 16), "head.bias": torch.zeros(3)}


def random_update(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in TEMPLATE.items()}


# ----------------------------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("scale", [0.01, 0.3, 5.0])
def test_clipping_bounds_the_whole_update_and_keeps_its_direction(scale):
    update = random_update(1, scale)
    clipped, norm = clip_update(update, 1.0)
    assert norm == pytest.approx(math.sqrt(sum(float(t.double().square().sum()) for t in update.values())))
    assert update_norm(clipped) <= 1.0 + 1e-12
    if norm <= 1.0:  # short updates pass unchanged
        assert all(torch.equal(clipped[k], update[k].double()) for k in update)
    else:  # one scale for all tensors: the clip is on the whole vector, not tensor by tensor
        ratios = {float((clipped[k] / update[k].double()).mean()) for k in update}
        assert max(ratios) - min(ratios) < 1e-12
        assert update_norm(clipped) == pytest.approx(1.0)


def test_one_client_moves_the_noiseless_sum_by_at_most_c():
    updates = [random_update(s, scale=3.0) for s in range(5)]
    C = 0.7

    def clipped_sum(us):
        total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in TEMPLATE.items()}
        for u in us:
            for k, v in clip_update(u, C)[0].items():
                total[k] += v
        return total

    with_all, without_last = clipped_sum(updates), clipped_sum(updates[:-1])
    assert update_norm({k: with_all[k] - without_last[k] for k in with_all}) <= C + 1e-12


# ------------------------------------------------------------------------------------------- noise


def test_noise_on_the_aggregate_has_std_sigma_c_over_expected_clients():
    sigma, C, expected = 1.3, 0.5, 6.0
    gen = torch.Generator().manual_seed(0)
    samples = torch.cat([
        torch.cat([t.flatten() for t in private_mean(
            [], TEMPLATE, clipping_norm=C, noise_multiplier=sigma, expected_clients=expected, generator=gen,
        ).mean.values()])
        for _ in range(400)
    ])  # 400 releases × 115 coordinates of pure noise (no client took part)
    target = noise_std_of_mean(sigma, C, expected)
    assert target == pytest.approx(sigma * C / expected)
    assert float(samples.std()) == pytest.approx(target, rel=0.02)  # 46,000 draws: the std is known to ~0.4%
    assert abs(float(samples.mean())) < 4 * target / math.sqrt(samples.numel())


def test_private_mean_is_the_clipped_sum_plus_noise_over_the_fixed_denominator():
    updates = [random_update(s, scale=s + 0.1) for s in range(4)]
    C, sigma, expected = 1.0, 0.8, 10.0
    result = private_mean(updates, TEMPLATE, clipping_norm=C, noise_multiplier=sigma, expected_clients=expected,
                          generator=torch.Generator().manual_seed(5))
    noise_only = private_mean([], TEMPLATE, clipping_norm=C, noise_multiplier=sigma, expected_clients=expected,
                              generator=torch.Generator().manual_seed(5))
    for key in TEMPLATE:
        clipped_sum = sum(clip_update(u, C)[0][key] for u in updates)
        # the denominator is q·N = 10, not the 4 clients that replied
        assert torch.allclose(result.mean[key], clipped_sum / expected + noise_only.mean[key], atol=1e-12)
    assert result.clients == 4
    assert result.clipped == sum(update_norm(u) > C for u in updates)
    assert result.noise_std == pytest.approx(sigma * C / expected)


def test_fedsvd_noises_the_summed_b_before_the_refactor_which_is_post_processing():
    rule = get_rule("fedsvd")
    g = torch.Generator().manual_seed(3)
    state = {"l.lora_A.weight": torch.linalg.qr(torch.randn(16, 4, generator=g))[0].T.contiguous(),
             "l.lora_B.weight": torch.randn(16, 4, generator=g), "head.weight": torch.randn(3, 16, generator=g)}
    template = {k: state[k] for k in ("l.lora_B.weight", "head.weight")}
    updates = [{k: torch.randn(v.shape, generator=g) for k, v in template.items()} for _ in range(3)]
    private = private_mean(updates, template, clipping_norm=1.0, noise_multiplier=1.0, expected_clients=3.0,
                           generator=torch.Generator().manual_seed(9))
    new = apply_mean_update(rule, state, private.mean)
    # B·A of the new state is exactly (B + noised mean ΔB)·A: the SVD refactor only re-expresses it
    expected_product = (state["l.lora_B.weight"].double() + private.mean["l.lora_B.weight"]) @ state["l.lora_A.weight"].double()
    assert torch.allclose(new["l.lora_B.weight"].double() @ new["l.lora_A.weight"].double(), expected_product, atol=1e-5)
    A = new["l.lora_A.weight"].double()
    assert torch.allclose(A @ A.T, torch.eye(4, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(new["head.weight"].double(), state["head.weight"].double() + private.mean["head.weight"], atol=1e-6)


def test_without_client_dp_the_mean_path_is_unchanged():
    rule = get_rule("ffa")
    state = {"l.lora_A.weight": torch.randn(4, 16), "l.lora_B.weight": torch.zeros(16, 4)}
    updates = [{"l.lora_B.weight": torch.ones(16, 4) * k} for k in (1.0, 3.0)]
    new = apply_mean_update(rule, state, weighted_mean(updates, [1.0, 1.0]))
    assert torch.allclose(new["l.lora_B.weight"], torch.full((16, 4), 2.0))
    with pytest.raises(ValueError, match="does not train"):
        apply_mean_update(rule, state, {"l.lora_A.weight": torch.zeros(4, 16)})


def test_noise_generator_is_seeded_only_in_tests():
    a = torch.randn(3, generator=noise_generator(7, 2))
    assert torch.equal(a, torch.randn(3, generator=noise_generator(7, 2)))
    assert not torch.equal(a, torch.randn(3, generator=noise_generator(7, 3)))
    assert not torch.equal(torch.randn(3, generator=noise_generator(None, 2)), torch.randn(3, generator=noise_generator(None, 2)))


# ------------------------------------------------------------------------------------- sampling and accounting


def test_poisson_client_sampling_includes_each_client_with_rate_q():
    clients = list(range(50))
    counts = [0] * 50
    rounds = 400
    for r in range(rounds):
        for c in poisson_sample(clients, 0.2, seed=1, server_round=r):
            counts[c] += 1
    assert sum(counts) / (50 * rounds) == pytest.approx(0.2, abs=0.01)
    sizes = {len(poisson_sample(clients, 0.2, seed=1, server_round=r)) for r in range(rounds)}
    assert len(sizes) > 5  # the number sampled varies: it is not a fixed-size sample
    assert poisson_sample(clients, 0.2, seed=1, server_round=3) == poisson_sample(clients, 0.2, seed=1, server_round=3)


def test_client_level_epsilon_is_the_subsampled_gaussian_over_rounds_with_known_values():
    # Rounds play the role of steps and q = federation.fraction: Opacus' reference setting (σ = 1.5, q = 0.04,
    # 2250 steps, δ = 1e-5 -> 7.32911117143 with RDP) read as 2250 rounds sampling 4% of the clients.
    assert client_level_epsilon(1.5, 0.04, 2250, DELTA) == pytest.approx(7.32911117143, abs=5e-8)
    ledger = client_level_ledger(DELTA)
    for r in range(1, 2251):
        ledger.record(r, 1.5, 0.04, 1)
    assert ledger.epsilon() == pytest.approx(7.32911117143, abs=5e-8)
    # more rounds cost more, more noise less; planning inverts it
    assert client_level_epsilon(1.0, 0.1, 50, 1e-3) < client_level_epsilon(1.0, 0.1, 100, 1e-3)
    assert client_level_epsilon(2.0, 0.1, 100, 1e-3) < client_level_epsilon(1.0, 0.1, 100, 1e-3)
    sigma = plan_client_level_noise(8.0, 1e-3, 0.5, 5)
    assert client_level_epsilon(sigma, 0.5, 5, 1e-3) <= 8.0 < client_level_epsilon(sigma * 0.999, 0.5, 5, 1e-3)


def test_adapter_strategy_refuses_client_dp_with_example_weights():
    from fedspec.strategies.client_dp import ClientDP
    from fedspec.strategies.flower import AdapterStrategy

    dp = ClientDP(noise_multiplier=1.0, clipping_norm=0.5, sample_rate=0.5, num_clients=4)
    with pytest.raises(ValueError, match="uniform weights"):
        AdapterStrategy(get_rule("fedsvd"), client_ids={1: 0, 2: 1}, client_dp=dp)
    strategy = AdapterStrategy(get_rule("fedsvd"), client_ids={n: n for n in range(40)}, weighting="uniform",
                               client_dp=ClientDP(1.0, 0.5, 0.25, 40, seed=0))
    sampled = [len(strategy.sample(r)) for r in range(1, 200)]
    assert sum(sampled) / (40 * len(sampled)) == pytest.approx(0.25, abs=0.02)


def test_config_requires_uniform_weighting_and_a_sane_delta():
    from fedspec.config import compose_config
    from fedspec.errors import ConfigError
    from fedspec.privacy.planning import PlanSettings, plan_client_level

    with pytest.raises(ConfigError, match="federation.weighting='examples' is not allowed; client-level DP"):
        compose_config(["privacy=client-dp"])
    cfg = compose_config(["privacy=client-dp", "federation.weighting=uniform", "federation.clients=10",
                          "federation.fraction=0.3", "federation.rounds=20"])
    plan = plan_client_level(PlanSettings.of(cfg))
    assert plan.sample_rate == 0.3 and plan.expected_clients == pytest.approx(3.0)
    assert plan.epsilon == pytest.approx(epsilon([(plan.noise_multiplier, 0.3, 20)], 1e-3)) and plan.epsilon <= 8.0
    assert plan.noise_std == pytest.approx(plan.noise_multiplier * 0.5 / 3.0)
    with pytest.raises(ConfigError, match="privacy.client_level.delta=0.2 is not below 1/federation.clients"):
        plan_client_level(PlanSettings.of(compose_config(["privacy=client-dp", "federation.weighting=uniform",
                                                          "privacy.client_level.delta=0.2"])))


def test_ledger_of_the_aggregate_round_trips(tmp_path):
    ledger = client_level_ledger(1e-3, "rdp")
    for r in (1, 2, 3):
        ledger.record(r, 0.9, 0.5, 1)
    ledger.save(tmp_path / "l.json")
    again = PrivacyLedger.load(tmp_path / "l.json")
    assert again.epsilon() == ledger.epsilon() == epsilon([(0.9, 0.5, 3)], 1e-3)

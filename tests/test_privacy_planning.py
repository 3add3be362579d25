"""Planning a run's privacy: σ per client for the worst case, expected ε, rounds within budget, and the
checks that stop a run before it starts (`fedspec privacy-plan` and every `fedspec simulate`)."""

from __future__ import annotations

import math
import re

import pytest

from fedspec.cli import main
from fedspec.config import compose_config
from fedspec.errors import ConfigError
from fedspec.privacy import PrivacyBudgetError, epsilon
from fedspec.privacy.accounting import epsilon_text
from fedspec.privacy.planning import PlanSettings, plan_clients, plan_run, rounds_within_budget

SIZES = [60000, 5000, 800]


def settings_with(*overrides: str) -> PlanSettings:
    return PlanSettings.of(_composed(*overrides))


def _composed(*overrides: str):
    return compose_config(["federation.clients=3", "federation.rounds=10", "federation.fraction=0.5",
                           "train.local_steps=20", "train.batch_size=256", "privacy.target_epsilon=3", *overrides])


def test_sigma_is_planned_per_client_for_every_round_and_is_tight():
    settings = settings_with()
    plans = plan_clients(settings, SIZES)
    for plan, n in zip(plans, SIZES):
        q = 1 / math.ceil(n / 256)
        assert plan.sample_rate == q and plan.steps == 10 * 20
        assert epsilon([(plan.noise_multiplier, q, 200)], 1e-5) == plan.epsilon <= 3.0
        assert epsilon([(plan.noise_multiplier * (1 - 1e-3), q, 200)], 1e-5) > 3.0
        assert plan.rounds_within_budget == 10  # the plan fits the whole schedule, not one round more
    assert plans[0].noise_multiplier < plans[1].noise_multiplier < plans[2].noise_multiplier  # smaller data, more noise


def test_expected_epsilon_averages_over_how_often_a_client_is_sampled():
    settings = settings_with()
    p = settings.participation_probability
    assert p == 2 / 3  # ⌈0.5·3⌉ = 2 of 3 clients each round
    plan = plan_clients(settings, SIZES)[1]
    by_rounds = [epsilon([(plan.noise_multiplier, plan.sample_rate, 20 * k)], 1e-5) for k in range(11)]
    expected = sum(math.comb(10, k) * p**k * (1 - p) ** (10 - k) * by_rounds[k] for k in range(11))
    assert plan.expected_epsilon == pytest.approx(expected, rel=1e-9)
    assert plan.expected_rounds == pytest.approx(10 * p)
    assert 0 < plan.expected_epsilon < plan.epsilon


def test_participation_probability_follows_the_sampling():
    assert settings_with("federation.fraction=0.1", "federation.min_clients=1").participation_probability == 1 / 3
    assert settings_with("federation.fraction=1.0").participation_probability == 1.0
    client_level = settings_with("privacy=client-dp", "federation.weighting=uniform", "privacy.target_epsilon=3",
                            "federation.fraction=0.1", "privacy.client_level.delta=1e-3")
    assert client_level.participation_probability == 0.1  # Poisson: exactly the fraction


def test_the_distributed_noise_is_planned_for_the_cohort_or_the_fixed_survivors():
    """m, the clients whose noise shares make the whole noise: what each client accepts from the server at most."""
    distributed = ["privacy=client-dp", "federation.weighting=uniform", "federation.secure_aggregation.enabled=true",
                   "federation.clients=10", "privacy.client_level.delta=1e-3"]
    assert settings_with(*distributed, "federation.fraction=0.5").noise_shares == 5  # ⌈0.5·10⌉, not all 10
    assert settings_with(*distributed, "federation.fraction=0.05").noise_shares == 2  # at least min_clients
    assert settings_with(*distributed, "federation.fraction=0.7").cohort == 7  # 0.7·10 is 7.000000000000001
    fixed = settings_with(*distributed, "federation.fraction=0.5", "privacy.client_level.min_survivors=3")
    assert fixed.noise_shares == 3 and fixed.cohort == 5


def test_rounds_within_budget_at_a_given_sigma():
    sigma, q, steps, budget = 1.0, 0.05, 20, 2.5
    k = rounds_within_budget(sigma, q, steps, budget, 1e-5, "rdp", limit=1000)
    assert 0 < k < 1000
    assert epsilon([(sigma, q, steps * k)], 1e-5) <= budget < epsilon([(sigma, q, steps * (k + 1))], 1e-5)
    assert rounds_within_budget(sigma, q, steps, budget, 1e-5, "rdp", limit=k - 1) == k - 1  # capped
    assert rounds_within_budget(sigma, q, steps, 1e-3, 1e-5, "rdp", limit=10) == 0


def test_given_sigma_with_a_budget_shows_who_runs_out():
    settings = settings_with("privacy.noise_multiplier=1.0", "privacy.budget_epsilon=2.0")
    assert settings.budget_epsilon == 2.0
    plans = plan_clients(settings, SIZES, rounds_limit=100)
    assert plans[0].rounds_within_budget > 10  # large client: σ = 1 is plenty
    short = plans[2]
    assert short.rounds_within_budget < 10  # q = 1/4: it runs out mid-run and will decline
    # it declines from then on, so its ε after the run stops at the last round its budget allows
    at_cap = epsilon([(1.0, short.sample_rate, 20 * short.rounds_within_budget)], 1e-5)
    assert short.epsilon == at_cap <= 2.0 and short.expected_epsilon <= at_cap
    assert settings_with().budget_epsilon == 3.0  # no explicit budget: the target is the cap
    assert settings_with("privacy.noise_multiplier=1.0", "privacy.target_epsilon=null").budget_epsilon is None


def test_unreachable_target_and_a_budget_too_small_fail_before_the_run():
    with pytest.raises(PrivacyBudgetError, match=r"privacy\.target_epsilon=0\.05 is unreachable.*\(a client with 60000 records\)"):
        plan_run(settings_with("privacy.target_epsilon=0.05"), SIZES)
    with pytest.raises(ConfigError, match="privacy.budget_epsilon=0.1 allows not even one round .* federation.min_clients=2"):
        plan_run(settings_with("privacy.noise_multiplier=1.0", "privacy.budget_epsilon=0.1"), SIZES)
    with pytest.raises(ConfigError, match="privacy.delta=0.01 is not below 1/n"):
        plan_run(settings_with("privacy.delta=0.01"), [50, 5000, 800])
    with pytest.raises(PrivacyBudgetError, match=r"privacy\.client_level\.target_epsilon=0\.001 is unreachable"):
        plan_run(settings_with("privacy=client-dp", "federation.weighting=uniform", "privacy.target_epsilon=3",
                          "privacy.client_level.target_epsilon=0.001", "privacy.client_level.delta=1e-3"), SIZES)


def test_privacy_plan_command_prints_every_client(capsys):
    argv = ["privacy-plan", "--sizes", "60000,5000,800", "--target-epsilon", "3", "--rounds", "10",
            "--fraction", "0.5", "--local-steps", "20", "--batch-size", "256"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    plans = plan_clients(settings_with(), SIZES)
    for plan in plans:
        cells = [plan.client, plan.num_examples, f"{plan.sample_rate:.4f}", f"{plan.noise_multiplier:.4f}",
                 epsilon_text(plan.expected_epsilon), epsilon_text(plan.epsilon), plan.rounds_within_budget]
        assert re.search(r"│\s+" + r"\s+│\s+".join(re.escape(str(c)) for c in cells) + r"\s+│", out), out
    assert "ε expected" in out and "ε worst case" in out and "rounds in budget" in out


def test_the_plan_caption_gives_the_fixed_sample_rate_when_privacy_sample_rate_sets_one(capsys):
    """With privacy.sample_rate every client samples at that q, not at 1/⌈records/batch⌉: the caption says which."""
    argv = ["privacy-plan", "--sizes", "6000,800", "--target-epsilon", "3", "--rounds", "5", "privacy.sample_rate=0.05"]
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "q = 0.05 for every client (privacy.sample_rate)" in out and "1/⌈records/batch⌉" not in out


def test_privacy_plan_names_the_clients_a_given_noise_shuts_out(capsys):
    """A σ too small for a budget leaves the smallest clients (largest sample rate) without a single round."""
    argv = ["privacy-plan", "--sizes", "12000,3000,400", "--noise-multiplier", "0.8", "--budget-epsilon", "3",
            "--rounds", "50", "--fraction", "0.2", "--local-steps", "10", "--batch-size", "32"]
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "2 of 3 clients run out of budget before round 50" in out
    assert "1 of them (client 2) cannot take part in a single round at this σ" in out


def test_privacy_plan_command_errors_are_one_line(capsys):
    assert main(["privacy-plan", "--sizes", "60000,5000", "--target-epsilon", "0.01"]) == 2
    err = capsys.readouterr().err.strip()
    assert "privacy.target_epsilon=0.01 is unreachable" in err and len(err.splitlines()) == 1
    assert main(["privacy-plan", "--sizes", "12,x"]) == 2
    assert "--sizes='12,x'" in capsys.readouterr().err
    # --sizes sets the number of clients: another number given beside it is refused, not silently replaced (the
    # plan was for 2 clients while --clients said 5) nor blamed on a --clients the user never typed
    for other in (["--clients", "5"], ["federation.clients=5"]):
        assert main(["privacy-plan", "--sizes", "600,800", *other]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert "--sizes lists 2 clients" in err and other[-1] in err, err
    for same in (["--clients", "2"], ["federation.clients=2"]):  # the same number is fine
        assert main(["privacy-plan", "--sizes", "6000,8000", *same]) == 0

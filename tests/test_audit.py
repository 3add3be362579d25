"""The one-run canary audit (Steinke, Nasr & Jagielski 2023): the theorem's p-value and ε̂, guessing, the
canaries, and (slow) a DP run against a non-DP control on a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from fedspec.data import TextExamples
from fedspec.privacy.audit import (
    audit_scores,
    canary_assignment,
    canary_texts,
    canary_vocabulary,
    default_guess_counts,
    epsilon_lower_bound,
    guesses,
    p_value,
    with_canaries,
)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


# ------------------------------------------------------------------------------------------ the theorem


@pytest.mark.parametrize("r", [20, 100, 500])
def test_all_guesses_correct_gives_the_closed_form_bound(r):
    # δ = 0, v = r: p-value = P[Binomial(r, p) = r] = p^r with p = e^ε/(1+e^ε); it equals 1 − confidence at
    # p = (1 − confidence)^(1/r), i.e. ε̂ = logit((1 − confidence)^(1/r)).
    expected = _logit(0.05 ** (1 / r))
    assert epsilon_lower_bound(1000, r, r, confidence=0.95) == pytest.approx(expected, abs=2e-6)
    assert epsilon_lower_bound(1000, r, r, confidence=0.95) <= expected  # bisection keeps the rejected side


def test_p_value_is_the_binomial_tail_at_delta_zero():
    for eps in (0.0, 0.5, 2.0):
        q = math.exp(eps) / (1 + math.exp(eps))
        assert p_value(500, 100, 70, eps) == pytest.approx(float(binom.sf(69, 100, q)), rel=1e-12)


def test_delta_term_matches_a_direct_evaluation_of_theorem_3_1():
    m, r, v, eps, delta = 200, 60, 50, 1.0, 1e-3
    q = math.exp(eps) / (1 + math.exp(eps))

    def f(x):  # P[Binomial(r, q) >= x], written out term by term
        return sum(binom.pmf(k, r, q) for k in range(max(0, x), r + 1))

    alpha = max((f(v - i) - f(v)) / i for i in range(1, m + 1))
    assert p_value(m, r, v, eps, delta) == pytest.approx(min(1.0, f(v) + 2 * m * delta * alpha), rel=1e-9)
    assert p_value(m, r, v, eps, delta) > p_value(m, r, v, eps, 0.0)  # δ only weakens the evidence


def test_p_value_grows_with_epsilon_and_the_bound_with_correct_guesses():
    values = [p_value(1000, 200, 160, eps, 1e-5) for eps in (0.0, 0.5, 1.0, 1.5, 2.0)]
    assert values == sorted(values)
    bounds = [epsilon_lower_bound(1000, 200, v, 0.95, 1e-5) for v in (100, 120, 150, 180, 200)]
    assert bounds[0] == 0.0  # chance-level guessing proves nothing
    assert bounds == sorted(bounds) and bounds[-1] > 3.0


@pytest.mark.parametrize(("m", "r", "v"), [(10, 11, 5), (10, 5, 6), (0, 0, 0), (10, 5, -1)])
def test_counts_are_checked(m, r, v):
    with pytest.raises(ValueError, match="v <= r <= m"):
        p_value(m, r, v, 1.0)


def test_bound_holds_at_the_stated_confidence_on_an_exactly_eps_dp_mechanism():
    """Randomized response is exactly ε-DP per canary: the audit's ε̂ must stay below ε in at least 95% of
    independent runs (we allow the binomial noise of 400 runs), and come close to ε when it has the power."""
    eps, m, runs = 1.0, 1000, 400
    rng = np.random.default_rng(7)
    below = 0
    bounds = []
    for _ in range(runs):
        member = rng.random(m) < 0.5
        truthful = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
        said_member = np.where(truthful, member, ~member)
        scores = said_member + rng.random(m) * 1e-3  # ties broken at random, independently of S
        result = audit_scores(scores, member, confidence=0.95, delta=0.0, guess_counts=[(m // 2, m // 2)])
        below += result.epsilon_lower_bound <= eps
        bounds.append(result.epsilon_lower_bound)
    assert below >= 0.95 * runs - 2 * math.sqrt(runs * 0.05 * 0.95)
    assert np.median(bounds) > 0.75 * eps  # and it has power: on a mechanism leaking exactly ε it finds most of it


# -------------------------------------------------------------------------------------------- guessing


def test_guesses_take_the_top_and_bottom_scores_and_abstain_in_between():
    scores = [0.1, 5.0, -3.0, 2.0, 0.0, -1.0]
    assert guesses(scores, 2, 1).tolist() == [0, 1, -1, 1, 0, 0]
    assert np.abs(guesses(scores, 3, 3)).sum() == 6
    with pytest.raises(ValueError):
        guesses(scores, 4, 3)


def test_audit_counts_correct_guesses_and_splits_the_confidence_over_the_grid():
    m = 200
    member = np.arange(m) % 2 == 0
    perfect = np.where(member, 1.0, -1.0) + np.linspace(0, 0.01, m)
    result = audit_scores(perfect, member, confidence=0.95)
    assert (result.correct, result.guesses) == (m, m)  # k₊ = k₋ = m/2, all right
    assert result.candidates == len(default_guess_counts(m))
    union_bounded = epsilon_lower_bound(m, m, m, 1 - 0.05 / result.candidates)
    assert result.epsilon_lower_bound == pytest.approx(union_bounded)
    assert result.epsilon_lower_bound < epsilon_lower_bound(m, m, m, 0.95)  # the price of choosing k afterwards
    random_scores = np.random.default_rng(0).random(m)
    assert audit_scores(random_scores, member).epsilon_lower_bound < 0.5


# -------------------------------------------------------------------------------------------- canaries


def test_canary_assignment_is_seeded_balanced_and_independent_of_inclusion():
    a = canary_assignment(101, 4, 4, seed=3)
    assert a == canary_assignment(101, 4, 4, seed=3)
    assert a != canary_assignment(101, 4, 4, seed=4)
    assert sorted(np.bincount(a.owners)) == [25, 25, 25, 26]
    assert set(a.labels) == {0, 1, 2, 3}
    assert 30 < sum(a.included) < 71
    assert sum(a.included_per_client(4)) == sum(a.included)
    assert a.for_client(2) == [i for i in range(101) if a.owners[i] == 2 and a.included[i]]


def test_canary_words_are_unused_and_never_shared():
    vocab = ["[CLS]", "##ing", "news", "zebra", "quokka", "axolotl", "narwhal", "ab", "Capital", "▁tapir", "Ġokapi",
             "pangolin", "wombat", "caracal"]
    words = canary_vocabulary(vocab, ["The NEWS about a wombat"])
    assert words == sorted(["zebra", "quokka", "axolotl", "narwhal", "tapir", "okapi", "pangolin", "caracal"])
    texts = canary_texts(words, 4, seed=1, words_per_canary=2)
    used = [w for t in texts for w in t.split()]
    assert len(used) == len(set(used)) == 8
    with pytest.raises(ValueError, match="audit.canaries"):
        canary_texts(words, 5, seed=1, words_per_canary=2)


def test_a_client_gets_exactly_its_included_canaries():
    base = TextExamples(["a b", "c d"], [0, 1], ["x", "y", "z"])
    a = canary_assignment(30, 3, 3, seed=0)
    texts = [f"canary{i}" for i in range(30)]
    mine = with_canaries(base, texts, a, 1)
    assert mine.texts[:2] == base.texts
    assert mine.texts[2:] == [texts[i] for i in a.for_client(1)]
    assert mine.labels[2:] == [a.labels[i] for i in a.for_client(1)]


# --------------------------------------------------------------------------------------------- end to end

# Settings that make the non-DP control memorize its canaries (measured on 2 CPU cores: about 2 minutes a run):
# two clients taking part every round, many short rounds (FedAvg of short local runs memorizes what both
# clients hold; long local runs dilute each client's memorization in the average), full-rank adapters of the
# tiny model, 300 canaries of 8 unused words with random labels.
AUDIT_RUN = [
    "--canaries", "300", "--clients", "2", "--rounds", "20", "--fraction", "1", "--quiet",
    "model=tiny-bert", "data.num_examples=200", "data.eval_examples=64", "train.batch_size=16",
    "train.local_steps=60", "train.lr=0.01", "adapter.rank=32",
]
DP_TARGET = 1.0


@pytest.mark.slow
def test_audit_stays_below_epsilon_under_dp_and_catches_a_non_private_run(tmp_path):
    import json

    from fedspec.cli import main

    assert main(["audit", "--name", "dp", "--output-dir", str(tmp_path), *AUDIT_RUN,
                 f"privacy.target_epsilon={DP_TARGET}"]) == 0
    assert main(["audit", "--name", "control", "--output-dir", str(tmp_path), *AUDIT_RUN, "privacy=none"]) == 0
    dp = json.loads((tmp_path / "dp" / "audit" / "report.json").read_text())
    control = json.loads((tmp_path / "control" / "audit" / "report.json").read_text())
    claimed = dp["claimed_record_level_epsilon"]
    assert claimed <= DP_TARGET
    dp_bound = dp["result"]["epsilon_lower_bound"]
    control_bound = control["result"]["epsilon_lower_bound"]
    print(f"DP run: ε = {claimed:.3f}, ε̂ = {dp_bound:.3f}; non-DP control: ε̂ = {control_bound:.3f}")
    assert dp_bound <= claimed
    assert control_bound > DP_TARGET  # the control would refute a claim of ε = 1
    assert control_bound >= dp_bound + 1.0


def test_the_audit_states_the_largest_eps_it_could_show_and_the_canaries_a_claim_needs():
    from fedspec.privacy.audit import canaries_to_refute, max_detectable_epsilon, summary_lines

    m = 300
    member = np.arange(m) % 2 == 0
    result = audit_scores(np.random.default_rng(0).random(m), member, confidence=0.95, delta=1e-5)
    ceiling = max_detectable_epsilon(m, 0.95, 1e-5)
    assert result.max_detectable == pytest.approx(ceiling)
    perfect = audit_scores(np.where(member, 1.0, -1.0), member, confidence=0.95, delta=1e-5)
    assert perfect.epsilon_lower_bound == pytest.approx(ceiling)  # every guess right reaches the ceiling
    assert 3.0 < ceiling < 8.0  # 300 canaries can never refute a claim of ε = 8
    lines = "\n".join(summary_lines(result, {"claimed": 8.0}))
    assert f"this audit cannot refute ε = 8.000: it could show at most ε̂ = {ceiling:.3f}" in lines
    needed = canaries_to_refute(2.0, 0.95, 1e-5)
    assert needed is not None and max_detectable_epsilon(needed, 0.95, 1e-5) > 2.0
    assert needed == 100 or max_detectable_epsilon(needed // 2, 0.95, 1e-5) <= 2.0  # the fewest on the grid
    assert "cannot refute" not in "\n".join(summary_lines(result, {"claimed": 0.5}))
    assert "claimed: 2.442" in "\n".join(summary_lines(result, {"claimed": 2.4412}))  # rounded up, as every ε shown


def test_an_unset_canary_count_defaults_to_one_that_could_refute_the_target(tiny_cfg):
    from fedspec.privacy.audit import max_detectable_epsilon
    from fedspec.simulations.audit import default_canaries

    m = default_canaries(tiny_cfg("privacy.target_epsilon=2"))
    assert max_detectable_epsilon(m, 0.95, 1e-5) > 2.0
    assert default_canaries(tiny_cfg("privacy=none")) == 1000
    from fedspec.errors import ConfigError

    # A one-run audit's ε̂ grows with the logarithm of the canaries: the default target ε = 8 is out of its reach,
    # and the audit says so before it runs, rather than "passing" a claim it could never refute.
    with pytest.raises(ConfigError, match="no audit of up to 51200 canaries could refute ε = 8"):
        default_canaries(tiny_cfg("privacy.target_epsilon=8"))
    with pytest.raises(ConfigError, match="could refute ε = 50"):
        default_canaries(tiny_cfg("privacy.target_epsilon=50"))


def test_an_audit_of_a_causal_lm_task_is_refused_before_anything_runs(tiny_cfg):
    from fedspec.errors import ConfigError
    from fedspec.simulations.audit import run_audit

    cfg = tiny_cfg("model=tiny-llama", "data.task=causal_lm", "data.prompt='{text}'", "audit.canaries=10")
    with pytest.raises(ConfigError, match="needs a classification task; data.task=causal_lm"):
        run_audit(cfg)


@pytest.mark.parametrize("method", ["corda", "eva", "lora_ga", "fwsvd"])
def test_an_audit_of_a_data_driven_initialization_is_refused_before_anything_runs(tiny_cfg, monkeypatch, method):
    """The canary scores need the initial global model, which a data-driven method computes from the clients'
    round-0 statistics: the auditor cannot rebuild it, and used to fail only after the whole federation ran."""
    from fedspec.errors import ConfigError
    from fedspec.simulations import audit

    def no_run(*_, **__):
        raise AssertionError("the federation started")

    monkeypatch.setattr(audit, "simulate", no_run)
    with pytest.raises(ConfigError, match=f"adapter.method={method} computes from the clients' round-0 statistics"):
        audit.run_audit(tiny_cfg(f"adapter={method}", "audit.canaries=10"))

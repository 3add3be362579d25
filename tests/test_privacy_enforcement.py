"""Budget enforcement and client-level DP end to end, on Flower's simulation runtime.

One tiny federation with a given σ and a small record-level budget, so clients run out mid-run: the small
clients after one round, the others later. Client-level DP is on as well (uniform weights, every client
sampled: q = 1), so the same run also shows the server's guarantee beside the clients' ones.
"""

from __future__ import annotations

import json

import pytest

from fedspec.privacy import PrivacyLedger, epsilon
from fedspec.privacy.planning import PlanSettings, plan_run
from fedspec.rundir import MetricsLog
from fedspec.simulations.driver import client_sizes, simulate

BUDGET = 1.95
SIGMA = 1.5
LEVEL_SIGMA = 5.0
ROUNDS = 6


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    from fedspec.config import compose_config

    out = tmp_path_factory.mktemp("runs")
    cfg = compose_config([
        "model=tiny-bert", "data.num_examples=400", "data.eval_examples=64", "data.min_client_examples=8",
        "federation.clients=4", f"federation.rounds={ROUNDS}", "federation.fraction=1.0", "federation.min_clients=2",
        "train.local_steps=2", "train.batch_size=16", "privacy=client-dp", "federation.weighting=uniform",
        f"privacy.noise_multiplier={SIGMA}", f"privacy.budget_epsilon={BUDGET}",
        f"privacy.client_level.noise_multiplier={LEVEL_SIGMA}", "privacy.client_level.target_epsilon=null",
        "privacy.seed_noise=true", "run.name=budget", f"run.output_dir={out}", "run.progress=false",
    ])
    return cfg, simulate(cfg)


def _lines(result, kind):
    return [r for r in MetricsLog(result.paths.metrics).read() if r["kind"] == kind]


def test_the_plan_foresees_who_runs_out(stopped_run):
    cfg, _ = stopped_run
    sizes = client_sizes(cfg)
    assert sizes == [127, 72, 129, 72]  # q = 1/8, 1/5, 1/9, 1/5
    plan = plan_run(PlanSettings.of(cfg), sizes)
    assert [p.rounds_within_budget for p in plan.clients] == [5, 1, 6, 1]
    for p in plan.clients:
        k = p.rounds_within_budget
        assert epsilon([(SIGMA, p.sample_rate, 2 * k)], cfg.privacy.delta) <= BUDGET
        assert k == ROUNDS or epsilon([(SIGMA, p.sample_rate, 2 * (k + 1))], cfg.privacy.delta) > BUDGET


def test_clients_decline_rounds_over_budget_and_never_exceed_it(stopped_run):
    cfg, result = stopped_run
    declined = _lines(result, "client-declined")
    assert {d["client_id"] for d in declined} == {1, 3}
    trained = _lines(result, "client")
    assert {(t["client_id"], t["round"]) for t in trained if t["client_id"] in (1, 3)} == {(1, 1), (3, 1)}
    for d in declined:
        assert d["round"] >= 2 and d["budget_epsilon"] == BUDGET and d["epsilon"] <= BUDGET
    for client in range(4):
        own = PrivacyLedger.load(result.paths.clients / f"client-{client}" / "ledger.json")
        assert 0 < own.epsilon() <= BUDGET
        # clients 0, 1, 3: one more round would have exceeded, the budget ended their training; client 2 had
        # budget left, but alone it was fewer than min_clients
        last = own.entries[-1]
        over = own.would_exceed(BUDGET, noise_multiplier=last.noise_multiplier, sample_rate=last.sample_rate, steps=2)
        assert over == (client != 2)


def test_the_run_stops_cleanly_when_too_few_clients_have_budget(stopped_run):
    _, result = stopped_run
    (stopped,) = _lines(result, "stopped")
    assert stopped["round"] == 6 and "fewer than federation.min_clients=2" in stopped["reason"]
    assert [r["round"] for r in _lines(result, "round")] == [0, 1, 2, 3, 4, 5]
    root = result.paths.root
    for name in ("summary.md", "privacy/report.md", "privacy/report.json", "privacy/epsilon.png",
                 "adapter/adapter_model.safetensors"):
        assert (root / name).is_file(), name
    assert "**stopped after round 5**" in (root / "summary.md").read_text()
    report = json.loads((root / "privacy" / "report.json").read_text())
    assert report["stopped"] == stopped["reason"]
    assert report["declined"] == {"1": [2, 3, 4, 5], "3": [2, 3, 4, 5]}
    md = (root / "privacy" / "report.md").read_text()
    assert "## Budget enforcement" in md and "| 1 | 2, 3, 4, 5 |" in md
    assert "**The run stopped early:**" in md


def test_client_level_guarantee_is_reported_beside_the_record_level_one(stopped_run):
    cfg, result = stopped_run
    report = json.loads((result.paths.privacy / "report.json").read_text())
    level = report["client_level"]
    assert level["rounds_released"] == 5 and level["sample_rate"] == 1.0
    assert level["noise_multiplier"] == LEVEL_SIGMA and level["clipping_norm"] == 0.5
    assert level["final_epsilon"] == pytest.approx(epsilon([(LEVEL_SIGMA, 1.0, 5)], 1e-3), rel=1e-12)
    rounds = _lines(result, "round")[1:]
    assert [r["client_level_epsilon"] for r in rounds] == pytest.approx(
        [epsilon([(LEVEL_SIGMA, 1.0, k)], 1e-3) for k in range(1, 6)], rel=1e-12)
    assert all(r["noise_std"] == pytest.approx(LEVEL_SIGMA * 0.5 / 4) for r in rounds)
    md = (result.paths.privacy / "report.md").read_text()
    assert "Whether a client took part at all (client-level DP)" in md and "## Client-level ε over rounds" in md
    assert "Each client's individual training records (record-level DP)" in md


def test_uniform_weighting_keeps_record_counts_from_the_server(stopped_run):
    _, result = stopped_run
    assert all("num_examples" not in row for row in _lines(result, "client"))
    md = (result.paths.privacy / "report.md").read_text()
    assert "No record counts as weights" in md
    assert "reveal its number of records n to within one batch of B = 16 records" in md


def test_the_servers_budget_check_prices_the_next_round_at_the_last_dp_sgd_round_not_round_0():
    """Round 0's entry is a data-driven init's statistic (σ₀, q = 1, one release), not a training round: pricing the
    next round at it (local_steps full-batch Gaussian steps) stopped runs whose clients had budget left."""
    from fedspec.config import compose_config
    from fedspec.server.budget import BudgetTracker

    budget = BudgetTracker(compose_config(["train.local_steps=8", "privacy.target_epsilon=2"]))
    ledger = PrivacyLedger("0", delta=1e-5)
    ledger.record(0, 5.0, 1.0, 1)  # the round-0 statistic: ε 0.8 or so
    assert 0 < ledger.epsilon() < 2
    assert ledger.would_exceed(2.0, noise_multiplier=5.0, sample_rate=1.0, steps=8)  # what the old check priced
    assert budget.out_of_budget({"0": ledger}) == set()  # not trained yet: nothing to price
    ledger.record(1, 0.9, 1 / 64, 8)
    assert budget.out_of_budget({"0": ledger}) == set()  # its next DP-SGD round fits
    ledger.record(2, 0.9, 1 / 64, 8)
    spent = ledger.would_exceed(2.0, noise_multiplier=0.9, sample_rate=1 / 64, steps=8)
    assert (budget.out_of_budget({"0": ledger}) == {"0"}) == spent

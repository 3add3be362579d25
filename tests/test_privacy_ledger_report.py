"""Tests of the per-client privacy ledger (rounds, persistence, resume) and the privacy report."""

from __future__ import annotations

import json

import pytest

from fedspec.privacy import (
    PrivacyLedger,
    epsilon,
    ledger_filename,
    load_ledgers,
    write_privacy_report,
)

DELTA = 1e-5
# Five rounds of one client: σ, q and steps change between rounds, round 3 is sat out.
ROUNDS = [
    (1, 1.1, 0.02, 120),
    (2, 1.1, 0.02, 80),
    (4, 1.3, 0.025, 100),
    (5, 1.3, 0.025, 100),
    (6, 0.9, 0.01, 60),
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_ledger(client_id: str = "7", rounds=ROUNDS, accountant: str = "rdp") -> PrivacyLedger:
    ledger = PrivacyLedger(client_id, delta=DELTA, accountant=accountant)
    for entry in rounds:
        ledger.record(*entry)
    return ledger


# -------------------------------------------------------------------------------------------- ledger


def test_ledger_epsilon_composes_every_recorded_round():
    ledger = make_ledger()
    history = [(sigma, q, steps) for _, sigma, q, steps in ROUNDS]
    assert ledger.history() == history
    assert ledger.epsilon() == epsilon(history, DELTA, "rdp")
    assert ledger.epsilon(delta=1e-6) == epsilon(history, 1e-6, "rdp")
    assert ledger.epsilon() > epsilon(history[-1:], DELTA)  # not the last round alone


def test_save_load_round_trip(tmp_path):
    ledger = make_ledger()
    path = tmp_path / ledger_filename(ledger.client_id)
    ledger.save(path)
    assert path.name == "client-7.json"
    data = json.loads(path.read_text())
    assert data["format"] == "fedspec-privacy-ledger" and data["client_id"] == "7" and data["delta"] == DELTA
    assert [e["round"] for e in data["entries"]] == [1, 2, 4, 5, 6]
    loaded = PrivacyLedger.load(path)
    assert loaded.to_dict() == ledger.to_dict()
    assert loaded.epsilon() == ledger.epsilon()
    assert PrivacyLedger.from_json(ledger.to_json()).to_dict() == ledger.to_dict()
    assert [p.name for p in tmp_path.iterdir()] == ["client-7.json"]  # no temporary file left behind


def test_save_replaces_the_previous_file(tmp_path):
    path = tmp_path / "client-7.json"
    make_ledger(rounds=ROUNDS[:2]).save(path)
    make_ledger().save(path)
    assert len(PrivacyLedger.load(path).entries) == len(ROUNDS)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_resumed_ledger_reports_the_same_epsilon_as_an_uninterrupted_one(tmp_path, accountant):
    path = tmp_path / "client-7.json"
    make_ledger(rounds=ROUNDS[:3], accountant=accountant).save(path)  # process stops after 3 rounds
    resumed = PrivacyLedger.load_or_empty(path, "7", delta=DELTA, accountant=accountant)
    for entry in ROUNDS[3:]:
        resumed.record(*entry)
    uninterrupted = make_ledger(accountant=accountant)
    assert resumed.to_dict() == uninterrupted.to_dict()
    assert resumed.epsilon() == uninterrupted.epsilon()


def test_recording_a_round_twice_raises_and_changes_nothing():
    ledger = make_ledger()
    before = ledger.epsilon()
    with pytest.raises(ValueError, match="round 6 is already recorded"):
        ledger.record(6, 1.1, 0.02, 50)
    with pytest.raises(ValueError, match="round 3 comes before the last recorded round 6"):
        ledger.record(3, 1.1, 0.02, 50)
    assert len(ledger.entries) == len(ROUNDS) and ledger.epsilon() == before


def test_record_validates_its_inputs():
    ledger = PrivacyLedger("a", delta=DELTA)
    with pytest.raises(ValueError, match=r"round 1: sample_rate must be in \(0, 1\], got 2"):
        ledger.record(1, 1.0, 2, 10)
    with pytest.raises(ValueError, match="round must be an integer >= 0"):
        ledger.record(-1, 1.0, 0.1, 10)
    with pytest.raises(ValueError, match="client_id must be"):
        PrivacyLedger("../a", delta=DELTA)
    with pytest.raises(ValueError, match="delta must be in"):
        PrivacyLedger("a", delta=0.0)
    with pytest.raises(ValueError, match="accountant must be one of"):
        PrivacyLedger("a", delta=DELTA, accountant="moments")


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_by_round_is_cumulative_and_non_decreasing(accountant):
    ledger = make_ledger(accountant=accountant)
    by_round = ledger.epsilon_by_round()
    assert [r for r, _ in by_round] == [1, 2, 4, 5, 6]
    values = [eps for _, eps in by_round]
    assert values == sorted(values) and values[0] > 0
    history = ledger.history()
    assert values[1] == pytest.approx(epsilon(history[:2], DELTA, accountant), rel=1e-12)
    assert values[-1] >= ledger.epsilon()
    if accountant == "rdp":
        assert values[-1] == pytest.approx(ledger.epsilon(), rel=1e-12)


def test_would_exceed_checks_the_total_including_the_planned_round():
    ledger = make_ledger()
    now = ledger.epsilon()
    after = epsilon([*ledger.history(), (1.0, 0.02, 200)], DELTA)
    planned = {"noise_multiplier": 1.0, "sample_rate": 0.02, "steps": 200}
    assert ledger.would_exceed(now + 0.5 * (after - now), **planned)
    assert not ledger.would_exceed(after, **planned)
    assert not ledger.would_exceed(now, **{**planned, "steps": 0})
    with pytest.raises(ValueError, match="budget_epsilon"):
        ledger.would_exceed(float("nan"), **planned)


def test_load_missing_file_raises_and_only_load_or_empty_starts_fresh(tmp_path):
    path = tmp_path / "client-3.json"
    with pytest.raises(FileNotFoundError):
        PrivacyLedger.load(path)
    fresh = PrivacyLedger.load_or_empty(path, "3", delta=DELTA, accountant="prv")
    assert fresh.entries == () and fresh.epsilon() == 0.0
    assert (fresh.client_id, fresh.delta, fresh.accountant) == ("3", DELTA, "prv")


def test_load_or_empty_refuses_a_ledger_with_other_settings(tmp_path):
    path = tmp_path / "client-7.json"
    make_ledger().save(path)
    with pytest.raises(ValueError, match="holds a ledger with"):
        PrivacyLedger.load_or_empty(path, "8", delta=DELTA)
    with pytest.raises(ValueError, match="holds a ledger with"):
        PrivacyLedger.load_or_empty(path, "7", delta=1e-6)


def test_corrupt_or_foreign_files_are_refused(tmp_path):
    data = make_ledger().to_dict()
    with pytest.raises(ValueError, match="version"):
        PrivacyLedger.from_dict({**data, "version": 99})
    with pytest.raises(ValueError, match="already recorded"):
        PrivacyLedger.from_dict({**data, "entries": data["entries"] + data["entries"][-1:]})
    bad = tmp_path / "client-1.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="client-1.json"):
        PrivacyLedger.load(bad)


def test_load_ledgers_reads_client_files_in_natural_order(tmp_path):
    for client_id in ("10", "2", "1"):
        make_ledger(client_id).save(tmp_path / ledger_filename(client_id))
    (tmp_path / "notes.json").write_text("{}")
    ledgers = load_ledgers(tmp_path)
    assert list(ledgers) == ["1", "2", "10"]
    assert all(ledger.client_id == cid for cid, ledger in ledgers.items())
    make_ledger("4").save(tmp_path / "client-5.json")
    with pytest.raises(ValueError, match="should be client-4.json"):
        load_ledgers(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_ledgers(tmp_path / "missing")


# -------------------------------------------------------------------------------------------- report


def three_clients() -> dict[str, PrivacyLedger]:
    return {
        "0": make_ledger("0", ROUNDS),
        "1": make_ledger("1", [(1, 1.5, 0.01, 100), (3, 1.5, 0.01, 100)]),
        "2": make_ledger("2", ROUNDS[:2]),
    }


def test_report_files_and_per_round_json(tmp_path):
    ledgers = three_clients()
    out = tmp_path / "privacy"
    extra = {"target_epsilon": 1.5, "seed": 3}
    report = write_privacy_report(out, ledgers, delta=DELTA, accountant="rdp", max_grad_norm=1.0, extra=extra)
    assert sorted(p.name for p in out.iterdir()) == ["epsilon.png", "report.json", "report.md"]
    assert json.loads((out / "report.json").read_text()) == report

    client = report["clients"]["1"]
    assert [r["round"] for r in client["rounds"]] == [1, 3]
    assert client["rounds"][0] == {
        "round": 1,
        "epsilon": epsilon([(1.5, 0.01, 100)], DELTA),
        "noise_multiplier": 1.5,
        "sample_rate": 0.01,
        "steps": 100,
        "accountant": "rdp",
    }
    assert (client["rounds_taken_part"], client["total_steps"]) == (2, 200)
    for cid, ledger in ledgers.items():
        section = report["clients"][cid]
        by_round = [(r["round"], r["epsilon"]) for r in section["rounds"]]
        assert by_round == ledger.epsilon_by_round(DELTA, "rdp")
        assert section["final_epsilon"] == pytest.approx(ledger.epsilon(DELTA, "rdp"), rel=1e-12)

    finals = {cid: s["final_epsilon"] for cid, s in report["clients"].items()}
    summary = report["summary"]
    assert summary["max_epsilon"] == max(finals.values()) == finals["0"]
    assert summary["max_epsilon_client"] == "0"
    assert summary["median_epsilon"] == sorted(finals.values())[1]
    assert summary["clients_above_target"] == [cid for cid, eps in finals.items() if eps > 1.5]
    assert (report["delta"], report["accountant"], report["max_grad_norm"]) == (DELTA, "rdp", 1.0)
    assert report["extra"] == {"target_epsilon": 1.5, "seed": 3}


def test_report_markdown_explains_the_guarantee_and_has_both_tables(tmp_path):
    report = write_privacy_report(tmp_path, three_clients(), delta=DELTA, accountant="rdp", max_grad_norm=1.0)
    md = (tmp_path / "report.md").read_text()
    for phrase in ("individual training records", "record-level DP-SGD", "WHOLE run",
                   "every round the client took part in, not per round", "δ = 1e-05", "norm C = 1"):
        assert phrase in md
    clients_header = (
        "| client | rounds taken part | total steps | σ (noise multiplier) | q (sample rate) | final ε |"
    )
    assert clients_header in md
    assert "| client | round | σ | q | steps | ε after round |" in md
    from fedspec.privacy.accounting import epsilon_text

    final_0 = report["clients"]["0"]["final_epsilon"]
    assert f"| 0 | 5 | 460 | 0.9–1.3 | 0.01–0.025 | {epsilon_text(final_0)} |" in md  # rounded up
    assert f"| 1 | 3 | 1.5 | 0.01 | 100 | {epsilon_text(report['clients']['1']['final_epsilon'])} |" in md
    assert float(epsilon_text(final_0)) >= final_0


def test_plot_is_a_png_and_copes_with_many_clients(tmp_path):
    ledgers = {
        str(c): make_ledger(str(c), [(r, 1.0 + 0.05 * c, 0.01, 50) for r in range(1, 9) if (r + c) % 3])
        for c in range(25)
    }
    extra = {"target_epsilon": 1.2}
    report = write_privacy_report(tmp_path, ledgers, delta=DELTA, accountant="rdp", extra=extra)
    png = (tmp_path / "epsilon.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert report["summary"]["num_clients"] == 25
    assert list(report["clients"])[:3] == ["0", "1", "2"] and list(report["clients"])[-1] == "24"


def test_report_of_no_trained_client_and_refusals(tmp_path):
    # A run where no client trained (all declined, or the run stopped first) still gets a report that says so.
    report = write_privacy_report(tmp_path, {}, delta=DELTA, accountant="rdp")
    assert report["summary"]["num_clients"] == 0 and report["summary"]["max_epsilon"] is None
    assert "no client trained, so no client spent any privacy" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "epsilon.png").read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="belongs to client '0'"):
        write_privacy_report(tmp_path, {"9": make_ledger("0")}, delta=DELTA, accountant="rdp")
    with pytest.raises(ValueError, match="target_epsilon"):
        write_privacy_report(
            tmp_path, three_clients(), delta=DELTA, accountant="rdp", extra={"target_epsilon": -1}
        )
    with pytest.raises(ValueError, match="record_level=False"):
        write_privacy_report(tmp_path, three_clients(), delta=DELTA, accountant="rdp", record_level=False)


def test_ledger_of_k_identical_rounds_equals_one_entry_with_k_times_the_steps():
    rounds = PrivacyLedger("3", delta=DELTA)
    for r in range(1, 9):
        rounds.record(r, 1.1, 0.02, 25)
    once = PrivacyLedger("3", delta=DELTA)
    once.record(1, 1.1, 0.02, 200)
    assert rounds.epsilon() == once.epsilon()  # equal (σ, q) entries are composed as one: exact
    assert rounds.epsilon(DELTA, "prv") == once.epsilon(DELTA, "prv")


def test_report_shows_both_guarantees_declines_and_what_the_server_sees(tmp_path):
    from fedspec.privacy.client_level import client_level_ledger
    from fedspec.privacy.report import ClientLevelSettings

    level = client_level_ledger(1e-3)
    for r in (1, 2, 3):
        level.record(r, 1.2, 0.25, 1)
    seen = ["**The number of training records of each client**", "Round-0 statistics: none in this run"]
    report = write_privacy_report(
        tmp_path, three_clients(), delta=DELTA, accountant="rdp", max_grad_norm=1.0,
        client_level=ClientLevelSettings(level, clipping_norm=0.5, expected_clients=5.0, target_epsilon=8.0),
        declined={"2": [4, 5], "0": []}, server_sees=seen, stopped="only 1 client left",
    )
    section = report["client_level"]
    assert section["final_epsilon"] == pytest.approx(epsilon([(1.2, 0.25, 3)], 1e-3), rel=1e-12)
    assert [r["round"] for r in section["rounds"]] == [1, 2, 3]
    assert (section["sample_rate"], section["clipping_norm"], section["rounds_released"]) == (0.25, 0.5, 3)
    assert report["declined"] == {"2": [4, 5]}
    md = (tmp_path / "report.md").read_text()
    for phrase in ("## What is protected", "Each client's individual training records (record-level DP)",
                   "Whether a client took part at all (client-level DP)", "not against the server itself",
                   "## What is not protected: what the server still sees", "- Round-0 statistics: none in this run",
                   "## Client-level ε over rounds", "| 2 | 4, 5 |", "**The run stopped early:** only 1 client left"):
        assert phrase in md, phrase
    assert md.index("Record-level ε per client") < md.index("Client-level ε over rounds")
    assert section["expected_clients"] == 5.0
    # Distributed noise (secure aggregation): the mean divides by the clients summed, so no fixed q·N is reported
    distributed = write_privacy_report(
        tmp_path / "distributed", three_clients(), delta=DELTA, accountant="rdp", max_grad_norm=1.0,
        client_level=ClientLevelSettings(level, clipping_norm=0.5, expected_clients=5.0, distributed=True))
    assert distributed["client_level"]["expected_clients"] is None


def test_report_without_record_level_dp_says_records_are_not_protected(tmp_path):
    write_privacy_report(tmp_path, {}, delta=DELTA, accountant="rdp", record_level=False)
    md = (tmp_path / "report.md").read_text()
    assert "**Training records: not protected.**" in md and "**Whether a client took part: not protected.**" in md
    assert "Record-level ε per client" not in md


def _server_sees(overrides: list[str]) -> list[str]:
    from fedspec.config import compose_config
    from fedspec.privacy.disclosures import server_sees

    cfg = compose_config(overrides)
    return server_sees(cfg.privacy, cfg.federation, method=cfg.adapter.method, batch_size=cfg.train.batch_size)


def test_what_the_server_sees_follows_the_settings():
    default = "\n".join(_server_sees([]))
    assert "**The exact number of training records of each client**" in default
    # add/remove adjacency treats a client's record count as private: releasing it is outside the ε, and said so
    assert "is **not covered by the ε**" in default and "also outside the ε, which treats n as private" in default
    assert "Round-0 statistics of data-driven initializations: none in this run (adapter.method=pissa" in default
    assert "not a cryptographically secure RNG" in default
    uniform = "\n".join(_server_sees(["federation.weighting=uniform", "privacy.seed_noise=true"]))
    assert "No record counts as weights" in uniform and "for tests only" in uniform
    assert "not covered by the ε" not in uniform
    closed = "\n".join(_server_sees(["federation.weighting=uniform", "privacy.sample_rate=0.05"]))
    assert "the same for every client (q = 0.05" in closed and "outside the ε" not in closed
    assert "not covered by the ε" not in closed
    no_dp = "\n".join(_server_sees(["privacy=none"]))
    assert "without any noise" in no_dp and "sample rate q" not in no_dp
    # a method whose initialization reads client data must say so, and whether the statistics were privatized
    exact = "\n".join(_server_sees(["adapter=corda"]))
    assert "**Round-0 statistics of client data:** adapter.method=corda initializes from" in exact
    assert "not privatized in this run (set privacy.private_init_stats=true)" in exact
    private = "\n".join(_server_sees(["adapter=corda", "privacy.private_init_stats=true"]))
    assert "each client clipped and noised its sums over a fixed-size subset of its records (Gaussian mechanism, noise σ = 5 times the subset's sensitivity 2C)" in private
    assert "not privatized" not in private

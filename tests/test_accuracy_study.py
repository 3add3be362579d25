"""The accuracy study runner (benchmarks/accuracy.py): its grid, learning-rate choice, sharding, and that a
killed study continues where it stopped (a killed federation resumes from its checkpoint, finished cells are
never run again)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import accuracy
import study_cells
import study_report
from study_cells import (
    CENTRALIZED,
    MINIMUM,
    SMOKE,
    Cell,
    chosen_lr,
    final_cells,
    run_config,
    tuning_cells,
    with_lr,
)
from study_report import code_version, confidence_interval, paired_table


def test_minimum_grid_covers_the_issue_and_keys_are_unique():
    tuning, final = tuning_cells(MINIMUM), final_cells(MINIMUM)
    keys = [c.key for c in tuning + final]
    assert len(keys) == len(set(keys))
    assert {c.dataset for c in final} == {"sst2", "agnews"}
    assert {c.epsilon for c in final} == {1.0, 3.0, 8.0, math.inf}
    assert {c.partition for c in final} == {"dir0.1", "dir0.5", "iid"}
    assert {c.seed for c in final} == {0, 1, 2}
    # svfit is exact under FedAvg and takes no low-rank strategy; pooled data has one partition only
    assert {c.strategy for c in final if c.adapter == "svfit"} == {"fedavg", CENTRALIZED}
    assert {c.strategy for c in final if c.adapter == "pissa"} == {"fedsvd", "ffa", "fedit", CENTRALIZED}
    assert {c.partition for c in final if c.strategy == CENTRALIZED} == {"dir0.1"}
    # every group is swept at the tuning ε on the training file's validation split, every lr once
    assert all(c.tune and c.epsilon == MINIMUM.tune_epsilon for c in tuning)
    # (pissa, lora) × 3 federated strategies + svfit × fedavg, and the centralized baseline of each adapter
    assert len(tuning) == 2 * ((2 * 3 + 1) * len(MINIMUM.lrs) + 3 * len(study_cells.lrs_for(MINIMUM, CENTRALIZED)))


def test_final_cells_run_every_configuration_before_repeating_a_seed():
    seeds = [c.seed for c in final_cells(MINIMUM)]
    assert seeds == sorted(seeds)
    first_seed = [c for c in final_cells(MINIMUM) if c.seed == MINIMUM.seeds[0]]
    assert len(first_seed) * len(MINIMUM.seeds) == len(seeds)


def test_commands_tune_on_training_data_and_score_on_held_out_data(tmp_path):
    tune = Cell("sst2", "fedsvd", "pissa", 3.0, "dir0.5", 0, 0.5, tune=True)
    command = study_cells.command(tune, MINIMUM, tmp_path)
    assert command[:5] == ["simulate", "--clients", "20", "--rounds", "10"]
    assert "data.validation=true" in command and "privacy.target_epsilon=3" in command
    assert f"data.eval_path={tmp_path}/sst2/validation.tsv" in command
    final = Cell("agnews", CENTRALIZED, "svfit", math.inf, "iid", 2, 1.0)
    command = study_cells.command(final, MINIMUM, tmp_path)
    assert command[0] == "train" and "data.validation=true" not in command
    assert "privacy=none" in command and "data.partition=iid" in command and "run.seed=2" in command


def test_learning_rate_is_chosen_only_after_the_whole_sweep():
    final = final_cells(SMOKE)[0]
    group = [c for c in tuning_cells(MINIMUM) if c.group == ("sst2", "fedsvd", "pissa")]
    target = Cell("sst2", "fedsvd", "pissa", 8.0, "iid", 1, None)
    results = {c.key: {"score": 0.5 + 0.01 * i} for i, c in enumerate(group[:-1])}
    assert chosen_lr(MINIMUM, target, results) is None  # one rate still missing
    results[group[-1].key] = {"score": 0.9}
    assert chosen_lr(MINIMUM, target, results) == group[-1].lr
    results[group[0].key] = {"score": 0.9}  # a tie goes to the smaller rate
    assert chosen_lr(MINIMUM, target, results) == min(group[0].lr, group[-1].lr)
    assert with_lr(final, 0.5).key.endswith("lr0.5") and final.key.endswith("lrtbd")


def test_an_untuned_grid_runs_its_fixed_rates_without_a_sweep(tmp_path):
    grid = study_cells.BATCH32
    assert tuning_cells(grid) == []
    cells = final_cells(grid)
    assert {(c.strategy, chosen_lr(grid, c, {})) for c in cells} == {("fedsvd", 1.0), (CENTRALIZED, 0.1)}
    ready, waiting = accuracy.pending_cells(grid, {})
    assert len(ready) == len(cells) and not waiting
    command = study_cells.command(with_lr(cells[0], 1.0), grid, tmp_path)
    assert "data.eval_examples=0" in command and "data.validation=true" not in command
    with pytest.raises(ValueError, match="exactly one learning rate"):
        study_cells.Grid("bad", ("sst2",), ("fedsvd",), ("pissa",), (3.0,), ("dir0.5",), (0,), (0.5, 1.0),
                         tuned=False)


def test_a_fixed_strategy_in_a_tuned_grid_keeps_its_rate_and_runs_no_sweep(tmp_path):
    """The agnews-steps grid sweeps only the centralized baseline's rate at the federation's step count; FedSVD keeps
    the rate an earlier grid chose, so its finals start at once (they are the agnews grid's runs)."""
    grid = study_cells.AGNEWS_STEPS
    assert {c.strategy for c in tuning_cells(grid)} == {CENTRALIZED}
    fedsvd = [c for c in final_cells(grid) if c.strategy == "fedsvd"]
    assert fedsvd and all(chosen_lr(grid, c, {}) == 1.0 for c in fedsvd)
    ready, waiting = accuracy.pending_cells(grid, {})
    assert {c.strategy for c in ready} == {CENTRALIZED} | {"fedsvd"} and {c.strategy for c in waiting} == {CENTRALIZED}
    central = with_lr(next(c for c in final_cells(grid) if c.strategy == CENTRALIZED), 0.1)
    assert f"train.max_steps={20 * 10 * 8}" in study_cells.command(central, grid, tmp_path)
    assert not any("max_steps" in o for o in study_cells.command(with_lr(fedsvd[0], 1.0), grid, tmp_path))
    with pytest.raises(ValueError, match="exactly one learning rate"):
        study_cells.Grid("bad", ("sst2",), ("fedsvd",), ("pissa",), (3.0,), ("dir0.5",), (0,), (0.5, 1.0),
                         fixed=("fedsvd",))


def test_final_overrides_score_only_the_finals_differently(tmp_path):
    """The methods grid tunes on the training file's 1,000-row validation split (as earlier sweeps did) and
    scores its finals on every evaluation row."""
    grid = study_cells.METHODS
    tune = next(c for c in tuning_cells(grid) if c.strategy == "ffa")
    final = with_lr(next(c for c in final_cells(grid) if c.strategy == "ffa"), 1.0)
    assert "data.eval_examples=0" not in study_cells.command(tune, grid, tmp_path)
    assert "data.eval_examples=0" in study_cells.command(final, grid, tmp_path)
    assert {c.strategy for c in final_cells(grid)} == {"fedsvd", "ffa", "fedit", "fedavg", CENTRALIZED}


def test_the_partitions_grid_shares_its_dirichlet_05_cells_with_the_batch32_grid(tmp_path):
    partitions, defaults = study_cells.PARTITIONS, study_cells.BATCH32
    cells = final_cells(partitions)
    assert {c.partition for c in cells if c.strategy == "fedsvd"} == {"dir0.1", "dir0.5", "iid"}
    assert {c.partition for c in cells if c.strategy == CENTRALIZED} == {"dir0.5"}  # pooled: one cell per seed
    in_defaults = {c.key for c in final_cells(defaults)}
    for cell in (c for c in cells if c.partition == "dir0.5"):  # same key, same rate, same command
        assert cell.key in in_defaults
        lr = chosen_lr(partitions, cell, {})
        assert lr == chosen_lr(defaults, cell, {})
        assert (study_cells.command(with_lr(cell, lr), partitions, tmp_path)
                == study_cells.command(with_lr(cell, lr), defaults, tmp_path))
    # Dirichlet 0.1 cannot give 20 clients 32 records each: only its cells accept smaller clients
    small = "data.min_client_examples=8"
    assert all((small in study_cells.command(with_lr(c, 1.0), partitions, tmp_path)) == (c.partition == "dir0.1")
               for c in cells)


def test_the_defaults_grid_runs_what_a_user_runs_and_shares_the_records_finals(tmp_path):
    """Its cells are the user's commands with nothing else (the rates are train=large_batch's, which data=sst2
    picks: lr for the clients, centralized_lr for `fedspec train`), and its ε = 3 cells compose exactly the
    configuration of the records grid's finals."""
    defaults, records = study_cells.DEFAULTS, study_cells.RECORDS
    user = ["simulate", "--clients", "20", "--rounds", "10", "data=sst2", f"data.path={tmp_path}/sst2/train.tsv",
            f"data.eval_path={tmp_path}/sst2/validation.tsv", "privacy.target_epsilon=3"]
    for cell in final_cells(defaults):
        cell = with_lr(cell, chosen_lr(defaults, cell, {}))
        config = run_config(study_cells.command(cell, defaults, tmp_path))
        if cell.strategy == "fedsvd" and cell.epsilon == 3.0 and cell.seed == 0:
            assert config == run_config(user)
        if cell.strategy == "centralized" and cell.epsilon == 3.0 and cell.seed == 0:  # the recipe's centralized_lr
            assert config == run_config(["train", *user[5:]])
        if cell.epsilon == 3.0:
            assert cell.lr in records.rates(cell.strategy)
            assert config == run_config(study_cells.command(cell, records, tmp_path))
    batch32 = run_config(study_cells.command(with_lr(final_cells(study_cells.BATCH32)[0], 1.0), study_cells.BATCH32,
                                            tmp_path))
    assert (batch32.data.max_examples, batch32.train.batch_size, batch32.train.local_steps) == (20000, 32, 8)


def test_the_steps_grid_gives_fedspec_train_the_records_federations_steps_and_shares_its_federated_cells(tmp_path):
    steps, records = study_cells.STEPS, study_cells.RECORDS
    federated = [c for c in final_cells(steps) if c.strategy == "fedsvd"]
    for cell in federated + [c for c in tuning_cells(steps) if c.strategy == "fedsvd"]:
        cell = with_lr(cell, 16.0)
        assert study_cells.command(cell, steps, tmp_path) == study_cells.command(cell, records, tmp_path)
    simulate = run_config(study_cells.command(with_lr(federated[0], 16.0), steps, tmp_path))
    client_steps = (simulate.federation.clients * simulate.federation.fraction * simulate.federation.rounds
                    * simulate.train.local_steps)
    central = next(c for c in final_cells(steps) if c.strategy == CENTRALIZED)
    train = run_config(study_cells.command(with_lr(central, 0.5), steps, tmp_path))
    assert train.train.max_steps == client_steps == 800
    assert (train.train.batch_size, train.privacy.target_epsilon) == (simulate.train.batch_size, 3.0)
    # only the steps differ from the records grid's one-pass baseline
    one_pass = run_config(study_cells.command(with_lr(central, 0.5), records, tmp_path))
    train.train.max_steps = None
    assert train == one_pass


def test_the_noise_grid_trains_the_steps_baseline_at_the_federations_equivalent_sigma(tmp_path):
    noise, steps, records = study_cells.NOISE, study_cells.STEPS, study_cells.RECORDS
    for cell in final_cells(noise):
        cell = with_lr(cell, chosen_lr(noise, cell, {}))
        if cell.strategy == "fedsvd":  # the records grid's finals, shared
            assert study_cells.command(cell, noise, tmp_path) == study_cells.command(cell, records, tmp_path)
            continue
        train = run_config(study_cells.command(cell, noise, tmp_path))
        assert train.privacy.noise_multiplier == study_cells.FEDERATION_EQUIVALENT_SIGMA
        train.privacy.noise_multiplier = None  # only σ differs from the steps grid's baseline
        assert train == run_config(study_cells.command(cell, steps, tmp_path))


def test_a_grid_adopts_another_grids_finished_run_of_the_same_configuration_and_nothing_else(tmp_path, monkeypatch):
    """The steps grid's federations are the records grid's (adopted, marked with their source); its `fedspec train`
    cells have the records grid's keys but train 800 steps instead of one pass (never adopted); the defaults grid
    spells the records grid's ε = 3 commands differently (train=large_batch through data=sst2) but composes the same
    runs (adopted). A second call adopts nothing more."""
    root, data = tmp_path / "accuracy", tmp_path / "data"
    records = {}
    for strategy, lr in (("fedsvd", 16.0), (CENTRALIZED, 0.5)):
        cell = Cell("sst2", strategy, "pissa", 3.0, "dir0.5", 0, lr)
        records[cell.key] = {**cell.__dict__, "key": cell.key, "accuracy": 0.84, "curve": [0.5, 0.84]}
        accuracy.save_result(root / "records", records[cell.key])
    federated, pooled = records
    assert accuracy.adopt_shared_results(study_cells.STEPS, root, data) == [federated]
    adopted = accuracy.load_results(root / "steps")
    assert adopted[federated] == {**records[federated], "shared_from": "records"}
    assert pooled not in adopted  # same key, other command: the steps grid must run it itself
    assert sorted(accuracy.adopt_shared_results(study_cells.DEFAULTS, root, data)) == sorted(records)
    assert accuracy.load_results(root / "defaults")[pooled]["shared_from"] == "records"
    assert accuracy.adopt_shared_results(study_cells.DEFAULTS, root, data) == []
    shutil.rmtree(root / "records")  # from a grid that adopted it, a cell keeps the name of the grid that ran it
    assert accuracy.adopt_shared_results(study_cells.NOISE, root, data) == [federated]
    assert accuracy.load_results(root / "noise")[federated]["shared_from"] == "records"
    # a redefined grid drops what it adopted under its old definition (here: the steps grid's federations grow to 15
    # rounds), and keeps what it ran itself
    accuracy.save_result(root / "steps", {**records[pooled], "accuracy": 0.85})
    monkeypatch.setitem(study_cells.GRIDS, "steps", dataclasses.replace(study_cells.STEPS, rounds=15))
    assert accuracy.adopt_shared_results(study_cells.GRIDS["steps"], root, data) == []
    assert set(accuracy.load_results(root / "steps")) == {pooled}


def test_the_rounds15_grid_is_the_users_epsilon_3_command_with_15_rounds(tmp_path):
    rounds15, defaults = study_cells.ROUNDS15, study_cells.DEFAULTS
    cells = final_cells(rounds15)
    assert [c.seed for c in cells] == [0, 1, 2] and {(c.strategy, c.epsilon) for c in cells} == {("fedsvd", 3.0)}
    for cell in cells:
        cell = with_lr(cell, chosen_lr(rounds15, cell, {}))
        longer, ten = (run_config(study_cells.command(cell, grid, tmp_path)) for grid in (rounds15, defaults))
        assert (longer.federation.rounds, ten.federation.rounds) == (15, 10)
        longer.federation.rounds = 10
        assert longer == ten  # nothing else differs


def test_the_paired_table_subtracts_the_centralized_run_of_the_same_seed():
    grid = study_cells.DEFAULTS
    results = {}
    for seed, fed, central in ((0, 0.836, 0.844), (1, 0.841, 0.849), (2, 0.835, 0.848)):
        for strategy, lr, score in (("fedsvd", 16.0, fed), (CENTRALIZED, 0.5, central)):
            cell = Cell("sst2", strategy, "pissa", 3.0, "dir0.5", seed, lr)
            results[cell.key] = {**cell.__dict__, "accuracy": score, "subgroup_accuracy": score - 0.03,
                                 "curve": [0.5, score], "last5_spread": 0.0}
    unpaired = Cell("sst2", "fedsvd", "pissa", 1.0, "dir0.5", 2, 16.0)  # ε = 1: no centralized run to pair with
    results[unpaired.key] = {**unpaired.__dict__, "accuracy": 0.8, "curve": [0.5, 0.8], "last5_spread": 0}
    _, _, row = paired_table(grid, results)
    differences = [-0.008, -0.008, -0.013]
    assert row.startswith("| sst2 | fedsvd | pissa | 3 | dir0.5 | 0, 1, 2 | ")
    expected = f"−{-sum(differences) / 3:.3f} ± {confidence_interval(differences):.3f} (n=3)"
    assert row.count(expected) == 2  # accuracy and whole sentences (the same offset on both)
    assert paired_table(study_cells.SMOKE, {}) == []


def test_wall_time_counts_only_runs_timed_from_start_to_finish():
    from study_report import _minutes

    assert _minutes([{"seconds": 600}, {"seconds": 60, "resumed": True}, {"seconds": 1200}]) == "15.0"
    assert _minutes([{"seconds": 60, "resumed": True}, {"seconds": 120, "resumed": True}]) == "≥ 2.0"


def test_time_left_takes_the_median_of_finished_cells_of_the_same_kind():
    def record(strategy, tune, seconds, resumed=False):
        return {"strategy": strategy, "tune": tune, "seconds": seconds, "resumed": resumed}

    results = {"a": record("fedsvd", False, 100.0), "b": record("ffa", False, 300.0),
               "c": record("fedsvd", False, 5.0, resumed=True),  # timed from its resume only: left out
               "d": record(CENTRALIZED, True, 50.0)}
    final = Cell("sst2", "fedit", "lora", 3.0, "dir0.5", 1, None)
    centralized_sweep = Cell("sst2", CENTRALIZED, "lora", 3.0, "dir0.5", 0, 0.5, tune=True)
    federated_sweep = Cell("sst2", "fedsvd", "lora", 3.0, "dir0.5", 0, 0.5, tune=True)  # no such kind done: all
    assert accuracy.time_left([final, centralized_sweep, federated_sweep], results) == 200.0 + 50.0 + 100.0
    assert accuracy.time_left([final], {"c": results["c"]}) is None
    assert accuracy.describe_duration(45 * 60) == "45 min" and accuracy.describe_duration(5.4 * 3600) == "5.4 h"


def test_last_rounds_drop_tells_a_swing_from_a_rise():
    rising = [0.5, 0.60, 0.70, 0.75, 0.78, 0.80, 0.81, 0.82, 0.83, 0.84, 0.85]
    assert study_cells.last_rounds_drop(rising) == 0.0
    swinging = [0.2, 0.54, 0.71, 0.78, 0.74, 0.69, 0.68, 0.70, 0.79, 0.81, 0.84]  # AG News, seed 2, half the clients
    assert study_cells.last_rounds_drop(swinging) == pytest.approx(0.78 - 0.68)
    assert study_cells.last_rounds_drop([0.5, 0.8]) == 0.0


def test_shards_split_the_grid_without_overlap():
    cells = tuning_cells(MINIMUM) + final_cells(MINIMUM)
    shards = [{c.key for c in cells if accuracy.in_shard(c, (i, 3))} for i in range(3)]
    assert set.union(*shards) == {c.key for c in cells}
    assert sum(len(s) for s in shards) == len(cells)
    assert min(len(s) for s in shards) > len(cells) / 6  # roughly balanced
    # a final's shard is known before its sweep chooses the rate, and is the same at every rate
    for final in final_cells(MINIMUM):
        rates = study_cells.lrs_for(MINIMUM, final.strategy)
        assert len({accuracy.in_shard(with_lr(final, lr), (0, 3)) for lr in (None, *rates)}) == 1


def _fake_cells(monkeypatch, seconds: float = 0.0) -> list[str]:
    """Make accuracy.main run no real cell: each takes ``seconds`` and a sweep cell scores best at lr 1. Returns the
    keys of the cells run, in order (shared by every thread)."""
    ran, lock = [], threading.Lock()

    def run_cell(cell, grid, out, data_root):
        time.sleep(seconds)
        with lock:
            ran.append(cell.key)
        return {**cell.__dict__, "key": cell.key, "score": 1 / (1 + abs(math.log(cell.lr))), "seconds": seconds,
                "resumed": False, "summary": "fake"}

    monkeypatch.setattr(accuracy, "run_cell", run_cell)
    monkeypatch.setattr(accuracy, "write_report", lambda grid, results, page, out: None)
    return ran


def _study_args(tmp_path: Path, shard: str, *extra: str) -> list[str]:
    data = tmp_path / "data"
    for name in ("sst2", "agnews"):
        (data / name).mkdir(parents=True, exist_ok=True)
    return ["--grid", "quick", "--out", str(tmp_path / "out"), "--data", str(data), "--page",
            str(tmp_path / "results.md"), "--shard", shard, *extra]


def test_concurrent_shards_wait_for_each_others_sweeps_and_run_every_final_once(tmp_path, monkeypatch):
    """A final is ready only once its whole sweep has run, part of it in the other shard: a shard that ran out of
    ready cells used to exit and leave its finals unrun (6 of the quick grid's 12 with equal cell times)."""
    grid = study_cells.QUICK
    ran = _fake_cells(monkeypatch, seconds=0.02)
    exits = {}

    def shard(index: int) -> None:
        exits[index] = accuracy.main(_study_args(tmp_path, f"{index}/2", "--wait-interval", "0.01"))

    threads = [threading.Thread(target=shard, args=(i,), daemon=True) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads) and exits == {0: 0, 1: 0}
    finals = {with_lr(c, 1.0).key for c in final_cells(grid)}  # the fake sweeps choose lr 1
    assert len(ran) == len(set(ran)) == len(tuning_cells(grid)) + len(finals)  # each cell once
    assert finals <= set(ran) and finals <= set(accuracy.load_results(tmp_path / "out" / "quick"))


def test_separate_machines_run_their_finals_in_a_second_pass_after_the_sweeps_are_merged(tmp_path, monkeypatch,
                                                                                          capsys):
    """--no-wait: a shard whose finals wait for another machine's sweep cells says so and exits; once those cells
    are copied into its cells/ folder, running it again runs its finals."""
    grid = study_cells.QUICK
    ran = _fake_cells(monkeypatch)
    assert accuracy.main(_study_args(tmp_path, "0/2", "--no-wait")) == 0
    mine = [c for c in tuning_cells(grid) if accuracy.in_shard(c, (0, 2))]
    my_finals = [c for c in final_cells(grid) if accuracy.in_shard(c, (0, 2))]
    assert set(ran) >= {c.key for c in mine} and "run this shard again" in capsys.readouterr().out
    for cell in tuning_cells(grid):  # the other machine's sweep cells (from the fake runner), copied in
        if cell not in mine:
            accuracy.save_result(tmp_path / "out" / "quick", accuracy.run_cell(cell, grid, tmp_path, tmp_path))
    assert accuracy.main(_study_args(tmp_path, "0/2", "--no-wait")) == 0
    assert "run this shard again" not in capsys.readouterr().out
    results = accuracy.load_results(tmp_path / "out" / "quick")
    assert all(with_lr(c, 1.0).key in results for c in my_finals)
    assert not any(with_lr(c, 1.0).key in results for c in final_cells(grid) if c not in my_finals)


def test_the_study_without_a_grid_runs_the_headline_grids_in_turn_and_puts_their_tables_on_one_page(tmp_path,
                                                                                                      monkeypatch):
    """`python benchmarks/accuracy.py` is the issue's "one command": it runs every grid docs/results.md summarizes,
    writes each grid's own page beside it, then the page with each grid's table under the question it answers."""
    ran: list[str] = []

    def run_cell(cell, grid, out, data_root):
        ran.append(grid.name)
        return {**cell.__dict__, "key": cell.key, "score": 1 / (1 + abs(math.log(cell.lr))), "accuracy": 0.8,
                "last5_spread": 0.0, "curve": [0.5, 0.8], "max_epsilon": cell.epsilon, "seconds": 1.0,
                "resumed": False, "summary": "fake"}

    pages: list[Path] = []
    monkeypatch.setattr(accuracy, "run_cell", run_cell)
    monkeypatch.setattr(accuracy, "write_report", lambda grid, results, page, out: pages.append(page))
    monkeypatch.setattr(study_report.generative, "load", lambda: {})
    data = tmp_path / "data"
    for name in ("sst2", "agnews"):
        (data / name).mkdir(parents=True)
    page = tmp_path / "site" / "results.md"
    page.parent.mkdir()
    assert accuracy.main(["--out", str(tmp_path / "out"), "--data", str(data), "--page", str(page)]) == 0
    names = [name for name, _ in study_cells.HEADLINE]
    assert list(dict.fromkeys(ran)) == names  # in turn; a grid's cells another grid ran are adopted, not rerun
    assert pages == [page.with_name(f"results-{name}.md") for name in names]
    text = page.read_text()
    positions = [text.index(f"## {question}") for _, question in study_cells.HEADLINE]
    assert positions == sorted(positions)
    assert all(f"(results-{name}.md)" in text for name in names) and "have not run yet" not in text
    assert text.count("| sst2 | fedsvd | pissa | 3 | dir0.5 | 16 | 0.800 ± 0.000 (n=3) |") == 2  # defaults, steps


def test_a_cell_records_the_commit_its_run_started_on(tmp_path, monkeypatch):
    """Not the one checked out when it finished: here a commit lands, and a tracked file changes, while it runs."""
    for variable in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(variable, "test@example.com")
    repo = tmp_path / "repo"
    real_run = subprocess.run

    def git(*args: str) -> str:
        return real_run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()

    repo.mkdir()
    git("init", "-q")
    (repo / "code.py").write_text("v1\n")
    git("add", "code.py")
    git("commit", "-qm", "v1")
    started_on = git("rev-parse", "--short", "HEAD")

    def run(command, *args, **kwargs):
        if "fedspec.cli" not in command:
            return real_run(command, *args, **kwargs)
        (repo / "code.py").write_text("v2\n")
        git("commit", "-qam", "v2")
        (repo / "code.py").write_text("v3, not committed\n")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(accuracy, "ROOT", repo)
    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(study_cells, "result", lambda cell, run_dir, **_: {"key": cell.key})
    record = accuracy.run_cell(tuning_cells(SMOKE)[0], SMOKE, tmp_path / "out", tmp_path)
    assert (record["commit"], record["uncommitted_changes"]) == (started_on, False)
    assert code_version(record) == started_on  # the report marks a cell run on uncommitted changes
    assert code_version({**record, "uncommitted_changes": True}) == f"{started_on} with uncommitted changes"
    assert accuracy.code_state() == {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted_changes": True}
    git("checkout", "code.py")
    (repo / "scratch.txt").write_text("an untracked file is not part of the code a cell runs\n")
    assert accuracy.code_state()["uncommitted_changes"] is False
    monkeypatch.setattr(accuracy, "ROOT", tmp_path / "out")  # not a git checkout
    assert accuracy.code_state() == {"commit": None, "uncommitted_changes": None}


def test_confidence_interval_known_value():
    # t(0.975, 2) = 4.3027; stdev of (1, 2, 3) = 1; half-width = 4.3027 / sqrt(3)
    assert confidence_interval([1.0, 2.0, 3.0]) == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert confidence_interval([0.7]) == 0.0


def _study(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(BENCHMARKS / "accuracy.py"), "--grid", "smoke", "--out", str(out),
         "--page", str(out / "results.md"), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def test_a_killed_study_continues_where_it_stopped(tmp_path):
    """Kill the study (its whole process group) once the first federation has checkpointed a round; the rerun
    resumes that federation from its checkpoint, and never reruns a finished cell."""
    out = tmp_path / "study"
    first_federation = out / "smoke" / "runs" / tuning_cells(SMOKE)[0].key
    process = _study(out)
    deadline = time.monotonic() + 240
    while not (first_federation / "checkpoints" / "round-0001" / "meta.json").is_file():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "the first federation never checkpointed its first round"
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "smoke" / "cells").is_dir() or not list((out / "smoke" / "cells").glob("*.json"))

    rerun = _study(out)
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output
    cells = {p.stem: json.loads(p.read_text()) for p in (out / "smoke" / "cells").glob("*.json")}
    assert len(cells) == len(tuning_cells(SMOKE)) + len(final_cells(SMOKE))
    resumed = cells[tuning_cells(SMOKE)[0].key]
    assert resumed["resumed"] is True and len(resumed["curve"]) == SMOKE.rounds + 1  # rounds 0..R, each once
    rounds = [json.loads(line)["round"] for line in (first_federation / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "round"]
    assert rounds.count(0) == 1 and rounds.count(1) == 1  # not started over: continued after round 1
    assert "## Accuracy" in (out / "results.md").read_text()

    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "smoke" / "cells").glob("*.json")}
    again = _study(out)
    output, _ = again.communicate(timeout=120)
    assert again.returncode == 0, output
    assert "…" not in output  # no cell started
    assert {p.name: p.stat().st_mtime_ns for p in (out / "smoke" / "cells").glob("*.json")} == stamps

    # A finished cell run again (benchmarks/rerun_cells.py): its record goes beside the study's, which stays as it was.
    key = next(k for k, record in cells.items() if record["strategy"] == CENTRALIZED and not record["tune"])
    rerun = subprocess.run([sys.executable, str(BENCHMARKS / "rerun_cells.py"), f"smoke:{key}", "--out", str(out)],
                           capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    again = json.loads((out / "reruns" / "smoke" / "cells" / f"{key}.json").read_text())
    assert again["key"] == key and len(again["curve"]) == len(cells[key]["curve"]) and not again["resumed"]
    assert f"| smoke:{key} | {cells[key]['accuracy']:.4f} | {again['accuracy']:.4f} | " in rerun.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (out / "smoke" / "cells").glob("*.json")} == stamps
    shown = subprocess.run([sys.executable, str(BENCHMARKS / "rerun_cells.py"), f"smoke:{key}", "--out", str(out)],
                           capture_output=True, text=True, timeout=120, check=False)
    assert shown.returncode == 0 and "running" not in shown.stdout  # a finished rerun is only shown again


def test_the_generative_section_shows_each_run_and_a_degraded_federation():
    import generative

    assert generative.markdown({}) == []
    results = {"fedsvd": {"loss": [0.78, 0.24], "answer_accuracy": [0.23, 0.6], "max_epsilon": 2.07,
                          "clients_per_round": [5, 1, 1, 1], "client_errors": 12, "out_of_memory": 12,
                          "seconds": 2244.0, "commit": "abc1234"}}
    text = "\n".join(generative.markdown(results))
    assert "| centralized | not run yet |" not in text and "| central | not run yet |" in text
    assert "| 0.780 → 0.240 | 2.18 → 1.27 | 0.230 → 0.600 | 2.07 | 5, 1, 1, 1 (12 client failures, 12 out of memory) |" in text


def test_a_resumed_generative_federation_is_summarized_with_each_round_once(tmp_path):
    """A federation resumed from its round-1 checkpoint logs rounds 2 and 3 again: the summary listed them twice
    (clients per round 5, 5, 5, 5, 5) and could take a superseded evaluation for its last."""
    import json

    import generative

    (tmp_path / "privacy").mkdir()
    (tmp_path / "privacy" / "report.json").write_text(json.dumps({"clients": {"0": {"final_epsilon": 2.5}}}))
    rounds = [(0, None, 0.7), (1, 5, 0.6), (2, 5, 0.5), (3, 5, 0.45), (2, 4, 0.52), (3, 3, 0.4)]
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"kind": "round", "round": r, "clients": c, "eval_loss": loss, "eval_accuracy": 0.5,
                    "answer_accuracy": 0.5}) + "\n" for r, c, loss in rounds))
    summary = generative.summarize("fedsvd", tmp_path, 1.0)
    assert summary["clients_per_round"] == [5, 4, 3] and summary["loss"] == [0.7, 0.4]


def test_the_missing_cells_are_listed_when_few_and_counted_by_group_when_many():
    from study_report import MISSING_LISTED, missing_section

    few = missing_section(SMOKE, {})
    assert few[0].startswith(f"{len(tuning_cells(SMOKE)) + len(final_cells(SMOKE))} of the grid's")
    assert {line.strip("-` ") for line in few[2:]} == {c.key for c in tuning_cells(SMOKE) + final_cells(SMOKE)}
    ran = tuning_cells(MINIMUM)[0]
    many = missing_section(MINIMUM, {ran.key: {"score": 0.8}})
    total = len(tuning_cells(MINIMUM)) + len(final_cells(MINIMUM))
    assert total - 1 > MISSING_LISTED and many[0].startswith(f"{total - 1} of the grid's {total} cells")
    rows = {tuple(line.strip("| ").split(" | ")[:3]): [int(n) for n in line.strip("| ").split(" | ")[3:]]
            for line in many[4:]}
    assert sum(sweep + final for sweep, final in rows.values()) == total - 1
    sweep_rates = len(MINIMUM.rates(ran.strategy))
    assert rows[ran.group][0] == sweep_rates - 1  # the one sweep cell that ran is not missing
    assert ("agnews", "fedavg", "svfit") in rows and ("sst2", "fedavg", "pissa") not in rows


def test_unseen_rows_are_those_no_training_row_contains_as_a_run_of_whole_words():
    train = ["a gorgeous , witty film", "the plot is thin", "bad"]
    evaluation = ["gorgeous , witty", "witty film !", "the plot", "plot is thin but fun", "bad", "ba", "thin"]
    assert study_cells.unseen_rows(train, evaluation) == [1, 3, 5]  # "ba" is in "bad" as letters, not as a word


def _final_records(grid, values: dict[tuple[str, int], dict]) -> dict[str, dict]:
    """Records of an untuned grid's finals at ε = 3: (strategy, seed) → the fields that differ."""
    results = {}
    for (strategy, seed), fields in values.items():
        cell = Cell(grid.datasets[0], strategy, "pissa", 3.0, "dir0.5", seed, None)
        cell = with_lr(cell, chosen_lr(grid, cell, {}))
        curve = fields.pop("curve", [0.5] + [0.8] * grid.rounds)
        results[cell.key] = {**cell.__dict__, "key": cell.key, "accuracy": curve[-1], "curve": curve,
                             "last5_spread": 0.0, "seconds": 60.0, "max_epsilon": 2.99, **fields}
    return results


def test_the_table_rounds_each_clients_epsilon_up_as_every_epsilon_shown():
    """The table's max client ε was rounded to nearest (the quick grid's AG News FedSVD runs, ε 2.89909, showed
    2.899): a shown ε must never be below the bound computed (fedspec.privacy.accounting.epsilon_text)."""
    from study_report import results_table

    grid = study_cells.DEFAULTS
    results = _final_records(grid, {("fedsvd", seed): {"max_epsilon": eps, "bytes_per_client_round": 150536}
                                    for seed, eps in ((0, 2.8990930558121932), (1, 2.85), (2, 2.8))})
    row = next(line for line in results_table(grid, results) if "| fedsvd |" in line)
    assert "| 2.900 |" in row and "2.899" not in row


def test_a_federation_that_stopped_before_its_last_round_is_recorded_and_flagged(tmp_path):
    """A resumed FFA-LoRA run (methods grid, seed 2) trained a round twice, ran out of budget and stopped after 9 of
    its 10 rounds; its record said nothing of it, and the page pooled its ninth round with full runs as a
    10-round result."""
    from study_report import stopped_section

    grid = study_cells.AGNEWS
    run = tmp_path / "run"
    run.mkdir()
    reason = "only 0 of 20 clients have record-level budget left (ε ≤ 3) for another round"
    lines = [{"kind": "round", "round": r, "eval_accuracy": 0.5 + r / 100, "max_epsilon": r / 3 or None}
             for r in range(10)]
    lines.append({"kind": "stopped", "round": 10, "reason": reason})
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    cell = Cell("agnews", "fedsvd", "pissa", 3.0, "dir0.5", 2, 1.0)
    record = study_cells.result(cell, run, seconds=1.0)
    assert record["stopped"] == reason and len(record["curve"]) == 10
    assert "stopped" in record["summary"]
    full = record | {"stopped": None, "curve": [0.5] + [0.8] * 10}
    assert not stopped_section(grid, {cell.key: full})
    assert stopped_section(grid, {cell.key: record})
    # a record stored before records said so: its curve is short of the grid's rounds
    results = _final_records(grid, {("fedsvd", 0): {}, ("fedsvd", 2): {"curve": [0.5] + [0.8] * 9},
                                    (CENTRALIZED, 0): {"curve": [0.5, 0.84]}})
    text = "\n".join(stopped_section(grid, results))
    short = next(key for key in results if "-s2-" in key)
    assert f"`{short}`: after 9 of 10 rounds" in text
    assert sum(f"`{key}`" in text for key in results) == 1

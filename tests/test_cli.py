"""The `fedspec` command: help, the centralized baseline, and bad input that fails early with one line."""

from __future__ import annotations

import json

import pytest

from fedspec.cli import main

TINY = [
    "model=tiny-bert", "data.num_examples=200", "data.eval_examples=32", "data.min_client_examples=8",
    "train.local_steps=2", "train.batch_size=16", "--quiet",
]


def _fails(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert len(err.splitlines()) == 1, err


def test_help_explains_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("simulate", "train", "privacy-report", "privacy-plan"):
        assert command in out
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    out = capsys.readouterr().out
    assert "--clients" in out
    from fedspec.adapters import METHODS

    listed = " ".join(out.split("adapter:")[1].split("strategy:")[0].split())
    assert sorted(METHODS) == sorted(name.strip() for name in listed.split(","))  # every method, each with a config


@pytest.mark.parametrize(("extra", "message"), [
    (["--clients", "0"], "federation.clients=0 is not allowed; a federation needs at least 1 client"),
    (["adapter.method=nope"], "adapter.method='nope' is not allowed; choose one of:"),
    (["strategy.name=fedprox"], "strategy.name='fedprox' is not allowed; choose one of: fedsvd, ffa, fedit, fedavg"),
    (["adapter.rank=64"], "adapter.rank=64 is larger than layer"),
    (["adapter.targets=[q_proj]"], "adapter.targets pattern 'q_proj' matches no nn.Linear layer"),
    (["data.source=file", "data.path=/nonexistent/train.tsv"], "data.path='/nonexistent/train.tsv' does not exist"),
    # the error line is printed verbatim: rich used to read [2024] as markup and :x: as an emoji code
    (["data.source=file", "data.path='/nonexistent/[2024]/train:x:.tsv'"],
     "data.path='/nonexistent/[2024]/train:x:.tsv' does not exist"),
    (["privacy.delta=0.05"], "privacy.delta=0.05 is not below 1/n for client"),
    (["privacy.target_epsilon=0.01"], "target_epsilon=0.01 is unreachable"),
    (["--clients", "500"], "clients"),
    (["--rounds", "1", "federation.rounds=0"], "--rounds 1 and federation.rounds=0 both set federation.rounds"),
    (["federation.update_clip=0.5"], "federation.update_clip=0.5 is not allowed; it must be >= 1"),
    (["strategy.server_momentum=1.0"], "strategy.server_momentum=1.0 is not allowed; it must be in [0, 1)"),
    (["train.max_steps=100"], "train.max_steps=100 counts `fedspec train`'s steps"),
    # data=sst2's recipe: rates for DP-SGD's clipped, noised steps, which diverge without DP
    (["train=large_batch", "privacy=none"], "privacy=none is refused with this training recipe: its rates (train.lr=16"),
    # a simulation's server and clients all run here: a device this machine lacks is refused up front
    (["federation.server_device=cuda:99"], "federation.server_device=cuda:99 but "),
    (["train.device=cuda:99"], "train.device=cuda:99 but "),
])
def test_bad_input_fails_before_anything_runs(capsys, tmp_path, extra, message):
    argv = ["simulate", "--clients", "4", "--output-dir", str(tmp_path), "--name", "bad", *TINY, *extra]
    _fails(capsys, argv, message)
    assert not (tmp_path / "bad").exists()


def test_a_model_folder_without_weights_is_named(capsys, tmp_path):
    from fedspec.models import packaged_minilm_path

    folder = tmp_path / "no-weights"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (packaged_minilm_path() / name).exists():
            (folder / name).write_bytes((packaged_minilm_path() / name).read_bytes())
    argv = ["train", "--output-dir", str(tmp_path), "--name", "bad", *TINY, "model=minilm", f"model.path={folder}"]
    _fails(capsys, argv, f"model weights could not be loaded from the folder {folder}")


def test_an_existing_run_is_not_overwritten(capsys, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.yaml").write_text("x: 1\n")
    _fails(capsys, ["simulate", "--output-dir", str(tmp_path), "--name", "taken", *TINY], "already exists")
    assert (tmp_path / "taken" / "config.yaml").read_text() == "x: 1\n"


def test_centralized_baseline_trains_under_dp_and_reports_its_epsilon(capsys, tmp_path):
    argv = ["train", "--epochs", "2", "--output-dir", str(tmp_path), "--name", "central", *TINY]
    assert main(argv) == 0
    root = tmp_path / "central"
    lines = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in lines if e["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    report = json.loads((root / "privacy" / "report.json").read_text())
    (client,) = report["clients"].values()
    assert len(client["rounds"]) == 2
    assert client["final_epsilon"] <= 8.0
    assert client["final_epsilon"] == pytest.approx(epochs[-1]["epsilon"])
    assert (root / "adapter" / "adapter_model.safetensors").is_file()


def test_fedspec_train_steps_at_the_recipes_centralized_rate_unless_the_command_line_sets_train_lr(capsys, tmp_path):
    from safetensors.torch import load_file

    def adapter(name: str, *overrides: str) -> dict:
        assert main(["train", "--output-dir", str(tmp_path), "--name", name, *TINY, *overrides]) == 0
        return load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)

    # Seeded noise makes runs comparable bit for bit. The clients' rate (99 would wreck a model) does not reach
    # fedspec train once centralized_lr is set ...
    seeded = "privacy.seed_noise=true"
    plain = adapter("plain", seeded, "train.lr=0.5")
    assert same(plain, adapter("recipe", seeded, "train.lr=99", "train.centralized_lr=0.5"))
    assert "sgd lr 0.5, batch 16" in (tmp_path / "recipe" / "summary.md").read_text()
    assert "- device: `cpu`, peak resident memory" in (tmp_path / "recipe" / "summary.md").read_text()
    # ... and data=sst2's recipe (train=large_batch: clients at 16, fedspec train at 0.5) gives way to a train.lr
    # the command line sets: the command line wins (TINY's batch 16 and 2 local steps win over the group's too).
    assert same(plain, adapter("override", seeded, "train=large_batch", "train.lr=0.5"))
    assert "centralized_lr: null" in (tmp_path / "override" / "config.yaml").read_text()


def test_a_dp_sgd_recipe_runs_without_dp_once_the_command_line_chooses_its_rate():
    from fedspec.config import compose_config

    for overrides in (["train=large_batch", "privacy=none", "train.lr=0.5"], ["privacy=none"]):
        cfg = compose_config(overrides)
        assert not cfg.privacy.enabled and not cfg.train.rates_need_dp
    assert compose_config(["train=large_batch"]).train.rates_need_dp  # under DP nothing changes


def test_fedspec_train_max_steps_is_whole_passes_then_the_rest_with_noise_planned_for_them_all(capsys, tmp_path):
    from safetensors.torch import load_file

    from fedspec.centralized import CENTRAL_CLIENT
    from fedspec.privacy import PrivacyLedger, ledger_filename

    def run(name: str, *flags: str) -> tuple[dict, list[int], float]:
        argv = ["train", "--output-dir", str(tmp_path), "--name", name, *TINY, "privacy.seed_noise=true", *flags]
        assert main(argv) == 0
        ledger = PrivacyLedger.load(tmp_path / name / "privacy" / "ledgers" / ledger_filename(CENTRAL_CLIENT))
        adapter = load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
        return adapter, [e.steps for e in ledger.entries], ledger.epsilon()

    _, (per_epoch,), _ = run("one")
    two, steps, _ = run("two", "--epochs", "2")
    assert steps == [per_epoch, per_epoch]
    # max_steps of two whole passes is --epochs 2, bit for bit (seeded noise)
    same, steps_again, _ = run("max", "--max-steps", str(2 * per_epoch))
    assert steps_again == steps and all(same[k].equal(two[k]) for k in two)
    # a pass and 3 steps: the last epoch ends early, and σ is planned for all of them, so ε lands on the target
    _, steps, eps = run("partial", "--max-steps", str(per_epoch + 3))
    assert steps == [per_epoch, 3]
    assert eps == pytest.approx(8.0, abs=0.05) and eps <= 8.0
    assert f"{per_epoch + 3} step(s) in 2 epoch(s)" in (tmp_path / "partial" / "summary.md").read_text()
    capsys.readouterr()
    _fails(capsys, ["train", "--output-dir", str(tmp_path), "--name", "bad", *TINY, "--max-steps", "0"],
           "train.max_steps=0 is not allowed; it must be at least 1")


def test_privacy_report_command_rewrites_the_report_from_the_ledgers(capsys, tmp_path):
    assert main(["train", "--output-dir", str(tmp_path), "--name", "r", *TINY]) == 0
    privacy = tmp_path / "r" / "privacy"
    before = json.loads((privacy / "report.json").read_text())
    for name in ("report.json", "report.md", "epsilon.png"):
        (privacy / name).unlink()
    assert main(["privacy-report", str(tmp_path / "r")]) == 0
    after = json.loads((privacy / "report.json").read_text())
    assert after["clients"] == before["clients"]
    assert (privacy / "epsilon.png").is_file()


def test_privacy_report_rewrite_of_a_centralized_run_keeps_how_many_records_its_statistic_summed(capsys, tmp_path):
    """The count is known only to the run (the rewrite has no calibration data): it used to vanish from the report."""
    assert main(["train", "--output-dir", str(tmp_path), "--name", "eva", *TINY, "adapter=eva"]) == 0
    report = tmp_path / "eva" / "privacy" / "report.json"
    before = json.loads(report.read_text())["extra"]["init_statistics"]
    assert before["examples_total"] > 0
    assert main(["privacy-report", str(tmp_path / "eva")]) == 0
    assert json.loads(report.read_text())["extra"]["init_statistics"] == before


def test_privacy_report_of_a_folder_that_is_not_a_run(capsys, tmp_path):
    _fails(capsys, ["privacy-report", str(tmp_path)], "is not a fedspec run folder")


def test_seeded_centralized_noise_is_seeded_anew_each_epoch():
    """One seed for every epoch drew the same Poisson batches and the same noise in each: the noise added up over
    the epochs instead of averaging out. Each epoch now has its own seed, reproducible from the run's."""
    from fedspec.centralized import _for_epoch
    from fedspec.training import DPSettings

    seeded = DPSettings(1.0, 1.0, "rdp", seed=7)
    seeds = [_for_epoch(seeded, epoch).seed for epoch in (1, 2, 3)]
    assert len(set(seeds)) == 3 and seeds == [_for_epoch(seeded, epoch).seed for epoch in (1, 2, 3)]
    assert _for_epoch(seeded, 2).noise_multiplier == 1.0
    fresh = DPSettings(1.0, 1.0, "rdp")  # OS entropy: nothing to reseed
    assert _for_epoch(fresh, 2) is fresh and _for_epoch(None, 2) is None


def test_a_results_table_piped_to_a_log_keeps_its_headers_whole(capsys):
    """Piped or captured, rich cut the rounds table at 80 columns: "accur…", "rejec…" in every log."""
    from fedspec.cli import _table_console
    from fedspec.server.progress import RoundRow, rounds_table

    row = RoundRow(round=10, train_loss=0.43, eval_accuracy=0.87, eval_loss=0.35, clients=20, max_epsilon=2.999,
                   seconds=123.4, answer_accuracy=None, quarantined=1, bytes_sent=3_000_000, bytes_received=2_900_000)
    _table_console().print(rounds_table([row], title="fedspec simulate"))
    out = capsys.readouterr().out
    for header in ("eval accuracy", "rejected", "max client ε", "sent / received"):
        assert header in out

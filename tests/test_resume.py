"""A server killed at a given point and resumed, in one process: the federation's messages go straight to the
ClientApp's handlers (no Ray), so a kill can land exactly where a test puts it — during round 0, after a round's
aggregation and before its checkpoint — and each test takes seconds. (The whole simulation killed with SIGKILL
and resumed: test_simulation.py.)"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, RecordDict  # noqa: E402

from fedspec.privacy import PrivacyLedger, load_ledgers  # noqa: E402
from fedspec.privacy.client_level import CLIENT_LEVEL_LEDGER_FILE  # noqa: E402

EVA = ["adapter=eva", "strategy=ffa", "adapter.targets=[query,value]", "adapter.rank=4",
       "adapter.calibration_examples=24", "privacy.private_init_stats=true", "privacy.init_noise_multiplier=4.0",
       "privacy.init_max_norm.inputs=1.0"]


class Killed(BaseException):
    """The server process dies here (not an Exception: nothing on the way may catch it)."""


class LocalGrid:
    """One node per client, each answered by the ClientApp's own handlers in this process. A fresh grid is a fresh
    set of client processes: their node state is gone, their ledgers and kept updates on disk stay."""

    def __init__(self, cfg, before=None):
        from fedspec.client.app import local_handlers
        from fedspec.config import config_to_json

        self.handlers = local_handlers(config_to_json(cfg))
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i},
                                          state=RecordDict(), run_config={}) for i in range(cfg.federation.clients)}
        self.ids, self.queue, self.before = itertools.count(), [], before

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            ids.append(f"m{next(self.ids)}")
            message.metadata.__dict__["_message_id"] = ids[-1]  # what the SuperLink does
            self.queue.append(message)
        return ids

    def pull_messages(self, ids):
        replies = []
        for message in [m for m in self.queue if m.metadata.message_id in ids]:
            self.queue.remove(message)
            if self.before is not None:
                self.before(message)
            kind = "train" if message.metadata.message_type == "train" else "query"
            replies.append(self.handlers[kind](message, self.contexts[message.metadata.dst_node_id]))
        return replies


def _run(cfg, before=None) -> bool:
    """Run the federation; False when it was killed."""
    from fedspec.server.federation import Federation

    try:
        Federation(LocalGrid(cfg, before), cfg).run()
    except Killed:
        return False
    return True


def _resume(cfg) -> None:
    cfg = cfg.copy()
    cfg.run.resume = True
    assert _run(cfg)


def _kill_at(monkeypatch, owner, name, when):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            monkeypatch.setattr(owner, name, original)  # one kill: the resumed run goes through
            raise Killed
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def _own_ledgers(root: Path) -> dict[str, list[tuple[int, int]]]:
    return {path.parent.name.removeprefix("client-"): [(e.round, e.attempt) for e in PrivacyLedger.load(path).entries]
            for path in sorted((root / "clients").glob("client-*/ledger.json"))}


def _mirror(root: Path) -> dict[str, list[tuple[int, int]]]:
    return {client: [(e.round, e.attempt) for e in ledger.entries]
            for client, ledger in load_ledgers(root / "privacy" / "ledgers").items()}


@pytest.fixture
def run_cfg(tiny_cfg, flower_task):
    def make(*overrides):
        return tiny_cfg("federation.rounds=1", "federation.fraction=0.5", "train.local_steps=1",
                        "privacy.seed_noise=true", *overrides)

    return make


def test_a_client_level_release_before_the_first_checkpoint_stays_counted_after_a_resume(run_cfg, monkeypatch):
    """The server charges round 1's noised aggregate to the client-level ledger at once (its metrics line comes
    before the checkpoint). Killed before round 1's checkpoint, the resumed run started a new client-level ledger:
    the release before the kill was forgotten, and the report showed one release where there were two."""
    from fedspec.server.federation import Federation

    cfg = run_cfg("privacy=client-dp", "federation.weighting=uniform", "privacy.client_level.noise_multiplier=1.0",
                  "privacy.client_level.target_epsilon=null")  # no client-level budget: round 1 runs again
    _kill_at(monkeypatch, Federation, "_save_checkpoint", lambda self, round_: round_ == 1)
    assert not _run(cfg)
    path = Path(cfg.run.output_dir) / cfg.run.name / "privacy" / CLIENT_LEVEL_LEDGER_FILE
    assert [(e.round, e.attempt) for e in PrivacyLedger.load(path).entries] == [(1, 1)]
    _resume(cfg)
    assert [(e.round, e.attempt) for e in PrivacyLedger.load(path).entries] == [(1, 1), (1, 2)]
    report = json.loads((path.parent / "report.json").read_text())
    assert report["client_level"]["rounds_released"] == 2


def _kill_at_statistics_query(count: int):
    """Kill the server once ``count`` clients have answered round 0's query (their statistics are released)."""
    asked = itertools.count(1)

    def before(message):
        config = message.content.config_records.get("config")
        if config is not None and config.get("calibration-statistics") and next(asked) > count:
            raise Killed

    return before


def test_a_round_zero_statistic_released_again_after_a_resume_is_counted_in_the_mirror(run_cfg):
    """Killed during round 0, after client 0 released its privatized statistic: resumed, round 0 runs again and
    client 0 releases a second one, its ledger's round 0 attempt 2. Its reply did not say so (round 0 replies
    carried no attempt) and the resumed mirror started empty, so the server's mirror — its budget checks and
    the privacy report — counted one release where the client had made two."""
    cfg = run_cfg(*EVA)
    assert not _run(cfg, before=_kill_at_statistics_query(1))
    root = Path(cfg.run.output_dir) / cfg.run.name
    assert _own_ledgers(root) == {"0": [(0, 1)]}
    # its kept statistic lost (a crash between its ledger and that file): it must compute and release a new one
    (root / "clients" / "client-0" / "released-statistics.safetensors").unlink()
    _resume(cfg)
    own = _own_ledgers(root)
    assert own["0"][:2] == [(0, 1), (0, 2)] and all(entries[0] == (0, 1) for entries in own.values())
    assert _mirror(root) == own
    report = json.loads((root / "privacy" / "report.json").read_text())["clients"]
    for client, entries in own.items():
        ledger = PrivacyLedger.load(root / "clients" / f"client-{client}" / "ledger.json")
        assert report[client]["final_epsilon"] == pytest.approx(ledger.epsilon(), rel=1e-9)


@pytest.mark.parametrize("kill", ["in the first evaluation", "before round 1's checkpoint"])
def test_a_server_killed_before_its_first_training_checkpoint_does_not_ask_for_round_zero_again(
        run_cfg, monkeypatch, kill):
    """Round 0 (the clients' privatized statistics and the initialization) is checkpointed before the first
    evaluation. Before, a server killed anywhere before round 1's checkpoint ran round 0 again on resume: every
    client released its statistic a second time (ε above the uninterrupted run's), and with unseeded noise the
    resumed run started from another initialization."""
    from fedspec.server.federation import Federation

    cfg = run_cfg(*EVA)
    if kill == "in the first evaluation":
        _kill_at(monkeypatch, Federation, "_evaluate_start", lambda self: True)
    else:
        _kill_at(monkeypatch, Federation, "_save_checkpoint", lambda self, round_: round_ == 1)
    assert not _run(cfg)
    root = Path(cfg.run.output_dir) / cfg.run.name
    trained = {client for client, entries in _own_ledgers(root).items() if (1, 1) in entries}
    _resume(cfg)
    own = _own_ledgers(root)
    assert sorted(own) == ["0", "1", "2", "3"]  # one statistic each, round 1 once for those sampled
    assert all(entries in ([(0, 1)], [(0, 1), (1, 1)]) for entries in own.values())
    assert trained <= {client for client, entries in own.items() if (1, 1) in entries}
    assert _mirror(root) == own
    lines = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert [line["kind"] for line in lines].count("init") == 1
    rounds = [line["round"] for line in lines if line["kind"] == "round"]
    assert rounds == ([0, 1] if kill == "in the first evaluation" else [0, 1, 1])  # round 0 evaluated once


@pytest.mark.parametrize("damage", ["torn meta.json", "meta.json without its round", "torn state", "no state file"])
def test_a_damaged_checkpoint_is_named_with_the_way_out_and_nothing_is_deleted(tmp_path, damage):
    """Checkpoints are written whole (a temporary folder, then a rename), so a damaged one was damaged afterwards
    (a disk error, a hand edit). Before, the resume died on a JSONDecodeError or SafetensorError traceback, or
    silently went back to an older round and then wrote over the damaged folder."""
    import torch

    from fedspec.errors import FedspecError
    from fedspec.server.checkpoint import load_checkpoint, save_checkpoint

    folder = tmp_path / "checkpoints"
    for round_ in (0, 1, 2):
        save_checkpoint(folder, round_, {"w": torch.full((2,), float(round_))}, {"rows": []})
    newest = folder / "round-0002"
    if damage == "torn meta.json":
        (newest / "meta.json").write_text('{"round": 2, "ro')
    elif damage == "meta.json without its round":
        (newest / "meta.json").write_text('{"rows": []}')
    elif damage == "torn state":
        (newest / "state.safetensors").write_bytes(b"\0" * 5)
    else:
        (newest / "state.safetensors").unlink()
    files = sorted(p.name for p in newest.iterdir())
    with pytest.raises(FedspecError) as refused:
        load_checkpoint(folder)
    message = str(refused.value)
    assert f"checkpoint {newest}" in message and "move it out of" in message and "round 1" in message
    assert "\n" not in message
    assert sorted(p.name for p in newest.iterdir()) == files  # nothing deleted
    (newest.rename(tmp_path / "kept"))
    assert load_checkpoint(folder).round == 1 and torch.equal(load_checkpoint(folder).state["w"], torch.ones(2))


def test_resume_refuses_a_seed_the_run_did_not_start_with(tiny_cfg):
    """`fedspec simulate --resume --seed 7` continued the run with its own seed and said nothing: every run.* key
    was taken for where and how to run, but run.seed decides the partition, the sampling and the init."""
    from fedspec.config import save_config
    from fedspec.errors import ConfigError
    from fedspec.rundir import run_paths
    from fedspec.simulations.driver import _resume_config

    cfg = tiny_cfg()
    paths = run_paths(cfg)
    paths.root.mkdir(parents=True)
    save_config(cfg, paths.config)
    given = tiny_cfg("run.seed=7", "run.progress=true", "run.resume=true")
    with pytest.raises(ConfigError, match=r"run.seed=7 \(the run has 0\)") as refused:
        _resume_config(given, paths, ["run.seed=7", "run.progress=true", "run.resume=true"])
    assert "run.progress" not in str(refused.value) and "run.resume" not in str(refused.value)
    assert _resume_config(tiny_cfg("run.progress=true"), paths, ["run.progress=true", "run.seed=0"]).run.progress


def test_a_deployed_server_refuses_to_resume_with_other_settings_than_the_run_started_with(run_cfg):
    """Under `flwr run` the server's config is the run_config's overrides, and the docs say to resume with the same
    ones plus run.resume=true; other ones were used as given: the run went on with another learning rate (or
    rounds, or privacy settings) than its checkpoints and ledgers were made with, without a word."""
    from fedspec.errors import ConfigError
    from fedspec.server.federation import Federation

    cfg = run_cfg("adapter=lora")
    assert _run(cfg)
    resumed = run_cfg("adapter=lora", "train.lr=0.5", "federation.rounds=3", "run.resume=true")
    with pytest.raises(ConfigError) as refused:
        Federation(LocalGrid(resumed), resumed)
    message = str(refused.value)
    assert "federation.rounds=3 (the run has 1)" in message and "train.lr=0.5 (the run has 1.0)" in message
    assert "\n" not in message
    again = run_cfg("adapter=lora", "run.resume=true", "run.progress=true")  # where and how to run may change
    Federation(LocalGrid(again), again)


def test_a_round_zero_asked_for_again_gets_the_same_statistic_at_no_new_cost(run_cfg):
    """A server killed during round 0 asks again on resume: a client that had answered sends the statistic it
    released then (unseeded noise: the same noised sums), so its ledger, and the initialization, are those of the
    uninterrupted run. Before, it computed and released a new one, a second round-0 release in its ε."""
    from fedspec.client.statistics import client_statistics

    cfg = run_cfg(*EVA, "privacy.seed_noise=false")

    def fresh_process():
        return Context(run_id=1, node_id=100, node_config={"partition-id": 0}, state=RecordDict(), run_config={})

    first, metrics = client_statistics(cfg, fresh_process())
    again, metrics_again = client_statistics(cfg, fresh_process())
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert metrics_again == metrics and metrics["attempt"] == 1
    assert _own_ledgers(Path(cfg.run.output_dir) / cfg.run.name) == {"0": [(0, 1)]}
    other = run_cfg(*EVA, "privacy.seed_noise=false", "privacy.init_noise_multiplier=5.0")
    _, metrics_other = client_statistics(other, fresh_process())  # other settings: a new, counted release
    assert metrics_other["attempt"] == 2
    reseeded = run_cfg(*EVA, "privacy.seed_noise=false", "privacy.init_noise_multiplier=5.0", "run.seed=1")
    assert client_statistics(reseeded, fresh_process())[1]["attempt"] == 3  # another seed sums other records


def test_a_round_run_again_after_a_resume_is_listed_once_in_the_privacy_report(tiny_cfg):
    """metrics.jsonl is append-only: a round logged before a kill and run again after the resume has its declined,
    rejected and late replies twice. The report listed them twice ("client 3 (round 2, 2)")."""
    from fedspec.rundir import MetricsLog, run_paths
    from fedspec.server.reports import rewrite_run_privacy_report

    cfg = tiny_cfg()
    paths = run_paths(cfg)
    paths.privacy.mkdir(parents=True)
    log = MetricsLog(paths.metrics)
    for _ in range(2):  # round 2 before the kill, and again after the resume
        log.write("client-declined", round=2, client_id=1, epsilon=7.9)
        log.write("client-quarantined", round=2, node=103, client=3, reason="bad")
        log.write("client-error", round=2, node=102, client=2, reason="no reply within federation.round_timeout=5s")
    report = rewrite_run_privacy_report(cfg, paths)
    assert (report["declined"], report["quarantined"], report["timed_out"]) == ({"1": [2]}, {"3": [2]}, {"2": [2]})
    assert "round 2, 2" not in (paths.privacy / "report.md").read_text()


def test_a_round_zero_answered_again_after_its_mirror_was_saved_is_counted_once(run_cfg, monkeypatch):
    """Killed after round 0's replies were mirrored to disk, before the initialization was checkpointed: resumed,
    round 0 runs again and every client sends the statistic it released (attempt 1). The mirror must hold one
    release each, as the clients' own ledgers do, not the saved one plus the same one again."""
    from fedspec.server.federation import Federation

    cfg = run_cfg(*EVA)
    _kill_at(monkeypatch, Federation, "_initialize", lambda self, nodes, calibration, backbone: True)
    assert not _run(cfg)
    root = Path(cfg.run.output_dir) / cfg.run.name
    assert _mirror(root) == _own_ledgers(root) == {client: [(0, 1)] for client in "0123"}
    _resume(cfg)
    own = _own_ledgers(root)
    assert all(entries[0] == (0, 1) and (0, 2) not in entries for entries in own.values())
    assert _mirror(root) == own


def test_one_comparison_serves_both_resumes_scoped_to_what_the_command_line_set(tiny_cfg):
    """`fedspec simulate --resume` compares only what its command line sets (the rest is taken from the run), a
    deployed server the whole tree: one function does both, and a group override compares every key of the group."""
    from fedspec.config import config_differences

    saved = tiny_cfg("adapter.targets=[query,value]")
    given = tiny_cfg("train.lr=0.123", "run.seed=7", "run.name=elsewhere", "adapter.rank=2", "adapter.targets=[query]")
    everything = config_differences(given, saved)
    assert any(change.startswith("train.lr=0.123 (the run has ") for change in everything)
    assert any(change.startswith("adapter.rank=2 ") for change in everything)
    assert not any(change.startswith("run.name=") for change in everything)  # where a run is, not what it computes
    assert "adapter.targets.1=None (the run has value)" in everything  # a list, item by item
    assert [c.split("=")[0] for c in config_differences(given, saved, only=["train"])] == ["train.lr"]
    assert [c.split("=")[0] for c in config_differences(given, saved, only=["run.seed", "adapter"])] == \
        ["adapter.rank", "adapter.targets.1", "run.seed"]
    assert config_differences(given, saved, only=["train.l", "data"]) == []  # a key's prefix is no scope

"""End to end on Flower's simulation runtime (Ray): a tiny federation, its run folder, its privacy accounting,
and resuming it from a checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fedspec.adapters import load_adapter
from fedspec.builders import build_task, encode
from fedspec.models import build_classifier
from fedspec.privacy import PrivacyLedger, epsilon, load_ledgers
from fedspec.rundir import MetricsLog
from fedspec.simulations.driver import simulate
from fedspec.training import evaluate

ROUNDS = 3
OVERRIDES = [
    "model=tiny-bert", "data.num_examples=400", "data.eval_examples=64", "data.min_client_examples=8",
    "federation.clients=4", f"federation.rounds={ROUNDS}", "federation.fraction=0.5",
    "train.local_steps=2", "train.batch_size=16", "privacy.seed_noise=true", "run.name=sim", "run.progress=false",
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One 4-client, 3-round federation with seeded noise, shared by the tests below."""
    from fedspec.config import compose_config

    out = tmp_path_factory.mktemp("runs")
    cfg = compose_config([*OVERRIDES, f"run.output_dir={out}"])
    result = simulate(cfg)
    return cfg, result


def _rounds(paths):
    return [r for r in MetricsLog(paths.metrics).read() if r["kind"] == "round"]


def test_run_folder_holds_config_metrics_adapter_checkpoints_and_privacy_report(finished_run):
    _, result = finished_run
    root = result.paths.root
    for name in ("config.yaml", "metrics.jsonl", "summary.md", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json", "privacy/report.json", "privacy/report.md", "privacy/epsilon.png",
                 f"checkpoints/round-{ROUNDS:04d}/state.safetensors"):
        assert (root / name).is_file(), name
    assert [r["round"] for r in _rounds(result.paths)] == list(range(ROUNDS + 1))
    clients = [r for r in MetricsLog(result.paths.metrics).read() if r["kind"] == "client"]
    assert len(clients) == ROUNDS * 2  # fraction 0.5 of 4 clients each round
    # Each client says where it trained (train.device=auto: the CPU here), its peak memory and its time per step.
    assert all(c["cuda"] == 0 and c["peak_memory_mib"] > 0 and 0 < c["step_seconds"] <= c["train_seconds"]
               for c in clients)
    # Communication: what each client received (the global trained tensors, plus A and the head once) and sent
    # back (its update), summed per round and over the run.
    assert all(c["bytes_received"] == c["update_bytes"] > 0 and c["bytes_sent"] >= c["update_bytes"] for c in clients)
    for row in _rounds(result.paths)[1:]:
        mine = [c for c in clients if c["round"] == row["round"]]
        assert row["bytes_sent"] == sum(c["bytes_sent"] for c in mine)
        assert row["bytes_received"] == sum(c["bytes_received"] for c in mine)
    summary = (root / "summary.md").read_text()
    assert "- communication: " in summary
    # ... and the summary says where the run computed (clients 0-3 each sampled at least once over the run).
    trained = len({c["client_id"] for c in clients})
    assert f"- compute: the server evaluated on `cpu`; clients trained {trained} on their CPU, median " in summary


def test_every_reported_epsilon_covers_all_steps_so_far(finished_run):
    cfg, result = finished_run
    clients = [r for r in MetricsLog(result.paths.metrics).read() if r["kind"] == "client"]
    history: dict[int, list] = {}
    for row in clients:  # in round order
        history.setdefault(row["client_id"], []).append((row["noise_multiplier"], row["sample_rate"], row["steps"]))
        expected = epsilon(history[row["client_id"]], cfg.privacy.delta, cfg.privacy.accountant)
        assert row["epsilon"] == pytest.approx(expected, rel=1e-9)
        assert row["steps"] == cfg.train.local_steps
    # The server's mirror, each client's own ledger and the report agree.
    mirror = load_ledgers(result.paths.ledgers)
    report = json.loads((result.paths.privacy / "report.json").read_text())
    for client, entries in history.items():
        own = PrivacyLedger.load(result.paths.clients / f"client-{client}" / "ledger.json")
        assert own.history() == mirror[str(client)].history() == entries
        assert report["clients"][str(client)]["final_epsilon"] == pytest.approx(own.epsilon(), rel=1e-9)
        assert own.epsilon() <= cfg.privacy.target_epsilon


def test_final_adapter_reloads_on_a_fresh_model_with_the_servers_accuracy(finished_run):
    cfg, result = finished_run
    task = build_task(cfg.data, cfg.run.seed)
    model, tokenizer = build_classifier(cfg.model, task.num_classes, seed=cfg.run.seed)
    load_adapter(model, result.paths.adapter)
    inputs, labels = encode(tokenizer, task.eval, cfg.model.max_length)
    accuracy = evaluate(model, inputs, labels)["accuracy"]
    assert accuracy == pytest.approx(_rounds(result.paths)[-1]["eval_accuracy"], abs=1e-6)


def test_predict_labels_the_held_out_texts_with_the_servers_accuracy_and_class_names(finished_run):
    from fedspec.trained import classify, load_trained

    cfg, result = finished_run
    task = build_task(cfg.data, cfg.run.seed)
    run = load_trained(result.paths.root)
    assert run.labels == task.eval.label_names  # saved beside the adapter by the server
    predictions = classify(run, task.eval.texts)
    correct = [p.label == task.eval.label_names[y] for p, y in zip(predictions, task.eval.labels)]
    assert sum(correct) / len(correct) == pytest.approx(_rounds(result.paths)[-1]["eval_accuracy"], abs=1e-6)
    assert all(sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-5) for p in predictions)


@pytest.mark.parametrize("crash", ["before the last round", "writing the last round's checkpoint"])
def test_a_resumed_run_reports_what_an_uninterrupted_run_does(finished_run, tmp_path, crash):
    """Roll a copy of the finished run back to the state right after round 2's checkpoint, resume it, and compare
    with the uninterrupted run: same model (the server's momentum and FedSVD's rotation shortcut continue as they
    were), same ε. Either the server crashed before sending round 3 (no ledger holds it), or round 3's checkpoint
    failed to write (disk full) after the ledgers were saved: the clients answer round 3 again with the update
    they released, and the server's mirror must not count it twice."""
    cfg, result = finished_run
    copy = tmp_path / "sim"
    shutil.copytree(result.paths.root, copy)
    shutil.rmtree(copy / "checkpoints" / f"round-{ROUNDS:04d}")
    if crash == "before the last round":
        ledgers = list((copy / "clients").glob("client-*/ledger.json")) + list((copy / "privacy" / "ledgers").glob("*.json"))
        for path in ledgers:
            data = json.loads(path.read_text())
            data["entries"] = [e for e in data["entries"] if e["round"] < ROUNDS]
            path.write_text(json.dumps(data))
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line).get("round", 0) < ROUNDS]
    cut_short = ""
    if crash == "writing the last round's checkpoint":  # the full disk also cut round 3's first log line short
        cut_short = next(line for line in lines if json.loads(line).get("round", 0) == ROUNDS)[:40]
    (copy / "metrics.jsonl").write_text("\n".join(kept) + "\n" + cut_short)

    resumed_cfg = cfg.copy()
    resumed_cfg.run.output_dir = str(tmp_path)
    resumed_cfg.run.resume = True
    resumed = simulate(resumed_cfg)
    assert resumed.paths.root == copy  # the copy resumed (not the folder the run started in)
    assert [r["round"] for r in _rounds(resumed.paths)] == list(range(ROUNDS + 1))  # round 3 ran again, once
    repaired = [r for r in MetricsLog(resumed.paths.metrics).read() if r["kind"] == "log-repaired"]
    assert [r["cut"] for r in repaired] == ([cut_short] if cut_short else [])  # cut off, noted, nothing glued to it

    original = json.loads((result.paths.privacy / "report.json").read_text())["clients"]
    again = json.loads((resumed.paths.privacy / "report.json").read_text())["clients"]
    assert {c: v["final_epsilon"] for c, v in again.items()} == pytest.approx(
        {c: v["final_epsilon"] for c, v in original.items()}, rel=1e-9)
    from safetensors.torch import load_file

    a = load_file(str(result.paths.adapter / "adapter_model.safetensors"))
    b = load_file(str(resumed.paths.adapter / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit for bit
    # summary.md agrees with itself: the privacy line's max ε is the round table's last max client ε
    from fedspec.privacy.accounting import epsilon_text

    summary = (resumed.paths.root / "summary.md").read_text()
    last = _rounds(resumed.paths)[-1]
    shown = epsilon_text(last["max_epsilon"])
    assert f"max {shown}" in summary and f"| {shown} |" in summary


def test_a_setting_given_with_resume_that_the_run_does_not_have_is_refused_not_dropped(finished_run):
    """`--resume --rounds 10` cannot extend a run whose noise was planned for 3 rounds: it used to be dropped
    without a word. Settings equal to the run's, and where and how to run (run.*), are fine."""
    from fedspec.config import compose_config
    from fedspec.errors import ConfigError

    cfg, result = finished_run
    given = [*OVERRIDES[:-2], "federation.rounds=10", "adapter=lora", "run.progress=false"]
    resumed = compose_config([*given, f"run.output_dir={cfg.run.output_dir}", "run.name=sim", "run.resume=true"])
    with pytest.raises(ConfigError) as refused:
        simulate(resumed, overrides=given)
    message = str(refused.value)
    assert "federation.rounds=10 (the run has 3)" in message and "adapter.method=lora (the run has pissa)" in message
    assert "federation.clients" not in message and "run." not in message.split("sets", 1)[1]
    assert "\n" not in message


def _client_workers() -> list[int]:
    """The process ids of this process's Ray ClientApp workers (Ray titles them ``ray::ClientAppActor…``; the
    Ray cluster ray.init started is a subtree of this process — other simulations on the machine are not)."""
    parents, titles = {}, {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
                titles[int(proc.name)] = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            parents[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])

    def ours(pid: int) -> bool:
        while pid > 1:
            if pid == os.getpid():
                return True
            pid = parents.get(pid, 0)
        return False

    return [pid for pid, title in titles.items() if title.startswith(b"ray::ClientAppActor") and ours(pid)]


def _rounds_so_far(metrics: Path) -> list[dict]:
    lines = metrics.read_text().splitlines()[:-1]  # the last line may be half-written
    return [r for r in map(json.loads, lines) if r["kind"] == "round"]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds Ray's workers through /proc")
def test_a_worker_killed_mid_run_is_replaced_and_every_client_trains_again(tiny_cfg):
    """What the out-of-memory killer does to a simulation: one ClientApp worker dies after round 1. Ray starts a
    fresh one and runs the lost message there; no round loses a client (before: every later message routed to
    the dead worker failed, for the rest of the run)."""
    cfg = tiny_cfg("federation.rounds=3", "federation.fraction=1.0", "federation.client_cpus=1")
    metrics = Path(cfg.run.output_dir) / cfg.run.name / "metrics.jsonl"
    killed: list[int] = []

    def kill_a_worker_after_round_one():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if metrics.is_file() and any(r["round"] >= 1 for r in _rounds_so_far(metrics)):
                workers = _client_workers()
                if workers:
                    os.kill(workers[0], signal.SIGKILL)
                    killed.append(workers[0])
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker_after_round_one, daemon=True)
    killer.start()
    result = simulate(cfg)
    killer.join(timeout=5)
    assert killed, "no ClientApp worker was found to kill"
    rows = _rounds(result.paths)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert [r["clients"] for r in rows[1:]] == [4, 4, 4]  # the lost message ran again on the fresh worker


def _released(run_root: Path, round_: int) -> list[str]:
    """The clients whose kept update (client/released.py) is from this round."""
    from safetensors import safe_open

    found = []
    for path in (run_root / "sim" / "clients").glob("client-*/released.safetensors"):
        try:
            with safe_open(str(path), framework="pt") as handle:
                if (handle.metadata() or {}).get("round") == str(round_):
                    found.append(path.parent.name)
        except Exception:  # noqa: BLE001 - mid-rename or not yet written: not this round's yet
            continue
    return found


@pytest.mark.slow
def test_a_server_killed_mid_run_resumes_bit_for_bit_and_reports_every_attempt(finished_run, tmp_path):
    """kill -9 of the whole simulation (server, Ray, clients) once round 2 is checkpointed, then --resume: the
    adapter equals the uninterrupted run's bit for bit, and the report shows each client the ε of the uninterrupted
    run, which is what its own ledger says: a client that answered round 3 before the kill answers it again with
    the update it released then (client/released.py), so nothing is trained or counted twice."""
    _, result = finished_run
    command = [sys.executable, "-m", "fedspec.cli", "simulate", *OVERRIDES, f"run.output_dir={tmp_path}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 600
    # killed as soon as a client has answered round 3, before the server can aggregate it: resumed, the server asks
    # that client for round 3 again
    checkpointed = tmp_path / "sim" / "checkpoints" / "round-0002" / "meta.json"
    while not checkpointed.is_file() or not _released(tmp_path, 3):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "round 2 was never checkpointed, or no client answered round 3"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    resumed = subprocess.run([*command, "run.resume=true"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    from safetensors.torch import load_file

    root = tmp_path / "sim"
    a = load_file(str(result.paths.adapter / "adapter_model.safetensors"))
    b = load_file(str(root / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    uninterrupted = json.loads((result.paths.privacy / "report.json").read_text())["clients"]
    report = json.loads((root / "privacy" / "report.json").read_text())["clients"]
    for client, entry in report.items():
        expected = uninterrupted[client]["final_epsilon"]
        assert entry["final_epsilon"] == pytest.approx(expected, rel=1e-9), client
        ledger_file = root / "clients" / f"client-{client}" / "ledger.json"
        if ledger_file.is_file():  # a client never sampled has no ledger of its own
            own = PrivacyLedger.load(ledger_file)
            assert entry["final_epsilon"] == pytest.approx(own.epsilon(), rel=1e-9), client
            assert all(e.attempt == 1 for e in own.entries), f"{client} trained a round twice"
    assert _rounds(type("Paths", (), {"metrics": root / "metrics.jsonl"}))[-1]["round"] == ROUNDS


def test_a_seed_given_with_resume_that_the_run_does_not_have_is_refused(tmp_path):
    """run.seed draws the partition, the client sampling and the initialization: `--resume --seed 5` on a run that
    started with seed 0 used to be dropped without a word, as if it said where or how to run."""
    from fedspec.config import compose_config, save_config
    from fedspec.errors import ConfigError
    from fedspec.rundir import RunPaths
    from fedspec.simulations.driver import _resume_config

    base = [*OVERRIDES, f"run.output_dir={tmp_path}"]
    (tmp_path / "sim").mkdir()
    save_config(compose_config(base), tmp_path / "sim" / "config.yaml")
    paths = RunPaths(tmp_path / "sim")
    given = ["run.seed=5", "run.progress=true"]
    with pytest.raises(ConfigError, match=r"run.seed=5 \(the run has 0\)"):
        _resume_config(compose_config([*base, *given, "run.resume=true"]), paths, given)
    same = ["run.seed=0", "run.progress=true", f"run.output_dir={tmp_path}"]
    resumed = _resume_config(compose_config([*base, *same, "run.resume=true"]), paths, same)
    assert resumed.run.seed == 0 and resumed.run.progress and resumed.run.resume


def test_resuming_a_centralized_run_is_refused_before_it_overwrites_it(tmp_path):
    """`fedspec simulate --resume --name <a fedspec train run>` used to start a federation in that folder (no
    checkpoint: from round 1) and overwrite the baseline's adapter, summary and privacy report."""
    from fedspec.config import compose_config, save_config
    from fedspec.errors import ConfigError
    from fedspec.rundir import MetricsLog

    base = [*OVERRIDES, f"run.output_dir={tmp_path}"]
    root = tmp_path / "sim"
    root.mkdir()
    save_config(compose_config(base), root / "config.yaml")
    MetricsLog(root / "metrics.jsonl").write("epoch", epoch=0, train_loss=None, eval_accuracy=0.25)
    (root / "summary.md").write_text("the baseline\n")
    with pytest.raises(ConfigError, match="is a `fedspec train` run"):
        simulate(compose_config([*base, "run.resume=true"]), overrides=[])
    assert (root / "summary.md").read_text() == "the baseline\n"

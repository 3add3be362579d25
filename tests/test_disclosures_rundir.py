"""What the privacy report says the server sees, and where a run may write."""

from __future__ import annotations

import pytest

from fedspec.adapters import METHODS
from fedspec.errors import ConfigError
from fedspec.privacy.disclosures import init_uses_client_data


@pytest.mark.parametrize("method", sorted(METHODS))
def test_only_data_driven_initializations_are_reported_as_using_client_data(method):
    uses_data, needs = init_uses_client_data(method)
    assert uses_data == bool(METHODS[method].calibration), needs
    assert uses_data == (method in {"corda", "eva", "lora_ga", "fwsvd"})


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "/tmp/elsewhere"])
def test_a_run_name_cannot_leave_the_output_folder(tiny_cfg, name):
    from fedspec.rundir import run_paths

    cfg = tiny_cfg()
    cfg.run.name = name
    with pytest.raises(ConfigError, match="run.name"):
        run_paths(cfg)


def test_an_unwritable_output_folder_is_refused_before_the_run_starts(tiny_cfg, tmp_path, monkeypatch):
    import os

    from fedspec.rundir import check_run_dir

    cfg = tiny_cfg()
    cfg.run.name = "r"
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg.run.output_dir = str(blocker / "runs")  # its would-be parent is a file
    with pytest.raises(ConfigError, match="a-file is not a folder, so the run folder .* cannot be written"):
        check_run_dir(cfg)
    cfg.run.output_dir = str(tmp_path / "read-only" / "runs")
    (tmp_path / "read-only").mkdir()
    # Permission bits do not bind root (the test machine's user): ask os.access as an unprivileged user would answer
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).endswith("read-only"))
    with pytest.raises(ConfigError, match="read-only is not writable.*choose another run.output_dir"):
        check_run_dir(cfg)
    assert not (tmp_path / "read-only" / "runs").exists()  # nothing was created


def test_a_checkpoint_is_fsynced_file_by_file_and_its_rename_too(tmp_path, monkeypatch):
    import os

    import torch

    from fedspec.privacy import atomic
    from fedspec.server.checkpoint import load_checkpoint, save_checkpoint

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                        real_fsync(fd)))
    save_checkpoint(tmp_path / "checkpoints", 3, {"w": torch.ones(2)}, {"rows": []})
    files = [path for path in synced if ".tmp" in path]  # each written as a temporary file, fsynced, renamed
    assert any("/round-0003.tmp/.state" in path for path in files) and any("/round-0003.tmp/.meta" in path for path in files)
    assert synced[-1] == str(tmp_path / "checkpoints")  # the folder, after the rename into round-0003
    assert load_checkpoint(tmp_path / "checkpoints").round == 3


def test_a_failed_checkpoint_write_ends_the_run_with_one_line_naming_the_fix(tmp_path):
    from types import SimpleNamespace

    from fedspec.errors import FedspecError
    from fedspec.server.federation import Federation

    def full_disk(round_):
        raise OSError(28, "No space left on device")

    server = SimpleNamespace(_write_checkpoint=full_disk, paths=SimpleNamespace(root=tmp_path / "run"))
    with pytest.raises(FedspecError) as failure:
        Federation._save_checkpoint(server, 5)
    assert str(failure.value) == (f"could not write round 5's checkpoint under {tmp_path / 'run'}: No space left on "
                                  "device; free the disk or fix the folder, then continue with --resume (from round 4)")


def test_a_round_logged_twice_across_a_resume_is_shown_once_with_its_last_result(tmp_path):
    from fedspec.cli import _round_rows
    from fedspec.rundir import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    row = {"train_loss": 0.5, "eval_loss": 0.7, "clients": 2, "max_epsilon": 1.0, "seconds": 1.0}
    for round_, accuracy in ((0, 0.5), (1, 0.6), (2, 0.7), (2, 0.75), (3, 0.8)):  # crashed before round 2's checkpoint
        log.write("round", round=round_, eval_accuracy=accuracy, **row)
    rows = _round_rows(type("Paths", (), {"metrics": tmp_path / "metrics.jsonl"}))
    assert [(r.round, r.eval_accuracy) for r in rows] == [(0, 0.5), (1, 0.6), (2, 0.75), (3, 0.8)]


def test_a_line_a_crash_cut_short_is_cut_off_when_the_resumed_run_appends(tmp_path, caplog):
    """Disk full or power loss mid-write leaves a partial last line. The resumed run's first line used to be glued
    onto it: both lost, and the final reports, after every round had trained, could not read the log."""
    from fedspec.rundir import MetricsLog
    from fedspec.server.reports import _reply_history

    path = tmp_path / "metrics.jsonl"
    MetricsLog(path).write("round", round=1, eval_accuracy=0.5)
    MetricsLog(path).write("client", round=2, client_id=3, epsilon=1.2)
    whole = path.read_bytes()
    path.write_bytes(whole[:-15])  # the run died mid-line
    fragment = whole[whole.index(b"\n") + 1:-15]
    resumed = MetricsLog(path)
    resumed.write("client-quarantined", round=2, node=7, client=3, reason="tensor 'w' holds NaN or Inf")
    resumed.write("round", round=2, eval_accuracy=0.6)
    lines = resumed.read()
    assert [line["kind"] for line in lines] == ["round", "log-repaired", "client-quarantined", "round"]
    assert (lines[1]["cut_bytes"], lines[1]["cut"]) == (len(fragment), fragment.decode())  # a note of what was cut
    assert f"{path} ended in a partial line" in caplog.text
    assert _reply_history(type("Paths", (), {"metrics": path}))[0] == {"3": [2]}  # as write_final_reports reads it


def test_reading_skips_a_cut_short_last_line_and_names_a_damaged_line_before_it(tmp_path, caplog):
    from fedspec.errors import DataError
    from fedspec.rundir import MetricsLog

    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for round_ in (1, 2):
        log.write("round", round=round_, eval_accuracy=0.5)
    whole = path.read_bytes()
    path.write_bytes(whole + '{"kind": "client", "reason": "\u20ac'.encode()[:-1])  # cut inside a UTF-8 character
    assert [line["round"] for line in log.read()] == [1, 2]
    assert f"{path} line 3 is not whole" in caplog.text
    path.write_bytes(whole.replace(b'"kind": "round",', b'"kind": "round"', 1))
    with pytest.raises(DataError, match=r"metrics.jsonl line 1 is not a JSON object, and more lines follow it"):
        log.read()


def test_rejected_replies_and_traffic_reach_the_summary_and_the_privacy_report(tiny_cfg, tmp_path):
    from fedspec.privacy.report import build_privacy_report, render_markdown
    from fedspec.server.progress import RoundRow, byte_size
    from fedspec.server.reports import summary_markdown

    report = build_privacy_report({}, delta=1e-5, accountant="rdp", record_level=False, quarantined={"2": [3, 1]})
    assert report["quarantined"] == {"2": [1, 3]}
    assert "Replies the server rejected" in render_markdown(report) and "2 (round 1, 3)" in render_markdown(report)
    assert "never past the budget" not in render_markdown(report)  # no budget was enforced: no cap to name
    capped = build_privacy_report({}, delta=1e-5, accountant="rdp", record_level=False, timed_out={"2": [3]},
                                  quarantined={"1": [2]}, extra={"budget_epsilon": 3.0})
    # what the server's copy lacks is in the clients' own ledgers, which they check against the budget every round
    assert render_markdown(capped).count("(never past the budget ε ≤ 3 each client enforces)") == 2
    rows = [RoundRow(0, None, 0.5, 0.7, 0, None, 1.0),
            RoundRow(1, 0.6, 0.6, 0.6, 3, 1.0, 2.0, quarantined=1, bytes_sent=3 * 150536, bytes_received=2 * 150536)]
    summary = summary_markdown(tiny_cfg(), rows, report, None)
    assert "- rejected replies: 1" in summary
    assert "- communication: 441 KiB sent to clients, 294 KiB received from them over 1 round" in summary
    assert byte_size(150536) == "147 KiB" and byte_size(900) == "900 B" and byte_size(3 * 2**20) == "3.0 MiB"
    assert "| 441 / 294 KiB |" in summary  # the round table's column
    assert "(Dirichlet α = " in summary
    assert "- data: `synthetic` (iid)\n" in summary_markdown(tiny_cfg("data.partition=iid"), rows, report, None)


def test_a_round_the_server_never_mirrored_still_reaches_the_clients_final_epsilon(tiny_cfg, tmp_path):
    """Client 1's reply of round 2 came late: the server's copy of its ledger has round 1 only, but the client
    trained round 2, and said so in round 3's reply (its own ε). The report shows the larger ε, says where it came
    from, and names the round that timed out; client 0, whose copy agrees with what it stated, is unchanged."""
    from fedspec.privacy import PrivacyLedger
    from fedspec.rundir import MetricsLog, run_paths
    from fedspec.server.reports import write_run_privacy_report

    cfg = tiny_cfg()
    paths = run_paths(cfg)
    paths.privacy.mkdir(parents=True)
    own = {c: PrivacyLedger(c, delta=cfg.privacy.delta) for c in ("0", "1")}
    mirror = {c: PrivacyLedger(c, delta=cfg.privacy.delta) for c in ("0", "1")}
    log = MetricsLog(paths.metrics)
    for round_ in (1, 2, 3):
        for client in ("0", "1"):
            own[client].record(round_, 1.0, 0.1, 4)
            if (client, round_) == ("1", 2):
                log.write("client-error", round=2, node=11, client=1, reason="no reply within "
                          "federation.round_timeout=60s")
                continue
            mirror[client].record(round_, 1.0, 0.1, 4)
            log.write("client", round=round_, client_id=int(client), epsilon=own[client].epsilon())
    report = write_run_privacy_report(cfg, paths, mirror)
    clients = report["clients"]
    assert clients["1"]["final_epsilon"] == own["1"].epsilon() > mirror["1"].epsilon()
    assert clients["1"]["final_from_client"] and "final_from_client" not in clients["0"]
    assert clients["0"]["final_epsilon"] == own["0"].epsilon() == mirror["0"].epsilon()
    assert report["summary"]["max_epsilon"] == own["1"].epsilon() and report["timed_out"] == {"1": [2]}
    text = (paths.privacy / "report.md").read_text()
    assert "did not answer a round in time: 1 (round 2)" in text and "Final ε of client 1 as the client stated" in text


def test_progress_notes_are_printed_verbatim():
    """A note carries paths and reasons from elsewhere (a rejected round's error, a stop reason): rich used to read
    their [words] as markup, dropped from the line, and :x: as an emoji."""
    from io import StringIO

    from rich.console import Console

    from fedspec.server.progress import FederationProgress

    out = StringIO()
    note = "resuming runs/[2024]/sim after round 3: weights [q_proj] :x:"
    FederationProgress(3, console=Console(file=out, width=200)).note(note)
    assert note in out.getvalue()

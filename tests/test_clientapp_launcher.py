"""fedspec node's ClientApp launcher: Flower's SuperExec hands it each `flwr-clientapp` start, it forks a
pre-imported one, and anything it cannot take is started the way Flower starts it."""

from __future__ import annotations

import inspect
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedspec.client.launcher import CLIENTAPP_COMMAND, request_start


@pytest.fixture
def launcher(tmp_path):
    """A real launcher process; its output (and its children's) goes to a file the test reads."""
    socket, log = tmp_path / "clientapp.sock", tmp_path / "launcher.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fedspec.client.launcher", "--socket", str(socket)],
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not socket.exists():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    yield socket, log
    proc.terminate()
    proc.wait(timeout=30)


def _wait_for(log: Path, text: str, seconds: float) -> float:
    started = time.monotonic()
    while text not in log.read_text():
        assert time.monotonic() - started < seconds, log.read_text()
        time.sleep(0.02)
    return time.monotonic() - started


def test_a_forked_clientapp_runs_flowers_entry_point_without_importing_again(launcher):
    socket, log = launcher
    assert request_start(socket, ["--help"])
    # Flower's own argument parser answered, from a child that had everything imported (a fresh process needs
    # ~1.2 s of imports on an idle machine before it gets that far)
    assert _wait_for(log, "Run a Flower ClientApp", 30) < 30
    assert request_start(socket, ["--help"])  # the launcher goes on serving after a child exits


def test_an_absent_or_refusing_launcher_lets_flower_start_the_app(launcher, tmp_path):
    import socket as sockets

    assert not request_start(tmp_path / "nobody.sock", ["--help"])
    socket, _ = launcher
    with sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM) as conn:
        conn.connect(str(socket))
        conn.sendall(b'{"args": [1, 2]}\n')  # not a list of strings
        assert conn.makefile("rb").readline() == b"refused\n"


def test_superexec_routes_only_clientapp_starts_to_the_launcher(launcher):
    from fedspec.client.superexec import routed_subprocess

    socket, log = launcher
    view = routed_subprocess(str(socket))
    assert view.Popen([CLIENTAPP_COMMAND, "--help"]) is None
    _wait_for(log, "Run a Flower ClientApp", 30)
    other = view.Popen([sys.executable, "-c", "pass"])
    assert other.wait(timeout=60) == 0 and view.DEVNULL == subprocess.DEVNULL


def test_the_supernode_starts_fedspecs_superexec_and_nothing_else_changes():
    from fedspec.client.supernode import superexec_via_fedspec

    calls = []
    view = superexec_via_fedspec(lambda args, *a, **k: calls.append(args))
    view.Popen(["flower-superexec", "--insecure"])
    view.Popen(["something-else", "--x"])
    assert calls == [[sys.executable, "-m", "fedspec.client.superexec", "--insecure"], ["something-else", "--x"]]


def test_flower_still_starts_both_processes_by_name_through_its_modules_subprocess():
    """What the wiring relies on in Flower 1.42: a new release that changes it fails here, not on a node."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.superexec.executor import subprocess_executor
    from flwr.supernode import start_client_internal

    assert TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] == CLIENTAPP_COMMAND
    assert "subprocess.Popen(" in inspect.getsource(subprocess_executor.SubprocessExecutor)
    source = inspect.getsource(start_client_internal)
    assert 'command = ["flower-superexec"]' in source and "subprocess.Popen(command)" in source


def test_object_pulls_retry_after_a_short_wait_and_still_back_off(monkeypatch):
    """A forked ClientApp asks for its message before the SuperNode has its objects: the first retry must not
    wait Flower's 1 s. Checked through the real pull loop, with an object that arrives on the third ask."""
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects

    from fedspec.client.object_pulls import FIRST_WAIT_SECONDS, shorten_object_pull_waits

    for function in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        monkeypatch.setitem(function.__kwdefaults__, "initial_backoff", function.__kwdefaults__["initial_backoff"])
    shorten_object_pull_waits()
    asks = []

    def pull(object_id):
        asks.append(time.monotonic())
        if len(asks) < 3:
            raise ObjectUnavailableError(object_id)
        return b"content"

    assert pull_objects(["x"], pull) == {"x": b"content"}
    waits = [b - a for a, b in zip(asks, asks[1:])]
    assert FIRST_WAIT_SECONDS * 0.7 < waits[0] < 0.5 and waits[1] > waits[0] * 1.3  # short first, then doubling
    assert inflatable_utils.pull_and_inflate_object_from_tree.__kwdefaults__["initial_backoff"] == FIRST_WAIT_SECONDS

"""`fedspec superlink` / `fedspec node`: the Flower commands they run carry TLS, node authentication, the warm
worker and the safe environment, and --insecure is refused off loopback. (The deployment test runs them.)"""

from __future__ import annotations

import shlex
import sys
import time

import pytest
import torch

from fedspec.cli import main
from fedspec.deployment import create_credentials
from fedspec.errors import ConfigError
from fedspec.launch import IDLE_POLL_ENV, LAUNCHER_ENV, SAFE_ENV, node_launch, superlink_launch


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    return create_credentials(tmp_path_factory.mktemp("creds"), nodes=1)


def test_superlink_runs_with_tls_node_auth_and_a_state_database(creds, tmp_path):
    launch = superlink_launch(creds.root, host="0.0.0.0", port=8000, state_dir=tmp_path, insecure=False)
    [(name, command)] = launch.commands
    assert name == "superlink" and command[0].endswith("flower-superlink")
    for flag, value in (("--ssl-ca-certfile", creds.ca_cert), ("--ssl-certfile", creds.server_cert),
                        ("--ssl-keyfile", creds.server_key), ("--database", tmp_path / "superlink.db")):
        assert command[command.index(flag) + 1] == str(value)
    assert "--enable-supernode-auth" in command and "--disable-runtime-dependency-installation" in command
    assert "--insecure" not in command
    assert launch.env["FLWR_TELEMETRY_ENABLED"] == "0" and launch.env["FLWR_DISABLE_UPDATE_CHECK"] == "1"


def test_node_starts_its_warm_worker_first_and_names_its_socket(creds, tmp_path, monkeypatch):
    data = tmp_path / "mine.jsonl"
    data.write_text("{}\n")
    launch = node_launch("link.example.org:8000", partition_id=3, ca=creds.ca_cert, key=creds.node_key(0),
                         state_dir=tmp_path / "state", data_path=data, port=9100, num_partitions=None, warm=True,
                         insecure=False)
    (worker_name, worker), (launcher_name, launcher), (node_name, node) = launch.commands
    assert (worker_name, launcher_name, node_name) == ("worker", "launcher", "supernode")
    socket = tmp_path / "state" / "worker.sock"
    assert worker[1:] == ["worker", "--socket", str(socket)] and launch.wait_for["worker"] == socket
    launcher_socket = tmp_path / "state" / "clientapp.sock"
    assert launcher[1:] == ["-m", "fedspec.client.launcher", "--socket", str(launcher_socket)]
    assert launch.wait_for["launcher"] == launcher_socket and launch.env[LAUNCHER_ENV] == str(launcher_socket)
    config = shlex.split(node[node.index("--node-config") + 1])
    assert config == ["partition-id=3", f"state-dir={tmp_path / 'state'}", f"data-path={data}", f"worker={socket}"]
    def on_gpu_node(device: str):
        return node_launch("link.example.org:8000", partition_id=3, ca=creds.ca_cert, key=creds.node_key(0),
                           state_dir=tmp_path / "state", data_path=None, port=9100, num_partitions=2, warm=False,
                           insecure=False, device=device)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a node with two GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    gpu = on_gpu_node("cuda:1")
    assert "device=cuda:1" in shlex.split(gpu.commands[-1][1][gpu.commands[-1][1].index("--node-config") + 1])
    with pytest.raises(ConfigError, match="--device=cuda:2 but this machine has 2 CUDA device"):
        on_gpu_node("cuda:2")  # refused when the node starts, not at its first round
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--device=cuda but torch sees no CUDA device"):
        on_gpu_node("cuda")
    with pytest.raises(ConfigError, match="--id -1: a node's client id is 0 or more"):
        node_launch("link.example.org:8000", partition_id=-1, ca=creds.ca_cert, key=creds.node_key(0),
                    state_dir=tmp_path / "state", data_path=None, port=9100, num_partitions=2, warm=False,
                    insecure=False)
    with pytest.raises(ConfigError, match="--device gpu"):
        node_launch("link.example.org:8000", partition_id=3, ca=creds.ca_cert, key=creds.node_key(0),
                    state_dir=tmp_path / "state", data_path=None, port=9100, num_partitions=2, warm=False,
                    insecure=False, device="gpu")
    assert node[node.index("--root-certificates") + 1] == str(creds.ca_cert)
    assert node[node.index("--auth-supernode-private-key") + 1] == str(creds.node_key(0))
    cold = node_launch("link:8000", partition_id=0, ca=creds.ca_cert, key=creds.node_key(0), state_dir=tmp_path,
                       data_path=None, port=9094, num_partitions=2, warm=False, insecure=False)
    assert [name for name, _ in cold.commands] == ["launcher", "supernode"]
    bare = node_launch("link:8000", partition_id=0, ca=creds.ca_cert, key=creds.node_key(0), state_dir=tmp_path,
                       data_path=None, port=9094, num_partitions=2, warm=False, insecure=False, launcher=False)
    assert [name for name, _ in bare.commands] == ["supernode"] and LAUNCHER_ENV not in bare.env


@pytest.mark.parametrize("host, allowed", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                           ("0.0.0.0", False), ("10.1.2.3", False), ("link.example.org", False)])
def test_insecure_is_allowed_on_loopback_only(host, allowed, tmp_path):
    def both():
        superlink_launch(None, host=host, port=8000, state_dir=tmp_path, insecure=True)
        node_launch(f"{host}:8000", partition_id=0, ca=None, key=None, state_dir=tmp_path, data_path=None,
                    port=9094, num_partitions=None, warm=False, insecure=True)

    if allowed:
        both()
    else:
        with pytest.raises(ConfigError, match="loopback"):
            both()


def test_cli_dry_run_prints_the_commands_and_missing_credentials_fail_in_one_line(creds, tmp_path, capsys):
    assert main(["superlink", "--credentials", str(creds.root), "--state-dir", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "flower-superlink" in out and all(f"{k}={v}" in out for k, v in SAFE_ENV.items())
    assert main(["node", "--superlink", "h:8000", "--id", "0", "--state-dir", str(tmp_path), "--dry-run"]) == 2
    assert "give --ca" in capsys.readouterr().err
    assert main(["superlink", "--credentials", str(tmp_path / "none"), "--dry-run"]) == 2
    assert "ca.crt does not exist" in capsys.readouterr().err


def test_the_node_runs_flower_supernode_with_a_shorter_idle_poll(creds, tmp_path):
    launch = node_launch("link:8000", partition_id=0, ca=creds.ca_cert, key=creds.node_key(0), state_dir=tmp_path,
                         data_path=None, port=9094, num_partitions=2, warm=False, insecure=False, idle_poll=0.25,
                         launcher=False)
    (_, node), = launch.commands
    assert node[1:3] == ["-m", "fedspec.client.supernode"] and launch.env[IDLE_POLL_ENV] == "0.25"
    with pytest.raises(ConfigError, match="--idle-poll 5: choose between 0.05 and 3 seconds"):
        node_launch("link:8000", partition_id=0, ca=creds.ca_cert, key=creds.node_key(0), state_dir=tmp_path,
                    data_path=None, port=9094, num_partitions=2, warm=False, insecure=False, idle_poll=5)


def test_the_capped_clock_shortens_only_flowers_idle_sleep():
    import inspect

    from flwr.supernode import start_client_internal

    from fedspec.client.supernode import capped_clock, idle_poll_seconds

    # What the entry point relies on: Flower's idle loop sleeps 3 s through the module's own `time`.
    assert "time.sleep(3)" in inspect.getsource(start_client_internal)
    clock = capped_clock(0.05)
    started = time.monotonic()
    clock.sleep(3)
    assert time.monotonic() - started < 1.0
    assert clock.monotonic is time.monotonic and clock.time is time.time
    assert idle_poll_seconds({}) == 3.0 and idle_poll_seconds({IDLE_POLL_ENV: "0.5"}) == 0.5
    for bad in ("fast", "0", "10"):
        with pytest.raises(SystemExit, match=IDLE_POLL_ENV):
            idle_poll_seconds({IDLE_POLL_ENV: bad})


def test_a_socket_left_by_a_stopped_node_is_cleared_before_its_process_starts(tmp_path):
    """SIGTERM leaves worker.sock behind: at the next start it read as ready before the new worker listened. The
    stale file is removed first; a socket another running process listens on is refused."""
    import socket
    import sys

    from fedspec.launch import Launch, run

    path, seen = tmp_path / "worker.sock", tmp_path / "seen"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    worker = (f"import os, socket, time; open({str(seen)!r}, 'w').write(str(os.path.exists({str(path)!r}))); "
              f"s = socket.socket(socket.AF_UNIX); s.bind({str(path)!r}); s.listen(); time.sleep(0.5)")
    launch = Launch(commands=[("worker", [sys.executable, "-c", worker])], wait_for={"worker": path})
    assert run(launch, tmp_path) == 0
    assert seen.read_text() == "False"  # started with the stale file gone, then ready once it listened
    path.unlink()
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen()
        with pytest.raises(ConfigError, match="another process already listens on"):
            run(launch, tmp_path)


def test_a_socket_path_that_names_another_file_is_refused_never_deleted(tmp_path):
    """Only a stale Unix socket is cleared before a node's process starts; a file in its place stays, refused."""
    from fedspec.launch import Launch, run

    path = tmp_path / "worker.sock"
    path.write_text("not a socket")
    launch = Launch(commands=[("worker", [sys.executable, "-c", "pass"])], wait_for={"worker": path})
    with pytest.raises(ConfigError, match="is not a Unix socket"):
        run(launch, tmp_path)
    assert path.read_text() == "not a socket"


def test_a_state_folder_others_can_write_to_is_refused_and_a_new_one_is_private(tmp_path):
    """The node's worker and launcher sockets (and the SuperLink's database of node keys) live in the state folder:
    in one that others can write to (say under /tmp), another user could bind the socket path after the worker
    stopped, and the ClientApp would forward the node's state to it. Such a folder is refused; a new one is 0700."""
    import os
    import stat

    from fedspec.launch import Launch, run

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    launch = Launch(commands=[("worker", [sys.executable, "-c", "pass"])], folders=[shared])
    with pytest.raises(ConfigError, match="writable by other users"):
        run(launch, tmp_path)
    fresh = tmp_path / "fresh" / "state"
    assert run(Launch(commands=[("worker", [sys.executable, "-c", "pass"])], folders=[fresh]), tmp_path) == 0
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700

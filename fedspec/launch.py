"""`fedspec superlink` and `fedspec node`: Flower's SuperLink and SuperNode started with fedspec's settings.

Each command builds the raw Flower command line (``--dry-run`` prints it) and runs it with safe defaults: TLS and
SuperNode authentication on (``--insecure`` is refused unless every address is loopback), runtime dependency
installation, telemetry and update checks off, a state folder, and for a node its warm worker (``fedspec worker``)
started first, so the model and data stay loaded between rounds, and its ClientApp launcher
(``fedspec.client.launcher``), so no message waits for a fresh process to import Flower. The processes run in the foreground; Ctrl-C or
SIGTERM stops them all, and when one exits the others are stopped too. No Flower import: these are processes.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import DEVICE_PATTERN
from .errors import ConfigError

SAFE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",  # SuperExec picks up a node's message 10× sooner than its 1 s
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}
WORKER_START_SECONDS = 180.0
IDLE_POLL_ENV = "FEDSPEC_NODE_IDLE_POLL"  # read by fedspec.client.supernode (a Flower module: not imported here)
LAUNCHER_ENV = "FEDSPEC_CLIENTAPP_LAUNCHER"  # the launcher's socket, read by fedspec.client.supernode and .superexec
DEFAULT_IDLE_POLL = 0.5  # seconds an idle node waits before asking the SuperLink again (Flower's own: 3)


@dataclass
class Launch:
    """Processes to start in order; ``wait_for`` a file a process creates when it is ready (the worker's socket)."""

    commands: list[tuple[str, list[str]]] = field(default_factory=list)
    wait_for: dict[str, Path] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=lambda: dict(SAFE_ENV))
    folders: list[Path] = field(default_factory=list)  # created before anything starts (state folders)

    def describe(self) -> str:
        lines = [f"{k}={v}" for k, v in self.env.items()]
        return "\n".join(["# environment", *lines, *(f"# {name}\n{shlex.join(cmd)}" for name, cmd in self.commands)])


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: {what}")
    return path


def _binary(name: str) -> str:
    """The Flower binary installed beside this Python (the same environment as fedspec), else from PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else name


def superlink_launch(credentials: Path | None, *, host: str, port: int, state_dir: Path, insecure: bool) -> Launch:
    state_dir = Path(state_dir).expanduser().resolve()
    command = [_binary("flower-superlink"), "--host", host, "--port", str(port),
               "--disable-runtime-dependency-installation", "--database", str(state_dir / "superlink.db")]
    if insecure:
        if not _is_loopback(host):
            raise ConfigError(f"--insecure on {host}: without TLS anyone on the network could read and send updates; "
                              "it is allowed on loopback only (--host 127.0.0.1). Use --credentials DIR")
        command.append("--insecure")
    else:
        if credentials is None:
            raise ConfigError("give --credentials DIR (written by `fedspec credentials`), or --insecure on loopback")
        creds = Path(credentials).expanduser().resolve()
        command += ["--ssl-ca-certfile", str(_require(creds / "ca.crt", "the CA certificate")),
                    "--ssl-certfile", str(_require(creds / "server.pem", "the SuperLink's certificate")),
                    "--ssl-keyfile", str(_require(creds / "server.key", "the SuperLink's key")),
                    "--enable-supernode-auth"]
    return Launch([("superlink", command)], folders=[state_dir])


def node_launch(superlink: str, *, partition_id: int, ca: Path | None, key: Path | None, state_dir: Path,
                data_path: Path | None, port: int, num_partitions: int | None, warm: bool, insecure: bool,
                idle_poll: float = DEFAULT_IDLE_POLL, launcher: bool = True, device: str | None = None) -> Launch:
    if partition_id < 0:  # the server would only say that the reply "states no client id"
        raise ConfigError(f"--id {partition_id}: a node's client id is 0 or more (its partition of the task)")
    state_dir = Path(state_dir).expanduser().resolve()
    host = superlink.rsplit(":", 1)[0]
    config = [f"partition-id={partition_id}", f'state-dir="{state_dir}"']
    if device is not None:
        if not DEVICE_PATTERN.fullmatch(device):
            raise ConfigError(f"--device {device}: choose auto, cpu, cuda or cuda:N")
        from .devices import resolve_device  # imports torch: only when a node names its device

        resolve_device(device, "--device")  # a GPU this machine lacks: refused now, not at the first round
        config.append(f'device="{device}"')
    if num_partitions is not None:
        config.append(f"num-partitions={num_partitions}")
    if data_path is not None:
        data = _require(Path(data_path).expanduser().resolve(), "this node's data file")
        config.append(f'data-path="{data}"')
    launch = Launch(folders=[state_dir])
    if warm:
        socket = state_dir / "worker.sock"
        config.append(f'worker="{socket}"')
        launch.commands.append(("worker", [_binary("fedspec"), "worker", "--socket", str(socket)]))
        launch.wait_for["worker"] = socket
    if launcher:  # Flower starts a process per message; the launcher forks a pre-imported one (client/launcher.py)
        launcher_socket = state_dir / "clientapp.sock"
        launch.commands.append(("launcher", [sys.executable, "-m", "fedspec.client.launcher",
                                             "--socket", str(launcher_socket)]))
        launch.wait_for["launcher"] = launcher_socket
        launch.env[LAUNCHER_ENV] = str(launcher_socket)
    # Flower's flower-supernode, through fedspec's entry point that shortens its idle poll (client/supernode.py).
    if not 0.05 <= idle_poll <= 3.0:
        raise ConfigError(f"--idle-poll {idle_poll:g}: choose between 0.05 and 3 seconds (Flower's own is 3)")
    launch.env[IDLE_POLL_ENV] = f"{idle_poll:g}"
    command = [sys.executable, "-m", "fedspec.client.supernode", "--superlink", superlink, "--host", "127.0.0.1",
               "--port", str(port), "--node-config", " ".join(config)]
    if insecure:
        if not _is_loopback(host):
            raise ConfigError(f"--insecure to {superlink}: updates would cross the network in the clear; it is "
                              "allowed for a loopback SuperLink only. Give --ca ca.crt --key node-<i>")
        command.append("--insecure")
    else:
        if ca is None or key is None:
            raise ConfigError("give --ca (the federation's ca.crt) and --key (this node's private key, "
                              "supernodes/node-<i> from `fedspec credentials`), or --insecure on loopback")
        command += ["--root-certificates", str(_require(Path(ca).expanduser().resolve(), "the CA certificate")),
                    "--auth-supernode-private-key", str(_require(Path(key).expanduser().resolve(), "this node's key"))]
    launch.commands.append(("supernode", command))
    return launch


def listening(path: Path) -> bool:
    """Whether a process accepts connections on the Unix socket ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def remove_stale_socket(path: Path, busy: str) -> None:
    """Remove a Unix socket file nobody listens on any more (left by a stopped process), so a new one can bind
    there. Anything else at ``path`` is refused, never deleted: a mistyped ``--socket`` may name the user's data
    file (or a folder), and a socket another process listens on is in use (``busy`` says by whom)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{path} exists and is not a Unix socket: it is left as it is; choose another socket path")
    if listening(path):
        raise ConfigError(f"another process already listens on {path}{busy}")
    path.unlink()


def _clear_stale_socket(path: Path, name: str) -> None:
    """A socket file left by a stopped process (SIGTERM does not remove it) would read as ready before the new
    process listens; one another process still listens on is another node's, in the same folder."""
    remove_stale_socket(path, f" (a {name} of another `fedspec node` in this folder?); stop it, or start this "
                              "node in another folder")


def _state_folder(folder: Path) -> None:
    """A state folder only its owner can write to: created 0700, refused when it exists writable by others. Anyone
    who can write there can put their own socket in place of the node's worker or launcher socket (the ClientApp
    would then hand that process the node's state and its Flower token) or replace the SuperLink's database of
    registered node keys."""
    if not folder.exists():
        try:
            folder.mkdir(parents=True)
            os.chmod(folder, 0o700)
        except OSError as error:
            raise ConfigError(f"cannot create the state folder {folder}: {error.strerror or error}") from None
    if stat.S_IMODE(folder.stat().st_mode) & 0o022:
        raise ConfigError(f"{folder} is writable by other users; keep the state folder one only you can write to "
                          f"(chmod go-w {folder}, or choose another --state-dir)")


def run(launch: Launch, workdir: Path) -> int:
    """Start the processes in order, wait for each to be ready, then until one exits; stop the rest."""
    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    for folder in launch.folders:
        _state_folder(folder)
    env = {**os.environ, **launch.env}
    started: list[tuple[str, subprocess.Popen]] = []

    def stop_all(*_):
        for _, proc in reversed(started):
            if proc.poll() is None:
                proc.terminate()
        for _, proc in reversed(started):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()

    previous = {sig: signal.signal(sig, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt)) for sig in (signal.SIGTERM,)}
    try:
        for name, command in launch.commands:
            if name in launch.wait_for:
                _clear_stale_socket(launch.wait_for[name], name)
            print(f"fedspec: starting {name}: {shlex.join(command)}", file=sys.stderr, flush=True)
            started.append((name, subprocess.Popen(command, env=env, cwd=workdir)))
            ready = launch.wait_for.get(name)
            deadline = time.monotonic() + WORKER_START_SECONDS
            while ready is not None and not ready.exists():
                if started[-1][1].poll() is not None or time.monotonic() > deadline:
                    raise ConfigError(f"{name} did not start (no {ready}); see its output above")
                time.sleep(0.2)
        while True:
            for name, proc in started:
                if proc.poll() is not None:
                    print(f"fedspec: {name} exited with {proc.returncode}; stopping the others", file=sys.stderr)
                    return proc.returncode
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 130
    finally:
        stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

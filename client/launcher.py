"""A pre-imported `flwr-clientapp`, forked per message, for ``fedspec node``: the per-message start-up cost goes.

Flower 1.42's SuperExec starts a fresh ``flwr-clientapp`` process for every message a SuperNode receives (its
subprocess executor; the warm executor pools serve AgentApp, model and connector tasks on Kubernetes only, not
ClientApps). That process spends ~1.2 s importing Flower before it can even ask for the message — more than the
warm worker needs to answer a train message. The launcher imports Flower's ``flwr-clientapp`` and fedspec's
ClientApp once and waits on a Unix socket; for every message SuperExec would start, it forks a child that runs
Flower's own ``flwr-clientapp`` entry point with the same arguments. The child starts with everything imported.

Wiring (``fedspec node`` sets it up): the SuperNode (``fedspec.client.supernode``) starts SuperExec through
``fedspec.client.superexec`` when ``FEDSPEC_CLIENTAPP_LAUNCHER`` names the launcher's socket; that SuperExec hands
each ``flwr-clientapp`` start to the launcher instead of spawning it, and spawns it as Flower does whenever the
launcher does not answer. The launcher never opens a gRPC channel itself, so its children fork from a process
without gRPC threads.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

CLIENTAPP_COMMAND = "flwr-clientapp"
ANSWER_SECONDS = 5.0  # a launcher that does not answer within this is treated as absent (Flower spawns the app)
_MAX_REQUEST_BYTES = 64 * 1024


def module_view(module, **replacements) -> SimpleNamespace:
    """A module's attributes with some replaced: how fedspec changes what one Flower module calls (the view is
    assigned to that module's global name for it, e.g. its ``subprocess`` or ``time``; every other module keeps the
    real one)."""
    view = SimpleNamespace(**{name: getattr(module, name) for name in dir(module) if not name.startswith("__")})
    for name, value in replacements.items():
        setattr(view, name, value)
    return view


def request_start(socket_path: str | os.PathLike[str], args: list[str]) -> bool:
    """Ask the launcher to start ``flwr-clientapp args…``; False when it is absent or refuses (start it yourself)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(ANSWER_SECONDS)
            conn.connect(os.fspath(socket_path))
            conn.sendall(json.dumps({"args": list(args)}).encode() + b"\n")
            return conn.makefile("rb").readline().strip() == b"started"
    except (OSError, ValueError):
        return False


def serve(socket_path: Path) -> None:
    """Import, then fork one ``flwr-clientapp`` per request, forever (SIGTERM / Ctrl-C end it)."""
    # A process that forks should have one thread: numpy's OpenBLAS would start a pool at import. (The children
    # only forward messages to the warm worker; a cold one imports torch, whose own pools are unaffected.)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from flwr.supernode.cli import flwr_clientapp  # noqa: F401  (the imports are the point: children inherit them)

    import fedspec.client.app  # noqa: F401

    from .object_pulls import shorten_object_pull_waits

    shorten_object_pull_waits()  # a forked ClientApp asks for its message at once: see object_pulls.py

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel: no zombies, no waiting
    socket_path = Path(socket_path)
    from fedspec.launch import remove_stale_socket

    remove_stale_socket(socket_path, ": a launcher of this node is running already")  # never another file
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        previous = os.umask(0o177)  # the socket is its owner's only
        try:
            server.bind(os.fspath(socket_path))
        finally:
            os.umask(previous)
        server.listen(16)
        threads = _thread_count()
        if threads != 1:  # forking a process with other threads can leave the child with locks nobody releases
            print(f"fedspec launcher: warning: {threads} threads before forking", file=sys.stderr, flush=True)
        print(f"fedspec launcher: ready on {socket_path}", file=sys.stderr, flush=True)
        while True:
            conn, _ = server.accept()
            with conn:
                args = _read_request(conn)
                if args is None:
                    _answer(conn, b"refused\n")
                    continue
                child = os.fork()
                if child == 0:  # the child: Flower's flwr-clientapp, with everything already imported
                    server.close()
                    conn.close()
                    _run_clientapp(args)
                _answer(conn, b"started\n")
                print(f"fedspec launcher: flwr-clientapp forked (pid {child})", file=sys.stderr, flush=True)


def _answer(conn: socket.socket, answer: bytes) -> None:
    """A requester that hung up is no reason to stop serving."""
    try:
        conn.sendall(answer)
    except OSError:
        pass


def _thread_count() -> int:
    """The process's OS threads (native ones too, on Linux), else its Python threads."""
    tasks = Path("/proc/self/task")
    return len(list(tasks.iterdir())) if tasks.is_dir() else threading.active_count()


def _read_request(conn: socket.socket) -> list[str] | None:
    conn.settimeout(ANSWER_SECONDS)
    try:
        line = conn.makefile("rb").readline(_MAX_REQUEST_BYTES)
        args = json.loads(line)["args"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return args if isinstance(args, list) and all(isinstance(a, str) for a in args) else None


def _run_clientapp(args: list[str]) -> None:
    """In the forked child: run Flower's entry point and leave with its exit status, never back into the loop."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    started, code = time.monotonic(), 0
    try:
        from flwr.supernode.cli import flwr_clientapp

        sys.argv = [CLIENTAPP_COMMAND, *args]
        flwr_clientapp()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException as error:  # noqa: BLE001 — a child must never return into the launcher's loop
        print(f"fedspec launcher: flwr-clientapp failed: {error!r}", file=sys.stderr, flush=True)
        code = 1
    finally:
        print(f"fedspec launcher: flwr-clientapp (pid {os.getpid()}) exited with {code} after "
              f"{time.monotonic() - started:.2f} s", file=sys.stderr, flush=True)
        sys.stdout.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedspec.client.launcher", description=__doc__.split("\n")[0])
    parser.add_argument("--socket", type=Path, required=True, help="the Unix socket to listen on")
    args = parser.parse_args(argv)
    try:
        serve(args.socket)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

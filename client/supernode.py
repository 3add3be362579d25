"""Flower's SuperNode (``flower-supernode``) with a shorter idle poll, for ``fedspec node``.

An idle SuperNode in Flower 1.42 asks the SuperLink for a message, and when there is none sleeps 3 s before asking
again (a constant in ``flwr.supernode.start_client_internal``, no flag or variable sets it). Every message of a
round therefore waits 1.5 s on average, up to 3 s, before a node even sees it; secure aggregation's four exchanges
per round pay it four times. This entry point runs Flower's own ``flower_supernode`` unchanged except that the idle
sleep lasts ``FEDSPEC_NODE_IDLE_POLL`` seconds (``fedspec node --idle-poll``). Only that module's view of
``time`` is changed: every other sleep shorter than the cap (its 0.5 s waits) is left as it is. A shorter poll costs
one small gRPC request per interval per idle node on the SuperLink.

With ``FEDSPEC_CLIENTAPP_LAUNCHER`` set (``fedspec node`` sets it), the SuperExec this node starts is
``fedspec.client.superexec``, which hands every ClientApp start to fedspec's pre-imported launcher
(``fedspec.client.launcher``) instead of spawning a fresh ``flwr-clientapp`` process.
"""

from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace

from fedspec.client.launcher import module_view
from fedspec.launch import IDLE_POLL_ENV, LAUNCHER_ENV

FLOWER_IDLE_POLL = 3.0  # seconds: Flower 1.42's hard-coded idle sleep


def idle_poll_seconds(environ: dict | None = None) -> float:
    """The idle poll from the environment (Flower's 3 s when unset); a clear error for a bad value."""
    raw = (os.environ if environ is None else environ).get(IDLE_POLL_ENV)
    if raw is None:
        return FLOWER_IDLE_POLL
    try:
        seconds = float(raw)
    except ValueError:
        raise SystemExit(f"{IDLE_POLL_ENV}={raw!r} must be a number of seconds") from None
    if not 0.05 <= seconds <= FLOWER_IDLE_POLL:
        raise SystemExit(f"{IDLE_POLL_ENV}={raw!r} must be between 0.05 and {FLOWER_IDLE_POLL:g} seconds")
    return seconds


def capped_clock(cap: float) -> SimpleNamespace:
    """The ``time`` module as ``start_client_internal`` sees it: every attribute is the real one, but no sleep
    lasts longer than ``cap``."""
    return module_view(time, sleep=lambda seconds: time.sleep(min(seconds, cap)))


def superexec_via_fedspec(real_popen=None) -> SimpleNamespace:
    """``subprocess`` as ``start_client_internal`` sees it: its ``flower-superexec`` starts as
    ``fedspec.client.superexec`` (the same SuperExec, handing ClientApp starts to fedspec's launcher)."""
    import subprocess

    real_popen = real_popen or subprocess.Popen

    def popen(args, *rest, **kwargs):
        if args and args[0] == "flower-superexec":
            args = [sys.executable, "-m", "fedspec.client.superexec", *args[1:]]
        return real_popen(args, *rest, **kwargs)

    return module_view(subprocess, Popen=popen)


def main() -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    from fedspec.client.object_pulls import shorten_object_pull_waits

    start_client_internal.time = capped_clock(idle_poll_seconds())
    shorten_object_pull_waits()
    if os.environ.get(LAUNCHER_ENV):
        start_client_internal.subprocess = superexec_via_fedspec()
    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()

"""Flower's SuperNode (``flower-supernode``) with a shorter idle poll, for ``fedspec node``.

An idle SuperNode in Flower 1.42 asks the SuperLink for a message, and when there is none sleeps 3 s before asking
again (a constant in ``flwr.supernode.start_client_internal``, no flag or variable sets it). Every message of a
round therefore waits 1.5 s on average, up to 3 s, before a node even sees it; secure aggregation's four exchanges
per round pay it four times. This entry point runs Flower's own ``flower_supernode`` unchanged except that the idle
sleep lasts ``FEDSPEC_NODE_IDLE_POLL`` seconds (``fedspec node --idle-poll``). Only that module's view of
``time`` is changed: every other sleep shorter than the cap (its 0.5 s waits) is left as it is. A shorter poll costs
one small gRPC request per interval per idle node on the SuperLink.
"""

from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace

from fedspec.launch import IDLE_POLL_ENV

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
    clock = SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("__")})
    clock.sleep = lambda seconds: time.sleep(min(seconds, cap))
    return clock


def main() -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    start_client_internal.time = capped_clock(idle_poll_seconds())
    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()

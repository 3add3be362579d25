"""Shorter waits for message contents that are still on their way (Flower 1.42's object pulls).

A Flower message travels as a tree of objects pulled hop by hop (SuperLink → SuperNode → ClientApp, and replies
back). A SuperNode stores a message *before* its objects have arrived, so the ClientApp that SuperExec starts for
it can ask for objects that are not there yet; ``pull_objects`` then waits 1 s (``PULL_INITIAL_BACKOFF``, doubling
up to 10 s) before asking again. A fresh ``flwr-clientapp`` process spends longer than that importing Flower, so
the wait rarely showed; a ClientApp forked by fedspec's launcher asks at once and paid about 1 s per message
(measured: 1.26 s of a 1.42 s ClientApp run on an idle machine, 1.22 s of it waiting). The first wait here is
50 ms, still doubling to Flower's 10 s cap: a few more requests to the local SuperNode while objects arrive.
"""

from __future__ import annotations

FIRST_WAIT_SECONDS = 0.05


def shorten_object_pull_waits(first_wait: float = FIRST_WAIT_SECONDS) -> None:
    """Make every object pull of this process (ClientApp, SuperNode, ServerApp) retry after ``first_wait``."""
    from flwr.supercore.inflatable import inflatable_utils

    for function in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        function.__kwdefaults__["initial_backoff"] = first_wait

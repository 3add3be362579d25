"""Flower's SuperExec (``flower-superexec``), handing each ``flwr-clientapp`` start to fedspec's launcher.

Started by ``fedspec.client.supernode`` in place of ``flower-superexec`` when ``FEDSPEC_CLIENTAPP_LAUNCHER`` is set
(``fedspec node`` sets it). Everything is Flower's own except how its subprocess executor starts a ClientApp:
it asks the launcher (``fedspec.client.launcher``) to fork a pre-imported one, and spawns ``flwr-clientapp`` as
Flower does when the launcher does not answer. Only that module's view of ``subprocess`` is changed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

from fedspec.client.launcher import CLIENTAPP_COMMAND, module_view, request_start
from fedspec.launch import LAUNCHER_ENV


def routed_subprocess(socket_path: str) -> SimpleNamespace:
    """``subprocess`` as Flower's subprocess executor sees it: ``Popen`` of ``flwr-clientapp`` goes to the launcher
    first; everything else is the real module."""

    def popen(args, *rest, **kwargs):
        if args and args[0] == CLIENTAPP_COMMAND and request_start(socket_path, list(args[1:])):
            return None  # the executor keeps no handle on the process it starts
        return subprocess.Popen(args, *rest, **kwargs)

    return module_view(subprocess, Popen=popen)


def main() -> None:
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.superexec.executor import subprocess_executor

    socket_path = os.environ.get(LAUNCHER_ENV)
    if socket_path:
        subprocess_executor.subprocess = routed_subprocess(socket_path)
    sys.argv[0] = "flower-superexec"
    sys.exit(flower_superexec())


if __name__ == "__main__":
    main()

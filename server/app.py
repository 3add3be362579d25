"""The Flower ServerApp.

``app`` is what ``flwr run`` loads (``[tool.flwr.app.components]``): its config comes from the run_config's Hydra
overrides. ``fedspec simulate`` builds its own instance with :func:`build_server_app`, handing it the resolved
config as one JSON string (``fedspec.config.config_to_json``).
"""

from __future__ import annotations

from logging import INFO

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedspec.config import config_from_run_config
from fedspec.rundir import check_run_dir


def build_server_app(config_json: str | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedspec.client.object_pulls import shorten_object_pull_waits

        from .federation import run_federation

        shorten_object_pull_waits()  # replies are pulled from the SuperLink as their objects arrive
        cfg = config_from_run_config(dict(context.run_config), config_json, run_id=context.run_id)
        if config_json is None:  # `flwr run`: no driver checked the run folder (`fedspec simulate` did)
            paths = check_run_dir(cfg)
            # A relative run.output_dir is relative to where the SuperLink was started: say where.
            log(INFO, "fedspec: run folder %s", paths.root.resolve())
        run_federation(grid, cfg)

    return app


app = build_server_app()

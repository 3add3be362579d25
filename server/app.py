"""The Flower ServerApp.

``app`` is what ``flwr run`` loads (``[tool.flwr.app.components]``): its config comes from the run_config
(flattened dotted keys, see ``fedspec.config.flatten_config``). ``fedspec simulate`` builds its own instance
with :func:`build_server_app`, handing it the resolved config directly.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedspec.config import config_from_run_config


def build_server_app(run_config: dict | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from .federation import run_federation

        run_federation(grid, config_from_run_config(dict(context.run_config), run_config))

    return app


app = build_server_app()

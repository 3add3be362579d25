"""The Flower ClientApp: receive the global adapter, train locally under DP, reply with the update only.

``query`` tells the server who this node is (client id, dataset size) or, flagged ``calibration-statistics``
(round 0 of CorDA, EVA, LoRA-GA, FWSVD), returns the sums of its calibration statistics; ``train`` runs one
round. The reply
holds only the tensors the strategy lets clients train (for FedSVD: B and the head), as differences from
what was received, plus metrics: examples, loss and the client's ε over *all* its steps so far.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedspec.config import config_from_run_config
from fedspec.strategies.flower import CALIBRATION_FLAG, STATISTICS_KEY


def build_client_app(run_config: dict | None = None) -> ClientApp:
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        from .runtime import client_id, local_data

        cfg = config_from_run_config(dict(context.run_config), run_config)
        config = msg.content.config_records.get("config")
        if config is not None and config.get(CALIBRATION_FLAG):  # round 0 of a data-driven initialization
            from .statistics import client_statistics

            statistics, metrics = client_statistics(cfg, context)
            content = RecordDict({STATISTICS_KEY: ArrayRecord(statistics), "metrics": MetricRecord(metrics)})
            return Message(content, reply_to=msg)
        data = local_data(cfg, context)
        metrics = MetricRecord({"client-id": client_id(context), "num-examples": len(data)})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from .local_round import train_one_round

        cfg = config_from_run_config(dict(context.run_config), run_config)
        update, metrics = train_one_round(cfg, msg, context)
        return Message(RecordDict({"arrays": ArrayRecord(update), "metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


app = build_client_app()

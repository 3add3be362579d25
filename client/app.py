"""The Flower ClientApp: receive the global adapter, train locally under DP, reply with the update only.

``query`` tells the server who this node is (client id, dataset size) or, flagged ``calibration-statistics``
(round 0 of CorDA, EVA, LoRA-GA, FWSVD), returns the sums of its calibration statistics; ``train`` runs one
round. The reply
holds only the tensors the strategy lets clients train (for FedSVD: B and the head), as differences from
what was received, plus metrics: examples, loss and the client's ε over *all* its steps so far.
"""

from __future__ import annotations

import functools
import sys
import tempfile
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedspec import __version__
from fedspec.config import config_from_run_config
from fedspec.errors import FedspecError
from fedspec.protocol import (
    ARRAYS,
    CALIBRATION_FLAG,
    CLIENT_ID,
    CONFIG,
    DECLINED,
    LABELS,
    METRICS,
    SECAGG,
    SECAGG_STAGE,
    SERVER_ROUND,
    STATISTICS,
    VERSION,
)

from .warm import WORKER_NODE_CONFIG


def check_same_version(server_version: str | None) -> None:
    """The app bundle carries no code: server and client each run the fedspec installed on their machine,
    so they must be the same release (a different one may train, send or aggregate other tensors)."""
    if server_version is not None and server_version != __version__:
        raise FedspecError(
            f"this node runs fedspec {__version__} but the server runs fedspec {server_version}; "
            "install the same version on every machine"
        )


def error_log(context: Context, config_json: str | None) -> Path:
    """Where this node writes the tracebacks of its failures: beside its ledger (the node's ``state-dir``, or the
    simulated run's ``clients/client-<i>/``), or the temp folder when the config itself cannot be read."""
    from .runtime import ledger_path

    try:
        cfg = config_from_run_config(dict(context.run_config), config_json, run_id=context.run_id, check_files=False)
        return ledger_path(cfg, context).with_name("errors.log")
    except Exception:  # the failure may be the config itself
        return Path(tempfile.gettempdir()) / f"fedspec-client-{context.node_config.get('partition-id', 'unknown')}.log"


def _one_line_failures(handler: Callable[[Message, Context], Message], config_json: str | None):
    """A ClientApp handler whose failure reaches the server as one line naming the client and the reason; the
    full traceback goes to this node's error log (:func:`error_log`) instead of the reply."""

    @functools.wraps(handler)
    def guarded(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as error:
            path = error_log(context, config_json)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("a") as log:
                    log.write(f"--- {datetime.now(timezone.utc).isoformat()} {handler.__name__}\n"
                              f"{traceback.format_exc()}\n")
                where = f"traceback in {path}"
            except OSError as unwritable:
                where = f"traceback not written: {unwritable}"
            reason = (str(error).strip().splitlines() or [""])[0][:300]
            client = context.node_config.get("partition-id", "?")
            raise FedspecError(f"client {client}: {type(error).__name__}: {reason} ({where})") from None

    return guarded


def local_handlers(config_json: str | None = None) -> dict[str, Callable[[Message, Context], Message]]:
    """The ClientApp's handlers, run in this process: by the ClientApp itself, or by the node's warm worker."""
    return {"query": functools.partial(_one_line_failures, config_json=config_json)(_query(config_json)),
            "train": functools.partial(_one_line_failures, config_json=config_json)(_train(config_json))}


def build_client_app(config_json: str | None = None) -> ClientApp:
    """The ClientApp. On a node started with a warm worker (node config ``worker="<socket>"``) each message runs
    there, where the model and data stay loaded between rounds (:mod:`client.warm`); elsewhere, here."""
    app = ClientApp()
    handlers = local_handlers(config_json)

    def run(kind: str, msg: Message, context: Context) -> Message:
        socket_path = context.node_config.get(WORKER_NODE_CONFIG)
        if socket_path:
            from .warm import WorkerUnavailable, forward

            try:
                return forward(str(socket_path), kind, msg, context)
            except WorkerUnavailable as error:
                print(f"fedspec client: {error}; running this message here (cold)", file=sys.stderr, flush=True)
            except OSError as error:  # it died mid-message: what it did is unknown, so do not run it again here
                client = context.node_config.get("partition-id", "?")
                raise FedspecError(f"client {client}: the warm worker at {socket_path} failed mid-message "
                                   f"({error}); restart it (fedspec node does) — this round goes on without "
                                   "this client") from None
        return handlers[kind](msg, context)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return run("query", msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return run("train", msg, context)

    return app


def _query(config_json: str | None) -> Callable[[Message, Context], Message]:
    def query(msg: Message, context: Context) -> Message:
        from .runtime import client_id, local_data, remember_label_names

        config = msg.content.config_records.get(CONFIG) or ConfigRecord({})
        cfg = config_from_run_config(dict(context.run_config), config_json, run_id=context.run_id, check_files=False)
        if config.get(SECAGG_STAGE):  # an exchange of secure aggregation's protocol
            from .secure_aggregation import answer_query

            return Message(answer_query(cfg, msg, context), reply_to=msg)
        check_same_version(config.get(VERSION))
        remember_label_names(context, config.get(LABELS))
        if config.get(CALIBRATION_FLAG):  # round 0 of a data-driven initialization
            from .statistics import client_statistics

            statistics, metrics = client_statistics(cfg, context)
            content = RecordDict({STATISTICS: ArrayRecord(statistics), METRICS: MetricRecord(metrics)})
            return Message(content, reply_to=msg)
        local_data(cfg, context)  # a node whose data cannot load says so now, not in round 1
        # Only the id: the server weighs updates by the counts they carry, so a count here would only reveal n where
        # the run keeps it private (uniform weighting, secure aggregation).
        return Message(RecordDict({METRICS: MetricRecord({CLIENT_ID: client_id(context)})}), reply_to=msg)

    return query


def _train(config_json: str | None) -> Callable[[Message, Context], Message]:
    def train(msg: Message, context: Context) -> Message:
        from .local_round import train_one_round

        cfg = config_from_run_config(dict(context.run_config), config_json, run_id=context.run_id, check_files=False)
        if SECAGG in msg.content.config_records:  # secure aggregation: reply with the masked update only
            from .secure_aggregation import masked_reply, noise_shares, round_session

            # the session (and the noise request) are checked before training: a node that cannot mask, or would
            # be asked to add too little noise, spends no privacy budget
            session = round_session(context, int(msg.content.config_records[CONFIG][SERVER_ROUND]))
            if cfg.privacy.client_level.enabled:
                noise_shares(cfg, msg)
            update, metrics = train_one_round(cfg, msg, context)
            if metrics.get(DECLINED):
                return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)
            return Message(masked_reply(cfg, msg, context, session, update, metrics), reply_to=msg)
        update, metrics = train_one_round(cfg, msg, context)
        return Message(RecordDict({ARRAYS: ArrayRecord(update), METRICS: MetricRecord(metrics)}), reply_to=msg)

    return train


app = build_client_app()

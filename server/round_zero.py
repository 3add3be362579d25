"""Round 0 of a data-driven initialization (CorDA, EVA, LoRA-GA, FWSVD): the server asks every client for its
calibration statistics, sums them, and initializes the global adapter from the sum.

The message is a QUERY carrying the flag ``calibration-statistics``; each client answers with the per-layer SUMS of
its statistics (clipped and noised when ``privacy.private_init_stats``, see ``fedspec.adapters.calibration``) and
its count. The server adds them: the sum of the clients' sums is the statistic of the pooled data, so only a
sum is needed and secure aggregation could sit underneath. A client that fails is left out (its statistic is
missing from the sum, the others are unaffected); round 0 needs at least one answer.
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from omegaconf import DictConfig

from fedspec.adapters import Calibration, sum_calibrations
from fedspec.builders import InitStatistics
from fedspec.errors import FedspecError
from fedspec.protocol import (
    CALIBRATION_FLAG,
    CONFIG,
    METRICS,
    STATISTICS,
    ProtocolError,
    StatisticsReply,
    error_reason,
)
from fedspec.rundir import MetricsLog

from .messaging import exchange


def collect_statistics(
    grid: Grid, nodes: list[int], cfg: DictConfig, log: MetricsLog
) -> tuple[Calibration, list[StatisticsReply]]:
    """(the summed calibration of every answering client, their replies' metrics)."""
    started = time.monotonic()
    messages = [
        Message(content=RecordDict({CONFIG: ConfigRecord({CALIBRATION_FLAG: True})}),
                message_type=MessageType.QUERY, dst_node_id=node)
        for node in nodes
    ]
    replies = exchange(grid, messages, timeout=cfg.federation.round_timeout)
    statistics = InitStatistics.of(cfg)
    parts, replies_read = [], []
    for reply in replies:
        if reply.has_error():
            log.write("client-error", round=0, node=reply.metadata.src_node_id, reason=error_reason(reply.error.reason))
            continue
        try:
            parsed = StatisticsReply.from_metrics(reply.content.metric_records[METRICS])
        except (KeyError, ProtocolError) as error:
            log.write("client-quarantined", round=0, node=reply.metadata.src_node_id, reason=str(error))
            continue
        reply_metrics = reply.content.metric_records[METRICS]
        parts.append(Calibration.from_tensors(
            reply.content.array_records[STATISTICS].to_torch_state_dict(),
            kinds=statistics.kinds,
            noise_multiplier=statistics.noise_multiplier,
            max_norm=statistics.max_norm,
        ))
        replies_read.append(parsed)
        log.write("client", round=0, **{k.replace("-", "_"): v for k, v in reply_metrics.items()})
    if not parts:
        raise FedspecError(
            f"round 0: no client sent its calibration statistics for adapter.method={cfg.adapter.method} "
            "(see client-error lines in metrics.jsonl)"
        )
    total = sum_calibrations(parts)
    log.write("init", round=0, method=cfg.adapter.method, clients=len(parts), calibration_examples=total.count,
              statistics_privatized=statistics.private, seconds=time.monotonic() - started)
    return total, replies_read

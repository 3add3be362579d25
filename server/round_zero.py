"""Round 0 of a data-driven initialization (CorDA, EVA, LoRA-GA, FWSVD): the server asks every client for its
calibration statistics, sums them, and initializes the global adapter from the sum.

The message is a QUERY carrying the flag ``calibration-statistics``; each client answers with the per-layer SUMS of
its statistics (clipped and noised when ``privacy.private_init_stats``, see ``fedspec.adapters.calibration``) and
its count. The server adds them: the sum of the clients' sums is the statistic of the pooled data, so only a
sum is needed and secure aggregation could sit underneath. A client that fails, or whose reply does not match
what the server expects (its identity, the adapted layers' shapes, a count within adapter.calibration_examples,
the statistic mechanism the run sets, privatized sums no larger than clipping and noise allow), is left out: its statistic is missing from the sum, the others are
unaffected; round 0 needs at least one answer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from omegaconf import DictConfig

from fedspec.adapters import Calibration, StatisticsPrivacy, sum_calibrations
from fedspec.adapters.calibration import COUNT_KEY
from fedspec.builders import InitStatistics
from fedspec.errors import FedspecError
from fedspec.protocol import (
    CALIBRATION_EXAMPLES,
    CALIBRATION_FLAG,
    CONFIG,
    METRICS,
    STATISTICS,
    ProtocolError,
    StatisticsReply,
    check_statistics,
    claimed_identity,
    error_reason,
    reply_tensors,
)
from fedspec.rundir import MetricsLog

from .messaging import exchange


def collect_statistics(
    grid: Grid, client_ids: dict[int, int], cfg: DictConfig, log: MetricsLog, *,
    layout: dict[str, tuple[int, ...]], check_claim: Callable[[StatisticsReply], None],
) -> tuple[Calibration, list[StatisticsReply]]:
    """(the summed calibration of every answering client, their replies' metrics). ``client_ids``: node → client
    id (discovery's); ``layout``: the statistic tensors the server's adapted layers call for
    (:func:`fedspec.adapters.calibration_layout`); ``check_claim``: the privacy claim's check (server/mirror.py).
    A reply that fails any check is quarantined, with the reason in metrics.jsonl."""
    started = time.monotonic()
    messages = [
        Message(content=RecordDict({CONFIG: ConfigRecord({CALIBRATION_FLAG: True})}),
                message_type=MessageType.QUERY, dst_node_id=node)
        for node in sorted(client_ids)
    ]
    replies = exchange(grid, messages, timeout=cfg.federation.round_timeout)
    statistics = InitStatistics.of(cfg)
    parts, replies_read = [], []
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.write("client-error", round=0, node=node, reason=error_reason(reply.error.reason))
            continue
        try:
            parsed, flat = _read_reply(reply, client_ids.get(node), layout, cfg.adapter.calibration_examples)
            check_claim(parsed)
            if statistics.private:
                check_privatized_norm(flat, parsed.calibration_examples, statistics.noise_multiplier, statistics.max_norm)
        except ProtocolError as error:
            log.write("client-quarantined", round=0, node=node, client=client_ids.get(node), reason=str(error))
            continue
        parts.append(Calibration.from_tensors(flat, kinds=statistics.kinds, noise_multiplier=statistics.noise_multiplier,
                                              max_norm=statistics.max_norm))
        replies_read.append(parsed)
        log.write("client", round=0, **{k.replace("-", "_"): v for k, v in reply.content.metric_records[METRICS].items()})
    if not parts:
        raise FedspecError(
            f"round 0: no client sent its calibration statistics for adapter.method={cfg.adapter.method} "
            "(see client-error and client-quarantined lines in metrics.jsonl)"
        )
    total = sum_calibrations(parts)
    log.write("init", round=0, method=cfg.adapter.method, clients=len(parts), calibration_examples=total.count,
              statistics_privatized=statistics.private, seconds=time.monotonic() - started)
    return total, replies_read


def _read_reply(reply: Message, client: int | None, layout: dict[str, tuple[int, ...]], max_examples: int,
                ) -> tuple[StatisticsReply, dict[str, torch.Tensor]]:
    """The reply's metrics and statistic tensors, or a ProtocolError naming what is wrong with them."""
    if METRICS not in reply.content.metric_records:
        raise ProtocolError(f"the reply has no {METRICS!r} record")
    parsed = StatisticsReply.from_metrics(reply.content.metric_records[METRICS])
    claimed_identity(parsed.client_id, reply.metadata.src_node_id, client)
    if not 1 <= parsed.calibration_examples <= max_examples:  # a client sums at most that many of its records
        raise ProtocolError(f"metric {CALIBRATION_EXAMPLES!r} must be in 1..adapter.calibration_examples="
                            f"{max_examples}, got {parsed.calibration_examples}")
    flat = reply_tensors(reply.content.array_records, STATISTICS)
    check_statistics(flat, layout, COUNT_KEY, parsed.calibration_examples)
    return parsed, flat


# Tail of the noise's norm: for Gaussian noise of std s in d coordinates, P(‖noise‖ > s·(√d + t)) ≤ exp(−t²/2).
NOISE_NORM_TAIL = 10.0  # exp(−50): an honest reply is never refused


def check_privatized_norm(flat: dict[str, torch.Tensor], count: int, noise_multiplier: float, max_norm: float) -> None:
    """Refuse a privatized reply no honest client could send: its sums are at most ``count`` records' contributions,
    each clipped to C, plus noise of std σ·2C per coordinate (a covariance's noise is mirrored, at most √2 times
    the norm of its upper triangle). A client could otherwise send a finite but enormous statistic, which would
    make the global initialization non-finite, or steer it."""
    sums = [t.double().flatten() for key, t in flat.items() if key != COUNT_KEY]
    size = sum(len(t) for t in sums)
    norm = float(torch.cat(sums).norm())
    noise_std = StatisticsPrivacy.subset_of(noise_multiplier, max_norm).noise_std
    bound = count * max_norm + math.sqrt(2) * noise_std * (math.sqrt(size) + NOISE_NORM_TAIL)
    if not norm <= bound:
        raise ProtocolError(f"the statistics' norm {norm:.4g} exceeds what {count} records clipped to "
                            f"C = {max_norm:g} plus their noise can reach ({bound:.4g})")

"""Thin Flower (Message API) strategies over the pure aggregation math in ``aggregation.py``.

``AdapterStrategy`` subclasses Flower's ``FedAvg`` and changes three things:
- client sampling is seeded (Flower samples with the module-level ``random``), reproducible per round;
- the global adapter is kept between ``configure_train`` and ``aggregate_train``, because FedSVD clients send
  only B updates while the new state needs A too;
- aggregation is :func:`aggregation.aggregate` under the configured rule; replies that are errors, declined
  (privacy budget spent) or carry non-finite tensors are left out, and the round goes on without them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from logging import WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from .aggregation import AggregationRule, aggregate

BASE_INIT_KEY = "base-init"  # RecordDict key of the fixed adapter tensors (e.g. residual init factors), sent once
DECLINED = "declined"  # metric a client sets to 1 when it refuses to train (privacy budget spent)


class AdapterStrategy(FedAvg):
    def __init__(
        self,
        rule: AggregationRule,
        *,
        client_ids: dict[int, int],
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        seed: int = 0,
        base_init: ArrayRecord | None = None,
        client_trained: set[str] | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=0.0,  # the server evaluates the global model itself on held-out data
            min_train_nodes=min_train_nodes,
            min_available_nodes=min_train_nodes,
        )
        self.rule = rule
        self.client_ids = client_ids  # node id -> client (partition) id, learned by the server at start
        self.seed = seed
        self.base_init = base_init
        self.client_trained = client_trained  # the keys clients train (the method's federated rule)
        self.nodes_with_base: set[int] = set()
        self._sent_state: dict[str, torch.Tensor] | None = None

    def sample(self, server_round: int) -> list[int]:
        """A seeded sample of ⌈fraction·N⌉ nodes (at least ``min_train_nodes``), in client-id order."""
        nodes = sorted(self.client_ids, key=self.client_ids.__getitem__)
        size = min(len(nodes), max(math.ceil(self.fraction_train * len(nodes)), self.min_train_nodes))
        rng = random.Random(f"{self.seed}:{server_round}")
        return sorted(rng.sample(nodes, size), key=self.client_ids.__getitem__)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent_state = arrays.to_torch_state_dict()
        config["server-round"] = server_round
        messages = []
        for node_id in self.sample(server_round):
            content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
            if self.base_init is not None and node_id not in self.nodes_with_base:
                content[BASE_INIT_KEY] = self.base_init
                self.nodes_with_base.add(node_id)
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._sent_state is None:
            raise RuntimeError("aggregate_train called before configure_train")
        valid, _ = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        updates, weights, metrics = [], [], []
        for reply in valid:
            reply_metrics = reply.content.metric_records["metrics"]
            if reply_metrics.get(DECLINED, 0):
                continue
            update = reply.content.array_records[self.arrayrecord_key].to_torch_state_dict()
            if not all(torch.isfinite(t).all() for t in update.values()):
                log(WARNING, "Dropping the update of node %s: it holds NaN or Inf", reply.metadata.src_node_id)
                continue
            updates.append(update)
            weights.append(float(reply_metrics[self.weighted_by_key]))
            metrics.append(reply_metrics)
        new_state = aggregate(self.rule, self._sent_state, updates, weights, client_trained=self.client_trained)
        return ArrayRecord(new_state), summarize_train_metrics(metrics, weights)


def summarize_train_metrics(metrics: list[MetricRecord], weights: list[float]) -> MetricRecord:
    """Example-weighted mean loss, number of clients aggregated, and the largest client ε so far."""
    total = sum(weights)
    summary = {"clients": len(metrics), "num-examples": int(total)}
    if metrics:
        summary["train-loss"] = sum(m["train-loss"] * w for m, w in zip(metrics, weights)) / total
        epsilons = [m["epsilon"] for m in metrics if "epsilon" in m]
        if epsilons:
            summary["max-epsilon"] = max(epsilons)
    return MetricRecord(summary)

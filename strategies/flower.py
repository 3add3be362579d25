"""Thin Flower (Message API) strategies over the pure aggregation math in ``aggregation.py``.

``AdapterStrategy`` is the server's strategy on plain dicts of tensors (the server drives the rounds itself, so
it needs none of Flower's ``Strategy`` machinery; only messages and replies are Flower's):
- client sampling is seeded (Flower samples with the module-level ``random``), reproducible per round;
- the global adapter is kept between ``train_contents`` and ``aggregate_train``, because FedSVD clients send
  only B updates while the new state needs A too;
- every reply is read through ``fedspec.protocol``: its metrics, the client identity the server mapped to that
  node at discovery, its privacy claim (``check_claim``), and its tensors against what was sent. A reply that does not match is quarantined with the
  reason (``last_replies``), never aggregated and never fatal; errors and declined replies (privacy budget
  spent) are left out too, and the round goes on without them;
- each client's influence is bounded (``influence``: its update's norm and its weight, relative to the cohort's
  medians), then aggregation is the weighted mean of :mod:`aggregation` under the configured rule.

Weights are the clients' ``num-examples`` (``weighting="examples"``) or 1 each (``"uniform"``). With client-level
DP (``client_dp``) clients are Poisson-sampled and the mean is :func:`client_dp.private_mean` (clipped updates,
noise on the sum, fixed denominator) before the rule's update and refactor. The mean (or private mean) then
goes through the server optimizer (``server_optimizer``: server learning rate and momentum) before it is applied.

Under secure aggregation (``secure``) a reply carries the client's masked vector instead of its update and no
record count; the server's secure round (``server/secure_round.py``) unmasks the sum and hands the mean to
:meth:`aggregate_secure`, which applies it exactly as above.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore import log

from fedspec.config import CHOICES
from fedspec.protocol import (
    ARRAYS,
    BASE_INIT,
    CONFIG,
    METRICS,
    SERVER_ROUND,
    TRAIN_LOSS,
    ProtocolError,
    TrainReply,
    check_masked,
    check_update,
    claimed_identity,
    error_reason,
    reply_tensors,
)

from .aggregation import AggregationRule, apply_mean_update, trained_keys, weighted_mean
from .client_dp import ClientDP, noise_generator, poisson_sample, private_mean
from .influence import InfluenceBound, bound_influence
from .server_optimizer import ServerOptimizer


class AdapterStrategy:
    def __init__(
        self,
        rule: AggregationRule,
        *,
        client_ids: dict[int, int],
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        seed: int = 0,
        base_init: dict[str, torch.Tensor] | None = None,
        weighting: str = "examples",
        client_dp: ClientDP | None = None,
        client_trained: set[str] | None = None,
        server_optimizer: ServerOptimizer | None = None,
        a_orthonormal: bool = False,
        reference_norm: float | None = None,
        influence: InfluenceBound | None = None,
        secure: bool = False,
        check_claim: Callable[[TrainReply, int], None] | None = None,
    ) -> None:
        if weighting not in CHOICES["federation.weighting"]:
            raise ValueError(f"weighting must be one of {CHOICES['federation.weighting']}, got {weighting!r}")
        if client_dp is not None and weighting != "uniform":
            raise ValueError("client-level DP needs uniform weights: example weights break the C/(q·N) sensitivity")
        self.fraction_train, self.min_train_nodes = fraction_train, min_train_nodes
        self.rule = rule
        self.client_ids = client_ids  # node id -> client (partition) id, learned by the server at start
        self.seed = seed
        self.base_init = ArrayRecord(base_init) if base_init else None  # built once, sent to each new node
        self.client_trained = client_trained  # the keys clients train (the method's federated rule)
        self.nodes_with_base: set[int] = set()
        self.weighting = weighting
        self.client_dp = client_dp
        self.server_optimizer = server_optimizer or ServerOptimizer()
        self.influence = influence or InfluenceBound(None, None)
        # Secure aggregation: replies carry a masked vector (never an update) and no record count
        self.secure = secure
        # The server's check of a reply's privacy claim (server/mirror.py): raises a ProtocolError to quarantine it
        self.check_claim = check_claim
        self._sent_state: dict[str, torch.Tensor] | None = None
        self._sent_round = 0
        self.last_replies = RoundReplies()
        # After the first re-factorization every A has orthonormal rows (clients never train A under FedSVD),
        # so later rounds take the r×r rotation shortcut. A resumed run passes the flag of its checkpoint: a full
        # re-factorization instead of the shortcut could flip the signs of A's rows, and the runs would diverge.
        self._a_orthonormal = a_orthonormal
        # The median update norm of the last round with peers: what bounds a round's lone update (checkpointed).
        self.reference_norm = reference_norm

    @property
    def a_orthonormal(self) -> bool:
        """Whether every A has orthonormal rows now (saved in each checkpoint, for an exact resume)."""
        return self._a_orthonormal

    def sample(self, server_round: int) -> list[int]:
        """A seeded sample of ⌈fraction·N⌉ nodes (at least ``min_train_nodes``), in client-id order; under
        client-level DP each node independently with probability q (Poisson, possibly none)."""
        nodes = sorted(self.client_ids, key=self.client_ids.__getitem__)
        if self.client_dp is not None:
            return poisson_sample(nodes, self.client_dp.sample_rate, self.client_dp.seed, server_round)
        size = min(len(nodes), max(math.ceil(self.fraction_train * len(nodes)), self.min_train_nodes))
        rng = random.Random(f"{self.seed}:{server_round}")
        return sorted(rng.sample(nodes, size), key=self.client_ids.__getitem__)

    def train_messages(self, server_round: int, state: dict[str, torch.Tensor]) -> list[Message]:
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)
                for node, content in self.train_contents(server_round, state).items()]

    def train_contents(self, server_round: int, state: dict[str, torch.Tensor]) -> dict[int, RecordDict]:
        """What each of this round's sampled nodes is sent: the global adapter, the round, and the fixed tensors
        (``base_init``) until a reply has confirmed that the node has them."""
        self._sent_state, self._sent_round = dict(state), server_round
        arrays, config = ArrayRecord(self._sent_state), ConfigRecord({SERVER_ROUND: server_round})
        contents = {}
        for node_id in self.sample(server_round):
            content = RecordDict({ARRAYS: arrays, CONFIG: config})
            if self.base_init is not None and node_id not in self.nodes_with_base:
                content[BASE_INIT] = self.base_init
            contents[node_id] = content
        return contents

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[dict[str, torch.Tensor], dict]:
        """The new global state from the replies that pass :meth:`read_replies` (the rest are quarantined), and
        the round's summary."""
        if self._sent_state is None:
            raise RuntimeError("aggregate_train called before train_contents")
        self.last_replies = self.read_replies(list(replies))
        accepted = self.last_replies.accepted
        updates = [update for _, _, update in accepted]
        weights = [float(reply.num_examples) if self.weighting == "examples" else 1.0 for _, reply, _ in accepted]
        if self.client_dp is None and updates:
            bounded = bound_influence(updates, weights, self.influence, self.reference_norm)
            # the round's loss weighs each client as the aggregate does: a claimed count of 10⁹ records is capped
            weights = bounded.weights
        summary = summarize_train_metrics([reply for _, reply, _ in accepted], weights)
        summary["quarantined"] = len(self.last_replies.quarantined)
        if self.client_dp is None:
            if not updates:  # nothing to aggregate: the state (and whether A is orthonormal) stays as it is
                return {k: v.clone() for k, v in self._sent_state.items()}, summary
            summary["norm-clipped"], summary["weight-capped"] = bounded.clipped, bounded.capped
            if bounded.median_norm is not None:
                self.reference_norm = bounded.median_norm
            mean = weighted_mean(bounded.updates, bounded.weights)
        else:  # client-level DP releases a noised mean every round, with or without replies
            private = private_mean(
                updates, {k: self._sent_state[k] for k in self._trained_keys()},
                clipping_norm=self.client_dp.clipping_norm,
                noise_multiplier=self.client_dp.noise_multiplier,
                expected_clients=self.client_dp.expected_clients,
                generator=noise_generator(self.client_dp.seed, server_round),
            )
            summary["clipped"] = private.clipped
            summary["noise-std"] = private.noise_std
            mean = private.mean
        return self._apply_or_keep(mean, summary), summary

    def aggregate_secure(
        self, outcome: RoundReplies, mean: dict[str, torch.Tensor] | None
    ) -> tuple[dict[str, torch.Tensor], dict]:
        """The new global state from a secure-aggregation round: ``mean`` is the weighted mean the server unmasked
        (None: the round could not be summed, the state stays). The server never saw a weight, so the summary's
        train loss is the clients' plain mean."""
        self.last_replies = outcome
        accepted = [reply for _, reply, _ in outcome.accepted]
        summary = summarize_train_metrics(accepted, [1.0] * len(accepted))
        summary["quarantined"] = len(outcome.quarantined)
        summary["clipped"] = None  # distributed client-level noise: no client tells whether it clipped (privacy)
        # No client sends its loss under secure aggregation (summarize_train_metrics leaves the round's out)
        if mean is None:
            summary["clients"] = 0
            return {k: v.clone() for k, v in self._sent_state.items()}, summary
        return self._apply_or_keep(mean, summary), summary

    def apply_mean(self, mean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The server step on the clients' mean update, then the rule's update (FedSVD: the re-factorization)."""
        new_state = apply_mean_update(self.rule, self._sent_state, self.server_optimizer.step(mean),
                                      a_orthonormal=self._a_orthonormal, client_trained=self.client_trained)
        self.server_optimizer.change_basis(self.rule, self._sent_state, new_state)
        self._a_orthonormal = self.rule.refactor and not self.rule.clients_train_A
        return new_state

    def _apply_or_keep(self, mean: dict[str, torch.Tensor], summary: dict) -> dict[str, torch.Tensor]:
        """:meth:`apply_mean`, unless its result is not finite or the re-factorization fails on it (an update
        scaled beyond float range): then the global state, the server optimizer and A's orthonormality stay as
        they were, and ``summary["rejected"]`` says why. A federation goes on from a round it could not apply."""
        buffers, orthonormal = dict(self.server_optimizer.buffers), self._a_orthonormal
        try:
            new_state = self.apply_mean(mean)
            bad = [key for key, value in new_state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
            if bad:
                raise ValueError(f"the new {bad[0]} would hold NaN or Inf")
        except (ValueError, RuntimeError) as error:  # torch.linalg.LinAlgError is a RuntimeError
            self.server_optimizer.buffers, self._a_orthonormal = buffers, orthonormal
            summary["rejected"] = f"the round's aggregate could not be applied: {error}"
            return {k: v.clone() for k, v in self._sent_state.items()}
        return new_state

    def trained_template(self) -> dict[str, torch.Tensor]:
        """The tensors clients train and send this round (keys and shapes of an update)."""
        return {k: self._sent_state[k] for k in self._trained_keys()}

    def _trained_keys(self) -> list[str]:
        return trained_keys(self._sent_state, self.rule, self.client_trained)

    def read_replies(self, replies: list[Message]) -> RoundReplies:
        """Sort a round's replies: aggregated, declined (budget spent), a client error, or quarantined with the
        reason — a reply that does not match what was sent (metrics, identity, tensors). Never raises."""
        outcome = RoundReplies()
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():  # it may have lost its state: it gets the fixed tensors again next time
                outcome.errors.append((node, error_reason(reply.error.reason)))
                continue
            self.nodes_with_base.add(node)  # it answered this round's message, which carried them if needed
            try:
                parsed, update = self._read_reply(node, reply)
            except ProtocolError as error:
                log(WARNING, "Quarantined the reply of node %s: %s", node, error)
                outcome.quarantined.append((node, str(error)))
                continue
            if parsed.declined:
                outcome.declined.append((node, parsed))
            else:
                outcome.accepted.append((node, parsed, update))
        return outcome

    def _read_reply(self, node: int, reply: Message) -> tuple[TrainReply, dict[str, torch.Tensor] | None]:
        if METRICS not in reply.content.metric_records:
            raise ProtocolError(f"the reply has no {METRICS!r} record")
        parsed = TrainReply.from_metrics(reply.content.metric_records[METRICS],
                                         needs_examples=self.weighting == "examples" and not self.secure)
        claimed_identity(parsed.client_id, node, self.client_ids.get(node))
        if parsed.declined:
            return parsed, None
        if self.check_claim is not None:
            self.check_claim(parsed, self._sent_round)
        update = reply_tensors(reply.content.array_records, ARRAYS)
        if self.secure:
            size = sum(t.numel() for t in self.trained_template().values()) + 1  # the weighted update, its weight
            return parsed, check_masked(update, size)
        check_update(update, self._sent_state, self._trained_keys())
        return parsed, update


@dataclass
class RoundReplies:
    """A round's replies after validation."""

    # aggregated: (node, reply, update), or under secure aggregation (node, reply, masked vector)
    accepted: list[tuple[int, TrainReply, dict[str, torch.Tensor] | torch.Tensor]] = field(default_factory=list)
    declined: list[tuple[int, TrainReply]] = field(default_factory=list)  # privacy budget spent: trained nothing
    errors: list[tuple[int, str]] = field(default_factory=list)  # (node, reason): the client failed
    quarantined: list[tuple[int, str]] = field(default_factory=list)  # (node, reason): the reply was invalid


def summarize_train_metrics(replies: list[TrainReply], weights: list[float]) -> dict:
    """Weighted mean loss (of the clients that report one), number of clients aggregated, and the largest client ε
    so far."""
    summary = {"clients": len(replies)}
    losses = [(r.train_loss, w) for r, w in zip(replies, weights) if r.train_loss is not None]
    if losses:
        total = sum(w for _, w in losses)  # each weight divided first: finite losses times large weights can overflow
        summary[TRAIN_LOSS] = sum(loss * (w / total) for loss, w in losses)
    if replies:
        epsilons = [r.epsilon for r in replies if r.epsilon is not None]
        if epsilons:
            summary["max-epsilon"] = max(epsilons)
    return summary

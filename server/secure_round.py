"""One training round under secure aggregation: the server relays SecAgg+'s four exchanges and learns only the
sum of the sampled clients' weighted updates (``fedspec.secagg``).

    advertise (query) → share (query) → train + mask (train) → unmask (query)

Clients that fail or time out in any exchange are dropped from the rest of the round; those that shared their
keys but sent no masked vector have their pairwise masks removed from the sum with their neighbours' shares. When
too few clients remain, the round is skipped (logged, counted, the global adapter unchanged) and the federation
goes on; the privacy ledgers still record what every client that trained spent, since its update left the node.

With client-level DP the clients add the noise (``noise``: distributed Skellam noise, fedspec.privacy.skellam):
each sends its clipped, integer update plus 1/m of the noise, m = ``privacy.client_level.min_survivors`` or the
cohort's size, told in the train message; the server unmasks only when at least m masked updates arrived, so the
sum it learns always carries the whole noise. The clients check both (client/secure_aggregation.py: m against
their config, the survivors named in the unmask request against m); a client that refuses to unmask answers with
an error, and a round without enough shares to unmask is skipped like any other.

The server cannot see what a client masked, so it checks the unmasked sum against what the survivors could send
honestly (``Quantizer.check_sum``, ``SkellamNoise.check_sum``): a sum beyond those limits skips the round, since
one client could otherwise move the model without limit.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from omegaconf import DictConfig

from fedspec.privacy.skellam import SkellamNoise
from fedspec.protocol import (
    ADVERTISE,
    CONFIG,
    DROPPED,
    NOISE_SHARES,
    SECAGG,
    SECAGG_STAGE,
    SERVER_ROUND,
    SHARE,
    SURVIVORS,
    UNMASK,
    error_reason,
)
from fedspec.secagg import Advertisement, Quantizer, SecAggError, ServerSession
from fedspec.strategies.flower import AdapterStrategy, RoundReplies

from .messaging import Traffic, exchange


def quantizer(cfg: DictConfig) -> Quantizer:
    secagg = cfg.federation.secure_aggregation
    return Quantizer(secagg.clip_range, secagg.bits, secagg.max_weight)


@dataclass
class SecureRoundResult:
    replies: list[Message]  # the train replies (metrics for the ledgers and logs)
    outcome: RoundReplies
    mean: dict[str, torch.Tensor] | None  # the clients' weighted mean update; None: the round was not summed
    failure: str | None  # why it was not summed
    dropped: int  # clients that shared keys but sent no masked vector
    errors: list[tuple[int, str, str]]  # (node, exchange, reason) of the clients that failed in a query exchange
    noise_std: float | None = None  # distributed client-level noise: its std per coordinate of the mean
    # The server unmasked the clients' (noised) sum, whether or not it could use it: a release that counts
    unmasked: bool = False


class SecureRound:
    def __init__(self, grid: Grid, cfg: DictConfig, strategy: AdapterStrategy, traffic: Traffic, *,
                 on_reply: Callable | None = None, noise: SkellamNoise | None = None):
        self.grid, self.strategy, self.traffic, self.on_reply = grid, strategy, traffic, on_reply
        self.timeout = cfg.federation.round_timeout
        secagg = cfg.federation.secure_aggregation
        self.quantizer = quantizer(cfg)
        self.fraction, self.neighbours = secagg.threshold, secagg.neighbours
        self.noise, self.min_survivors = noise, cfg.privacy.client_level.min_survivors
        self.errors: list[tuple[int, str, str]] = []

    def _dimension(self) -> int:
        return sum(t.numel() for t in self.strategy.trained_template().values())

    def noise_shares(self, cohort: int) -> int:
        """m: how many clients' noise shares make the whole noise (each adds 1/m of it)."""
        return self.min_survivors if self.min_survivors is not None else cohort

    def run(self, round_: int, state: dict[str, torch.Tensor]) -> SecureRoundResult:
        contents = self.strategy.train_contents(round_, state)
        session = ServerSession(round_, self.fraction, self.neighbours)
        self.errors = []
        replies: list[Message] = []
        outcome = RoundReplies()
        shares = self.noise_shares(len(contents))
        unmasked = False
        try:
            if len(contents) > self.quantizer.max_clients():
                raise SecAggError(f"{len(contents)} clients could wrap the masked sum around 2^62: lower "
                                  "federation.secure_aggregation.max_weight or bits")
            if self.noise is not None:
                # A setting that cannot work ends the run here (ConfigError), before any client trains
                self.noise.check_headroom(self._dimension(), len(contents), shares)
                self._check_whole_noise(f"{len(contents)} clients sampled", len(contents), shares)
                for content in contents.values():
                    content[CONFIG][NOISE_SHARES] = shares
            adverts = self._query(round_, ADVERTISE, {node: {} for node in contents})
            peers = session.peers(_advertisements(adverts))
            shared = self._query(round_, SHARE, {node: {str(v): ad.to_bytes() for v, ad in peers[node].items()}
                                                 for node in peers})
            inbox = session.route(_by_node(shared))
            replies = self._train(round_, {node: contents[node] for node in inbox}, inbox)
            outcome = self.strategy.read_replies(replies)
            survivors, dropped = session.unmask_request({node: vector for node, _, vector in outcome.accepted})
            if self.noise is not None:
                # Unmasked, their sum would carry only part of the noise: it is never computed
                self._check_whole_noise(f"only {len(survivors)} masked updates arrived", len(survivors), shares)
            request = {SURVIVORS: [str(u) for u in survivors], DROPPED: [str(u) for u in dropped]}
            answers = self._query(round_, UNMASK, {node: request for node in survivors})
            total = session.total(_by_node(answers))
            unmasked = True
            mean, clients = self._mean(total, len(survivors), shares)
            noise_std = self.noise.std_of_mean(clients, self._dimension()) if self.noise is not None else None
            return SecureRoundResult(replies, outcome, mean, None, len(dropped), self.errors, noise_std, unmasked)
        except SecAggError as error:
            return SecureRoundResult(replies, outcome, None, str(error), len(session.shared - set(session.masked)),
                                     self.errors, unmasked=unmasked)

    @staticmethod
    def _check_whole_noise(what: str, clients: int, shares: int) -> None:
        """A SecAggError (the round is skipped) when fewer than the m clients whose noise shares make the whole
        noise take part. The clients check the same at the unmask step, whatever the server does."""
        if clients < shares:
            raise SecAggError(f"{what}, fewer than the {shares} whose noise shares make the whole noise "
                              "(privacy.client_level.min_survivors, else the cohort)")

    def _mean(self, total: torch.Tensor, survivors: int, shares: int) -> tuple[dict[str, torch.Tensor], int]:
        """The clients' (weighted) mean update from the unmasked sum of ``survivors`` masked vectors (``shares``:
        the noise shares each carries), and their total weight. A sum the survivors could not send honestly is
        refused (SecAggError): a client masked a vector of its own choosing."""
        template = self.strategy.trained_template()
        if self.noise is not None:
            try:  # the sum is of what clients sent: a wrong size or value skips the round, like the quantizer's
                sums, weight = self.noise.decode(total, template)
                self.noise.check_sum(total, survivors, shares)
            except ValueError as error:
                raise SecAggError(str(error)) from None
        else:
            sums, weight = self.quantizer.decode(total, template)
            self.quantizer.check_sum(total, survivors)
        if weight < 1:
            raise SecAggError(f"the unmasked sum counts {weight} clients: it is corrupt")
        return {k: v / weight for k, v in sums.items()}, weight

    def _query(self, round_: int, stage: str, payloads: dict[int, dict]) -> dict[int, dict]:
        """One exchange of queries; {node: its reply's secagg record} for the nodes that answered without error."""
        messages = [
            Message(RecordDict({CONFIG: ConfigRecord({SERVER_ROUND: round_, SECAGG_STAGE: stage}),
                                SECAGG: ConfigRecord(payload)}), message_type=MessageType.QUERY, dst_node_id=node)
            for node, payload in payloads.items()
        ]
        answered = {}
        for reply in exchange(self.grid, messages, timeout=self.timeout, traffic=self.traffic):
            node = reply.metadata.src_node_id
            if reply.has_error():  # a dropout: the protocol goes on without it
                self.errors.append((node, stage, error_reason(reply.error.reason)))
            elif SECAGG not in reply.content.config_records:
                self.errors.append((node, stage, f"the reply has no {SECAGG!r} record"))
            else:
                answered[node] = dict(reply.content.config_records[SECAGG])
        return answered

    def _train(self, round_: int, contents: dict[int, RecordDict], inbox: dict[int, dict[int, bytes]]) -> list[Message]:
        messages = []
        for node, content in contents.items():
            content[SECAGG] = ConfigRecord({str(sender): c for sender, c in inbox[node].items()})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        return exchange(self.grid, messages, timeout=self.timeout, on_reply=self.on_reply, traffic=self.traffic)


# What a client sends is untrusted: a malformed part drops that client from the round, it never ends the round.

def _advertisements(replies: dict[int, dict]) -> dict[int, Advertisement]:
    adverts = {}
    for node, payload in replies.items():
        try:
            adverts[node] = Advertisement.from_bytes(payload["key"])
        except (KeyError, TypeError, SecAggError):
            continue
    return adverts


# A node id as the protocol writes it: a uint64 in plain ASCII decimal. Not str.isdigit, which also accepts "²"
# (int refuses it) and strings too long for int to parse.
_NODE_ID = re.compile(r"[0-9]{1,20}")


def _by_node(replies: dict[int, dict]) -> dict[int, dict[int, bytes]]:
    """{sender: {node id: bytes}} with node ids parsed; entries that are not (id string → bytes) are left out."""
    parsed = {}
    for sender, payload in replies.items():
        entries = {}
        for key, value in payload.items():
            if isinstance(value, bytes) and isinstance(key, str) and _NODE_ID.fullmatch(key):
                entries[int(key)] = value
        parsed[sender] = entries
    return parsed

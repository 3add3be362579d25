"""The client's side of secure aggregation (``fedspec.secagg``): answer the server's advertise / share / unmask
queries, and send a train reply whose only tensor is the masked, quantized ``[w·update, w]``.

The round's secrets (key pairs, self-mask seed, the shares received) live in the node's ``context.state`` between
the exchanges and are replaced every round. A node that lost them (a restart mid-round) refuses to train in that
round, before spending any privacy budget: the server counts it as dropped.

With client-level DP the vector is the clipped update rounded to integers plus this client's share of the Skellam
noise (fedspec.privacy.skellam), so the sum the server unmasks is already noised. The server says how many shares m
make the whole noise; the client checks m against its own config (the run's config, the same for every message:
the server cannot change it mid-run), and at the unmask step refuses a request that names fewer than m survivors.
"""

from __future__ import annotations

import os

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from omegaconf import DictConfig

from fedspec.privacy.planning import PlanSettings, plan_client_level
from fedspec.privacy.skellam import SkellamNoise
from fedspec.protocol import (
    ADVERTISE,
    ARRAYS,
    CLIPPED_COORDINATES,
    CONFIG,
    DROPPED,
    MASKED,
    METRICS,
    NOISE_SHARES,
    NUM_EXAMPLES,
    SECAGG,
    SECAGG_STAGE,
    SERVER_ROUND,
    SHARE,
    SURVIVORS,
    TRAIN_LOSS,
    UNMASK,
)
from fedspec.secagg import Advertisement, ClientSession, Quantizer, SecAggError

SESSION_STATE_KEY = "secagg-session"


def answer_query(cfg: DictConfig, msg: Message, context: Context) -> RecordDict:
    """The reply to one of the protocol's queries (advertise, share, unmask)."""
    config = msg.content.config_records[CONFIG]
    stage, round_ = config[SECAGG_STAGE], int(config[SERVER_ROUND])
    payload = msg.content.config_records.get(SECAGG) or ConfigRecord({})
    if stage == ADVERTISE:
        session = ClientSession(node=context.node_id, round=round_, fraction=cfg.federation.secure_aggregation.threshold)
        out = {"key": session.advertise().to_bytes()}
    elif stage == SHARE:
        session = round_session(context, round_)
        peers = {int(node): Advertisement.from_bytes(blob) for node, blob in payload.items()}
        out = {str(node): ciphertext for node, ciphertext in session.share(peers).items()}
    elif stage == UNMASK:
        session = round_session(context, round_)
        shares = session.unmask([int(u) for u in payload[SURVIVORS]], [int(u) for u in payload[DROPPED]])
        out = {str(node): share for node, share in shares.items()}
    else:
        raise SecAggError(f"unknown secure-aggregation stage {stage!r}")
    context.state[SESSION_STATE_KEY] = ConfigRecord(session.to_record())
    return RecordDict({SECAGG: ConfigRecord(out)})


def round_session(context: Context, round_: int) -> ClientSession:
    """This round's session from the node's state; an error when it is missing or from another round."""
    record = context.state.config_records.get(SESSION_STATE_KEY)
    session = ClientSession.from_record(record) if record is not None else None
    if session is None or session.round != round_:
        raise SecAggError(f"this node holds no secure-aggregation keys for round {round_} (restarted mid-round?): "
                          "it sits this round out")
    return session


def masked_reply(cfg: DictConfig, msg: Message, context: Context, session: ClientSession,
                 update: dict[str, torch.Tensor], metrics: dict) -> RecordDict:
    """``[w·q(update), w]`` masked for this round's neighbours; the record count leaves the metrics (it is ``w``,
    inside the sum). Under client-level DP: ``[x̃ + noise share, 1]`` (fedspec.privacy.skellam) instead."""
    secagg = cfg.federation.secure_aggregation
    examples = metrics.pop(NUM_EXAMPLES, None)
    # The training loss stays here too: computed on the client's records without noise, it is covered by no DP
    # guarantee, and secure aggregation promises the server nothing of one client's data but what the sum holds
    metrics.pop(TRAIN_LOSS, None)
    # A fresh generator per round from OS entropy: rounding needs unpredictable coins, the noise secret ones
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
    if cfg.privacy.client_level.enabled:
        noise, shares = distributed_noise(cfg), noise_shares(cfg, msg)
        # Whether this update was clipped stays here: a bit of one update in the clear would sit outside the
        # client-level guarantee, which covers only the noised sum
        vector, _ = noise.encode(update, shares, generator)
        # Unmasked with fewer than m others, the sum would carry less than the whole noise: ClientSession.unmask
        # refuses such a request (the value travels in the node's state with the session)
        session.min_survivors = shares
    else:
        quantizer = Quantizer(secagg.clip_range, secagg.bits, secagg.max_weight)
        weight = min(int(examples), secagg.max_weight) if examples is not None else 1
        vector, metrics[CLIPPED_COORDINATES] = quantizer.encode(update, weight, generator)
    inbox = {int(node): ciphertext for node, ciphertext in msg.content.config_records[SECAGG].items()}
    masked = session.mask(vector, inbox)
    context.state[SESSION_STATE_KEY] = ConfigRecord(session.to_record())
    return RecordDict({ARRAYS: ArrayRecord({MASKED: masked}), METRICS: MetricRecord(metrics)})


def distributed_noise(cfg: DictConfig) -> SkellamNoise:
    """The run's client-level noise, planned from the config exactly as the server plans it."""
    return plan_client_level(PlanSettings.of(cfg)).distributed


def noise_shares(cfg: DictConfig, msg: Message) -> int:
    """m, as the server tells it in the train message, checked against the m this client's config plans
    (PlanSettings.noise_shares: ``privacy.client_level.min_survivors`` exactly, else at most the cohort), since too
    large an m would make this client add too little noise. Checked before training, too: a bad request costs no
    privacy budget."""
    told = msg.content.config_records[CONFIG].get(NOISE_SHARES)
    if isinstance(told, bool) or not isinstance(told, int) or told < 2:
        raise SecAggError(f"the server's {NOISE_SHARES!r}={told!r} is not a number of clients of at least 2: "
                          "refusing to add noise for it")
    planned = PlanSettings.of(cfg).noise_shares
    if cfg.privacy.client_level.min_survivors is not None:
        if told != planned:
            raise SecAggError(f"the server asks for 1/{told} of the noise, but privacy.client_level.min_survivors="
                              f"{planned}: refusing to add noise for it")
    elif told > planned:
        # Fewer is safe (a larger share each, and the unmask step waits for m survivors): the server samples
        # fewer clients when fewer nodes answered at the start
        raise SecAggError(f"the server asks for 1/{told} of the noise, but the run's cohort is {planned} clients "
                          "(federation.fraction of federation.clients, at least federation.min_clients): refusing "
                          "to add noise for it")
    return told

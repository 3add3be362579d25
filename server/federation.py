"""The server's round loop: initialize (or resume), then train → aggregate → evaluate → checkpoint per round.

Flower's ``Strategy.start`` always runs rounds 1..N from scratch; fedspec drives the rounds itself so that a
run can resume from its last checkpoint, show progress per client, and keep the privacy mirror in step.
Before every round it checks the privacy budgets (``budget.BudgetTracker``) and ends the run cleanly, with
its reports, when too few clients have budget left (or the client-level guarantee would be exceeded).
"""

from __future__ import annotations

import math
import time

import numpy as np

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from omegaconf import DictConfig

from fedspec import __version__
from fedspec.adapters import get_method, ranks_in_state
from fedspec.builders import build_task, calibration_kinds
from fedspec.config import check_federated, save_config
from fedspec.errors import FedspecError
from fedspec.privacy import PrivacyLedger, load_ledgers
from fedspec.privacy.client_level import CLIENT_LEVEL_LEDGER_FILE, client_level_ledger
from fedspec.privacy.planning import plan_client_level
from fedspec.rundir import MetricsLog, RunPaths, run_paths
from fedspec.strategies import get_rule
from fedspec.strategies.client_dp import ClientDP
from fedspec.protocol import (
    CLIENT_ID,
    CONFIG,
    DECLINED,
    LABELS,
    METRICS,
    TRAIN_LOSS,
    VERSION,
    StatisticsReply,
    TrainReply,
)
from fedspec.strategies.flower import AdapterStrategy, RoundReplies
from fedspec.strategies.server_optimizer import ServerOptimizer, split_momentum

from .budget import BudgetTracker
from .checkpoint import load_checkpoint, save_checkpoint
from .global_model import GlobalModel, split_fixed
from .messaging import exchange
from .progress import FederationProgress, RoundRow
from .reports import write_final_reports
from .round_zero import collect_statistics

DISCOVERY_POLL_SECONDS = 1.0


def discover_clients(grid: Grid, expected: int, timeout: float, label_names: list[str]) -> dict[int, dict]:
    """Ask every node who it is: {node id: {CLIENT_ID: its client id}}. Waits for ``expected`` nodes.
    The query carries the task's class names: a node with its own data file labels it with them."""
    deadline = time.monotonic() + timeout
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < expected:
        if time.monotonic() > deadline:
            raise FedspecError(
                f"only {len(node_ids)} of federation.clients={expected} nodes connected within {timeout:.0f}s; "
                "start more SuperNodes or lower federation.clients"
            )
        time.sleep(DISCOVERY_POLL_SECONDS)
        node_ids = list(grid.get_node_ids())
    messages = [
        Message(content=RecordDict({CONFIG: ConfigRecord({VERSION: __version__, LABELS: list(label_names)})}),
                message_type=MessageType.QUERY, dst_node_id=n)
        for n in node_ids
    ]
    replies = exchange(grid, messages, timeout=timeout)
    found = {}
    for reply in replies:
        if reply.has_error():
            raise FedspecError(f"node {reply.metadata.src_node_id} failed to start: {reply.error.reason}")
        metrics = reply.content.metric_records[METRICS]
        found[reply.metadata.src_node_id] = {CLIENT_ID: int(metrics[CLIENT_ID])}
    _check_unique_client_ids(found)
    return found


def _check_unique_client_ids(found: dict[int, dict]) -> None:
    """Two SuperNodes started with the same partition-id would share one privacy ledger and one identity."""
    seen: dict[int, int] = {}
    for node, info in found.items():
        if info[CLIENT_ID] in seen:
            raise FedspecError(
                f"nodes {seen[info[CLIENT_ID]]} and {node} both have partition-id={info[CLIENT_ID]}; "
                "start every SuperNode with its own --node-config 'partition-id=<i>'"
            )
        seen[info[CLIENT_ID]] = node


def _mirror_client(ledgers: dict[str, PrivacyLedger], reply: TrainReply | StatisticsReply, round_: int,
                   cfg: DictConfig) -> None:
    """Record in the server's mirror ledger what a client reported it spent this round."""
    if not reply.private:
        return
    client = str(reply.client_id)
    ledger = ledgers.setdefault(client, PrivacyLedger(client_id=client, delta=cfg.privacy.delta, accountant=cfg.privacy.accountant))
    ledger.record(round_, reply.noise_multiplier, reply.sample_rate, reply.steps, attempt=ledger.next_attempt(round_))


def _log_replies(log: MetricsLog, round_: int, outcome: RoundReplies, replies: list[Message], budget: BudgetTracker,
                 ledgers: dict[str, PrivacyLedger], cfg: DictConfig) -> None:
    """One metrics line per reply (aggregated, declined, or rejected with its reason); mirror what was spent."""
    by_node = {reply.metadata.src_node_id: reply for reply in replies}
    for node, reply, _ in outcome.accepted:
        fields = {k.replace("-", "_"): v for k, v in reply.to_metrics().items()}
        log.write("client", round=round_, update_bytes=_payload_bytes(by_node[node]), **fields)
        _mirror_client(ledgers, reply, round_, cfg)
    for node, reply in outcome.declined:
        fields = {k.replace("-", "_"): v for k, v in reply.to_metrics().items() if k != DECLINED}
        log.write("client-declined", round=round_, **fields)
        budget.record_decline(str(reply.client_id), round_)
    for node, reason in outcome.errors:
        log.write("client-error", round=round_, node=node, reason=reason)
    for node, reason in outcome.quarantined:
        log.write("client-quarantined", round=round_, node=node, reason=reason)


def _payload_bytes(reply: Message) -> int:
    """The size of the tensors a client sent (what a user pays for upload), counted by the server."""
    return sum(math.prod(array.shape) * np.dtype(array.dtype).itemsize
               for record in reply.content.array_records.values() for array in record.values())


def _max_epsilon(previous: float | None, this_round: float | None) -> float | None:
    """The largest ε of any client so far: ε only grows, and only this round's clients spent more."""
    values = [v for v in (previous, this_round) if v is not None]
    return max(values) if values else None


def _client_dp(cfg: DictConfig, num_clients: int) -> ClientDP | None:
    plan = plan_client_level(cfg)
    if plan is None:
        return None
    seed = cfg.run.seed if cfg.privacy.seed_noise else None
    return ClientDP(plan.noise_multiplier, plan.clipping_norm, plan.sample_rate, num_clients, seed=seed)


def _load_client_level_ledger(cfg: DictConfig, paths: RunPaths, resuming: bool) -> PrivacyLedger | None:
    if not cfg.privacy.client_level.enabled:
        return None
    path = paths.privacy / CLIENT_LEVEL_LEDGER_FILE
    if resuming and path.is_file():
        return PrivacyLedger.load(path)
    return client_level_ledger(cfg.privacy.client_level.delta, cfg.privacy.accountant)


def run_federation(grid: Grid, cfg: DictConfig) -> list[RoundRow]:
    check_federated(cfg)
    paths: RunPaths = run_paths(cfg)
    paths.root.mkdir(parents=True, exist_ok=True)
    if not paths.config.is_file():  # under `flwr run` no driver wrote it
        save_config(cfg, paths.config)
    log = MetricsLog(paths.metrics)
    rule = get_rule(cfg.strategy.name)
    task = build_task(cfg)
    checkpoint = load_checkpoint(paths.checkpoints) if cfg.run.resume else None
    server_optimizer = ServerOptimizer(cfg.strategy.server_lr, cfg.strategy.server_momentum)
    if checkpoint is not None:  # the momentum buffers travel in the checkpoint's state, beside the adapter
        checkpoint.state, momentum = split_momentum(checkpoint.state)
        server_optimizer.load(momentum)
    rows = [RoundRow(**row) for row in checkpoint.meta["rows"]] if checkpoint else []
    ledgers = load_ledgers(paths.ledgers) if checkpoint and paths.ledgers.is_dir() else {}
    budget = BudgetTracker(cfg, checkpoint.meta.get("declined") if checkpoint else None)
    level_ledger = _load_client_level_ledger(cfg, paths, checkpoint is not None)
    start_round = checkpoint.round + 1 if checkpoint else 1

    nodes = discover_clients(grid, cfg.federation.clients, cfg.federation.round_timeout, task.train.label_names)
    client_dp = _client_dp(cfg, len(nodes))
    calibration = None
    if checkpoint is None and calibration_kinds(cfg):  # round 0: the global init needs the clients' statistics
        calibration, replies = collect_statistics(grid, sorted(nodes), cfg, log)
        for reply in replies:
            _mirror_client(ledgers, reply, 0, cfg)
        for ledger in ledgers.values():
            ledger.save(paths.ledgers / f"client-{ledger.client_id}.json")
    # Per-layer ranks (EVA) are part of the adapter's structure: a resumed server reads them off its checkpoint.
    per_layer = checkpoint is not None and get_method(cfg.adapter.method).ranks is not None
    model = GlobalModel(cfg, task, initialize=checkpoint is None, calibration=calibration,
                        rank_pattern=ranks_in_state(checkpoint.state) if per_layer else None)
    if checkpoint is not None:
        model.load(checkpoint.state)
    global_state, base_init = split_fixed(model.state(), model.roles())
    strategy = AdapterStrategy(
        rule,
        client_ids={node: info[CLIENT_ID] for node, info in nodes.items()},
        fraction_train=cfg.federation.fraction,
        min_train_nodes=min(cfg.federation.min_clients, len(nodes)),
        seed=cfg.run.seed,
        base_init=ArrayRecord(base_init) if base_init else None,
        weighting=cfg.federation.weighting,
        client_dp=client_dp,
        client_trained=model.client_trained(),
        server_optimizer=server_optimizer,
        a_orthonormal=bool(checkpoint.meta.get("a_orthonormal", False)) if checkpoint else False,
    )
    all_clients = sorted(str(info[CLIENT_ID]) for info in nodes.values())
    stopped = None
    with FederationProgress(cfg.federation.rounds, enabled=cfg.run.progress) as progress:
        if checkpoint is None:
            started = time.monotonic()
            evaluation = model.evaluate()
            rows.append(RoundRow(0, None, evaluation["accuracy"], evaluation["loss"], 0, None, time.monotonic() - started))
            log.write("round", **vars(rows[-1]))
            progress.round_done(rows[-1])
        else:
            progress.note(f"resuming {paths.root} after round {checkpoint.round}")
        for round_ in range(start_round, cfg.federation.rounds + 1):
            stopped = budget.stop_reason(
                all_clients, ledgers, level_ledger,
                (client_dp.noise_multiplier, client_dp.sample_rate) if client_dp else None,
            )
            if stopped:
                log.write("stopped", round=round_, reason=stopped)
                progress.note(f"stopping before round {round_}: {stopped}")
                break
            started = time.monotonic()
            messages = list(strategy.configure_train(round_, ArrayRecord(global_state), ConfigRecord({}), grid))
            progress.start_round(round_, len(messages), round_ - 1)
            replies = exchange(
                grid, messages, timeout=cfg.federation.round_timeout, on_reply=lambda _: progress.client_done()
            )
            arrays, summary = strategy.aggregate_train(round_, replies)
            global_state = model.after_round(arrays.to_torch_state_dict(), round_)
            if level_ledger is not None:  # the noised aggregate is released: it counts, whoever took part
                level_ledger.record(round_, client_dp.noise_multiplier, client_dp.sample_rate, 1,
                                    attempt=level_ledger.next_attempt(round_))
            _log_replies(log, round_, strategy.last_replies, replies, budget, ledgers, cfg)
            evaluation = model.evaluate(global_state)
            row = RoundRow(
                round_,
                summary.get(TRAIN_LOSS),
                evaluation["accuracy"],
                evaluation["loss"],
                int(summary["clients"]),
                _max_epsilon(rows[-1].max_epsilon, summary.get("max-epsilon")),
                time.monotonic() - started,
            )
            rows.append(row)
            log.write("round", **vars(row), **_client_level_fields(summary, level_ledger))
            for ledger in ledgers.values():
                ledger.save(paths.ledgers / f"client-{ledger.client_id}.json")
            if level_ledger is not None:
                level_ledger.save(paths.privacy / CLIENT_LEVEL_LEDGER_FILE)
            save_checkpoint(
                paths.checkpoints,
                round_,
                {**global_state, **base_init, **server_optimizer.state()},
                {"strategy": rule.name, "seed": cfg.run.seed, "rows": [vars(r) for r in rows],
                 "declined": budget.declined, "a_orthonormal": strategy.a_orthonormal},
            )
            progress.round_done(row)
    write_final_reports(cfg, paths, model, rows, ledgers, declined=budget.declined, stopped=stopped,
                        client_level=level_ledger)
    return rows


def _client_level_fields(summary, level_ledger: PrivacyLedger | None) -> dict:
    """Extra fields of a round's metrics line under client-level DP: its ε so far, how many updates were clipped."""
    if level_ledger is None:
        return {}
    return {"client_level_epsilon": level_ledger.epsilon(), "clipped": int(summary.get("clipped", 0)),
            "noise_std": float(summary.get("noise-std", 0.0))}

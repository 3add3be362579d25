"""The server's round loop: initialize (or resume), then train → aggregate → evaluate → checkpoint per round.

Flower's ``Strategy.start`` always runs rounds 1..N from scratch; fedspec drives the rounds itself so that a
run can resume from its last checkpoint, show progress per client, and keep the privacy mirror in step.
"""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from omegaconf import DictConfig

from fedspec.builders import build_task
from fedspec.config import check_federated
from fedspec.errors import FedspecError
from fedspec.privacy import PrivacyLedger, load_ledgers
from fedspec.rundir import MetricsLog, RunPaths, run_paths
from fedspec.strategies import get_rule
from fedspec.strategies.flower import AdapterStrategy

from .checkpoint import load_checkpoint, save_checkpoint
from .global_model import GlobalModel, split_fixed
from .messaging import exchange
from .progress import FederationProgress, RoundRow
from .reports import write_final_reports

DISCOVERY_POLL_SECONDS = 1.0


def discover_clients(grid: Grid, expected: int, timeout: float) -> dict[int, dict]:
    """Ask every node who it is: {node id: {"client-id", "num-examples"}}. Waits for ``expected`` nodes."""
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
        Message(content=RecordDict({"config": ConfigRecord({})}), message_type=MessageType.QUERY, dst_node_id=n)
        for n in node_ids
    ]
    replies = exchange(grid, messages, timeout=timeout)
    found = {}
    for reply in replies:
        if reply.has_error():
            raise FedspecError(f"node {reply.metadata.src_node_id} failed to start: {reply.error.reason}")
        metrics = reply.content.metric_records["metrics"]
        found[reply.metadata.src_node_id] = {"client-id": int(metrics["client-id"]), "num-examples": int(metrics["num-examples"])}
    return found


def _mirror_client(ledgers: dict[str, PrivacyLedger], metrics, round_: int, cfg: DictConfig) -> None:
    """Record in the server's mirror ledger what a client reported it spent this round."""
    if "noise-multiplier" not in metrics:
        return
    client = str(int(metrics["client-id"]))
    ledger = ledgers.setdefault(client, PrivacyLedger(client_id=client, delta=cfg.privacy.delta, accountant=cfg.privacy.accountant))
    ledger.record(round_, float(metrics["noise-multiplier"]), float(metrics["sample-rate"]), int(metrics["steps"]),
                  attempt=ledger.next_attempt(round_))


def _max_epsilon(previous: float | None, this_round: float | None) -> float | None:
    """The largest ε of any client so far: ε only grows, and only this round's clients spent more."""
    values = [v for v in (previous, this_round) if v is not None]
    return max(values) if values else None


def run_federation(grid: Grid, cfg: DictConfig) -> list[RoundRow]:
    check_federated(cfg)
    paths: RunPaths = run_paths(cfg)
    paths.root.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(paths.metrics)
    rule = get_rule(cfg.strategy.name)
    task = build_task(cfg)
    checkpoint = load_checkpoint(paths.checkpoints) if cfg.run.resume else None

    model = GlobalModel(cfg, task, initialize=checkpoint is None)
    if checkpoint is not None:
        model.load(checkpoint.state)
    global_state, base_init = split_fixed(model.state(), model.roles())
    rows = [RoundRow(**row) for row in checkpoint.meta["rows"]] if checkpoint else []
    ledgers = load_ledgers(paths.ledgers) if checkpoint and paths.ledgers.is_dir() else {}
    start_round = checkpoint.round + 1 if checkpoint else 1

    nodes = discover_clients(grid, cfg.federation.clients, cfg.federation.round_timeout)
    strategy = AdapterStrategy(
        rule,
        client_ids={node: info["client-id"] for node, info in nodes.items()},
        fraction_train=cfg.federation.fraction,
        min_train_nodes=min(cfg.federation.min_clients, len(nodes)),
        seed=cfg.run.seed,
        base_init=ArrayRecord(base_init) if base_init else None,
        client_trained=model.client_trained(),
    )
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
            started = time.monotonic()
            messages = list(strategy.configure_train(round_, ArrayRecord(global_state), ConfigRecord({}), grid))
            progress.start_round(round_, len(messages), round_ - 1)
            replies = exchange(
                grid, messages, timeout=cfg.federation.round_timeout, on_reply=lambda _: progress.client_done()
            )
            arrays, summary = strategy.aggregate_train(round_, replies)
            global_state = model.after_round(arrays.to_torch_state_dict(), round_)
            for reply in replies:
                if reply.has_error():
                    log.write("client-error", round=round_, node=reply.metadata.src_node_id, reason=reply.error.reason)
                    continue
                metrics = reply.content.metric_records["metrics"]
                log.write("client", round=round_, **{k.replace("-", "_"): v for k, v in metrics.items()})
                _mirror_client(ledgers, metrics, round_, cfg)
            evaluation = model.evaluate(global_state)
            row = RoundRow(
                round_,
                summary.get("train-loss"),
                evaluation["accuracy"],
                evaluation["loss"],
                int(summary["clients"]),
                _max_epsilon(rows[-1].max_epsilon, summary.get("max-epsilon")),
                time.monotonic() - started,
            )
            rows.append(row)
            log.write("round", **vars(row))
            for ledger in ledgers.values():
                ledger.save(paths.ledgers / f"client-{ledger.client_id}.json")
            save_checkpoint(
                paths.checkpoints,
                round_,
                {**global_state, **base_init},
                {"strategy": rule.name, "seed": cfg.run.seed, "rows": [vars(r) for r in rows]},
            )
            progress.round_done(row)
    write_final_reports(cfg, paths, model, rows, ledgers)
    return rows

"""The server's round loop: initialize (or resume), then train → aggregate → evaluate → checkpoint per round.

Flower's ``Strategy.start`` always runs rounds 1..N from scratch; fedspec drives the rounds itself so that a
run can resume from its last checkpoint, show progress per client, and keep the privacy mirror in step.
Before every round it checks the privacy budgets (``budget.BudgetTracker``) and ends the run cleanly, with
its reports, when too few clients have budget left (or the client-level guarantee would be exceeded).
"""

from __future__ import annotations

import dataclasses
import time
from logging import WARNING

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log as flower_log
from omegaconf import DictConfig

from fedspec import __version__
from fedspec.adapters import Calibration, calibration_layout, get_method, ranks_in_state
from fedspec.builders import AdapterSettings, ModelSettings, build_backbone, build_task, calibration_layers
from fedspec.config import check_federated, config_differences, load_config_file, save_config
from fedspec.errors import ConfigError, FedspecError
from fedspec.privacy import PrivacyLedger, load_ledgers
from fedspec.privacy.client_level import CLIENT_LEVEL_LEDGER_FILE, client_level_ledger
from fedspec.privacy.planning import ClientLevelPlan, PlanSettings, plan_client_level
from fedspec.protocol import (
    CLIENT_ID,
    CONFIG,
    DECLINED,
    LABELS,
    METRICS,
    TRAIN_LOSS,
    VERSION,
    ProtocolError,
    error_reason,
)
from fedspec.rundir import MetricsLog, RunPaths, run_paths
from fedspec.strategies import get_rule
from fedspec.strategies.client_dp import ClientDP
from fedspec.strategies.flower import AdapterStrategy, RoundReplies
from fedspec.strategies.influence import InfluenceBound
from fedspec.strategies.server_optimizer import ServerOptimizer, split_momentum

from .budget import BudgetTracker
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .global_model import GlobalModel, split_fixed
from .messaging import NO_REPLY_IN_TIME, Traffic, exchange, payload_bytes
from .mirror import check_claim, record_claim
from .progress import FederationProgress, RoundRow
from .reports import write_final_reports
from .round_zero import collect_statistics
from .secure_round import SecureRound

DISCOVERY_POLL_SECONDS = 1.0


def discover_clients(
    grid: Grid, expected: int, timeout: float, label_names: list[str], min_clients: int = 1,
    log: MetricsLog | None = None,
) -> dict[int, dict]:
    """Ask every node who it is: {node id: {CLIENT_ID: its client id}}. Waits for ``expected`` nodes and fails
    when fewer than ``min_clients`` remain. A node that fails to start or answers something else, and every node
    of a client id that more than one node claims, is left out of the run (a ``client-error`` line in ``log``),
    never the end of it. The query carries the task's class names: a node with its own data file labels it with
    them."""
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
    found, problems = {}, []
    for reply in replies:
        node = reply.metadata.src_node_id
        try:
            found[node] = {CLIENT_ID: _client_id(reply)}
        except ProtocolError as problem:
            problems.append(f"node {node}: {problem}")
            _log_left_out(log, node, str(problem))
    for nodes, clash in _client_id_clashes(found):
        problems.append(clash)
        flower_log(WARNING, "Discovery: %s", clash)  # a misconfiguration, or an impostor: said out loud
        for node in nodes:
            del found[node]
            _log_left_out(log, node, clash)
    # min_clients is capped at the federation's size, as in sampling, planning and the budget stop: a federation of
    # one client (--clients 1, default min_clients 2) needs its one node, not two
    needed = min(min_clients, expected)
    if len(found) < needed:
        raise FedspecError(
            f"only {len(found)} of {len(node_ids)} nodes answered who they are within federation.round_timeout="
            f"{timeout:g}s, fewer than federation.min_clients={needed}"
            + (f" ({'; '.join(problems)})" if problems else "")
            + "; check the SuperNodes' logs, or raise the timeout"
        )
    return found


def _log_left_out(log: MetricsLog | None, node: int, reason: str) -> None:
    if log is not None:
        log.write("client-error", round=0, node=node, reason=reason)


def _client_id(reply: Message) -> int:
    """The client id a discovery reply states; a ProtocolError saying what is wrong with any other reply."""
    if reply.has_error():
        raise ProtocolError(f"failed to start: {error_reason(reply.error.reason)}")
    metrics = reply.content.metric_records.get(METRICS)
    value = None if metrics is None else metrics.get(CLIENT_ID)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError(f"its reply states no client id (metric {CLIENT_ID!r}: {value!r})")
    return value


def _client_id_clashes(found: dict[int, dict]) -> list[tuple[list[int], str]]:
    """(the nodes, why they are left out) for every client id more than one node claims. Two SuperNodes started
    with the same partition-id would share one privacy ledger and one identity; which one is the client, or
    whether one is an impostor, the server cannot tell: none of them takes part."""
    by_client: dict[int, list[int]] = {}
    for node, info in found.items():
        by_client.setdefault(info[CLIENT_ID], []).append(node)
    return [(nodes, _clash_reason(nodes, client)) for client, nodes in sorted(by_client.items()) if len(nodes) > 1]


def _clash_reason(nodes: list[int], client: int) -> str:
    both, neither = ("both", "neither") if len(nodes) == 2 else ("all", "none")
    return (f"nodes {_listed(nodes)} {both} claim client id {client} (partition-id={client}), so {neither} takes "
            "part; start every SuperNode with its own --node-config 'partition-id=<i>'")


def _listed(items: list) -> str:
    """'1 and 3', '1, 3 and 5'."""
    words = [str(item) for item in sorted(items)]
    return ", ".join(words[:-1]) + " and " + words[-1]


def _log_replies(log: MetricsLog, round_: int, outcome: RoundReplies, replies: list[Message], budget: BudgetTracker,
                 ledgers: dict[str, PrivacyLedger], cfg: DictConfig, client_ids: dict[int, int],
                 traffic: Traffic, plan: PlanSettings) -> None:
    """One metrics line per reply (aggregated, declined, or rejected with its reason), one per client that did
    not answer in time; mirror what was spent. Client lines carry the bytes exchanged with that client this round."""
    by_node = {reply.metadata.src_node_id: reply for reply in replies}
    for node, reply, _ in outcome.accepted:
        fields = {k.replace("-", "_"): v for k, v in reply.to_metrics().items()}
        log.write("client", round=round_, update_bytes=payload_bytes(by_node[node]), bytes_sent=traffic.sent[node],
                  bytes_received=traffic.received[node], **fields)
        record_claim(ledgers, reply, round_, plan)
    for node, reply in outcome.declined:
        fields = {k.replace("-", "_"): v for k, v in reply.to_metrics().items() if k != DECLINED}
        log.write("client-declined", round=round_, **fields)
        budget.record_decline(str(reply.client_id), round_)
    for node, reason in outcome.errors:  # the node's own error log holds the traceback (client/app.py)
        log.write("client-error", round=round_, node=node, client=client_ids.get(node), reason=reason)
    for node, reason in outcome.quarantined:
        log.write("client-quarantined", round=round_, node=node, client=client_ids.get(node), reason=reason)
    for node in sorted(set(traffic.sent) - set(traffic.received)):
        log.write("client-error", round=round_, node=node, client=client_ids.get(node),
                  reason=f"{NO_REPLY_IN_TIME}={cfg.federation.round_timeout:g}s")


def _round_max_epsilon(previous: float | None, summary: dict, outcome: RoundReplies,
                       ledgers: dict[str, PrivacyLedger]) -> float | None:
    """The largest ε of any client so far: ε only grows, and only this round's clients spent more. A client's ε is
    what the server's accountant computes from its mirrored ledger, or what it states of its own ledger where that
    is larger (a round the mirror missed), as in the privacy report: its statement alone could understate it (a
    client may state ε = 0, or nothing)."""
    accounted = [ledgers[str(reply.client_id)].epsilon() for _, reply, _ in outcome.accepted
                 if str(reply.client_id) in ledgers]
    values = [v for v in (previous, summary.get("max-epsilon"), *accounted) if v is not None]
    return max(values) if values else None


def _check_finite_init(state: dict[str, torch.Tensor], method: str) -> None:
    """A global adapter initialized from the clients' statistics must be finite: training from NaN would waste every
    round (non-privatized statistics have no bound a server could check a reply against)."""
    bad = [key for key, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise FedspecError(f"round 0: initializing adapter.method={method} from the clients' summed statistics gave "
                           f"NaN or Inf in {', '.join(bad[:3])}; a client sent statistics out of all proportion (its "
                           "client line of round 0 in metrics.jsonl); set privacy.private_init_stats=true to have "
                           "every reply bounded by its clipping")


def _client_dp(cfg: DictConfig, plan: ClientLevelPlan | None, num_clients: int) -> ClientDP | None:
    """The server's client-level noise; None when client-level DP is off or the clients add the noise."""
    if plan is None or plan.distributed is not None:
        return None
    seed = cfg.run.seed if cfg.privacy.seed_noise else None
    return ClientDP(plan.noise_multiplier, plan.clipping_norm, plan.sample_rate, num_clients, seed=seed)


def _load_client_level_ledger(plan: ClientLevelPlan | None, paths: RunPaths, resuming: bool) -> PrivacyLedger | None:
    """The client-level ledger: on a resume, the one on disk, whether or not the run reached a checkpoint (a release
    is charged to it at once, so it may already hold a round the checkpoints do not)."""
    if plan is None:
        return None
    path = paths.privacy / CLIENT_LEVEL_LEDGER_FILE
    if resuming and path.is_file():
        return PrivacyLedger.load(path)
    return client_level_ledger(plan.delta, plan.accountant)


def _check_same_settings(cfg: DictConfig, paths: RunPaths) -> None:
    """A resumed run continues with the settings it started with (config.yaml): its checkpoints, its clients' noise
    plans and ledgers were made with them."""
    changed = config_differences(cfg, load_config_file(paths.config))
    if changed:
        raise ConfigError(f"run.resume continues {paths.root} with the settings it started with ({paths.config}), but "
                          f"this run sets {'; '.join(changed[:5])}{' and more' if len(changed) > 5 else ''}; give the "
                          "overrides it started with, or start a new run under another run.name")


def run_federation(grid: Grid, cfg: DictConfig) -> list[RoundRow]:
    return Federation(grid, cfg).run()


class Federation:
    """One federated run on the server, in named steps: restore → discover → round 0 → initialize, then per round
    budget check → train → record → checkpoint, then the reports."""

    def __init__(self, grid: Grid, cfg: DictConfig) -> None:
        check_federated(cfg)
        self.grid, self.cfg = grid, cfg
        self.paths: RunPaths = run_paths(cfg)
        self.paths.root.mkdir(parents=True, exist_ok=True)
        if not self.paths.config.is_file():  # under `flwr run` no driver wrote it
            save_config(cfg, self.paths.config)
        elif cfg.run.resume:  # under `flwr run` the config is the run_config's overrides: they may have changed
            _check_same_settings(cfg, self.paths)
        self.log = MetricsLog(self.paths.metrics)
        self.traffic = Traffic()  # this round's payload bytes to and from each node
        self.rule = get_rule(cfg.strategy.name)
        self.task = build_task(cfg.data, cfg.run.seed)
        self._restore(load_checkpoint(self.paths.checkpoints) if cfg.run.resume else None)

    def _restore(self, checkpoint: Checkpoint | None) -> None:
        """Everything a checkpoint holds besides the adapter: evaluation rows, mirror ledgers, declined rounds,
        the client-level ledger, the server optimizer's momentum and FedSVD's rotation-shortcut flag."""
        cfg = self.cfg
        self.checkpoint = checkpoint
        self.server_optimizer = ServerOptimizer(cfg.strategy.server_lr, cfg.strategy.server_momentum)
        if checkpoint is not None:  # the momentum buffers travel in the checkpoint's state, beside the adapter
            checkpoint.state, momentum = split_momentum(checkpoint.state)
            self.server_optimizer.load(momentum)
        self.rows = [RoundRow(**row) for row in checkpoint.meta["rows"]] if checkpoint else []
        has_ledgers = checkpoint is not None and self.paths.ledgers.is_dir()
        # The mirror is saved before the checkpoint: after a failed checkpoint write it already holds the round
        # that is about to run again, whose replies are mirrored anew (every attempt a client reports). Without a
        # checkpoint, round 0 runs again from an empty mirror, for the same reason.
        self.ledgers = ({client: ledger.up_to(checkpoint.round) for client, ledger in
                         load_ledgers(self.paths.ledgers).items()} if has_ledgers else {})
        self.budget = BudgetTracker(cfg, checkpoint.meta.get("declined") if checkpoint else None)
        self.plan = PlanSettings.of(cfg)
        self.level_plan = plan_client_level(self.plan)
        self.level_ledger = _load_client_level_ledger(self.level_plan, self.paths, bool(cfg.run.resume))
        self.start_round = checkpoint.round + 1 if checkpoint else 1

    def run(self) -> list[RoundRow]:
        cfg = self.cfg
        nodes = discover_clients(self.grid, cfg.federation.clients, cfg.federation.round_timeout,
                                 self.task.train.label_names, min_clients=cfg.federation.min_clients, log=self.log)
        self.client_dp = _client_dp(cfg, self.level_plan, len(nodes))
        self._initialize(nodes, *self._round_zero(nodes))
        if self.checkpoint is None:
            # Round 0 is checkpointed too, before the (possibly long) first evaluation: resumed from here, a run
            # never asks the clients for their round-0 statistics again (a second release each) nor initializes
            # anew (another initialization, without seeded noise)
            self._save_checkpoint(0)
        stopped = None
        with FederationProgress(cfg.federation.rounds, enabled=cfg.run.progress) as self.progress:
            if self.checkpoint is not None:
                self.progress.note(f"resuming {self.paths.root} after round {self.checkpoint.round}")
            if not self.rows:  # a fresh run, or one killed after round 0's checkpoint, before its first evaluation
                self._evaluate_start()
                self._save_checkpoint(0)  # again, with the evaluation's row: a resume from it need not evaluate again
            for round_ in range(self.start_round, cfg.federation.rounds + 1):
                stopped = self._stop_reason(round_)
                if stopped:
                    break
                started = time.monotonic()
                summary = self._train_round(round_)
                self._record_round(round_, summary, time.monotonic() - started)
                self._save_checkpoint(round_)
            if stopped and self.rows[-1].round > 0 and self.rows[-1].answer_accuracy is None:
                self._score_final_answers()
        write_final_reports(cfg, self.paths, self.model, self.rows, self.ledgers, declined=self.budget.declined,
                            stopped=stopped, client_level=self.level_ledger)
        return self.rows

    def _round_zero(self, nodes: dict[int, dict]) -> tuple[Calibration | None, tuple | None]:
        """A data-driven initialization needs the clients' statistics first (a fresh run only): (their sum, the
        backbone loaded to check the replies' shapes), else (None, None)."""
        adapter = AdapterSettings.of(self.cfg.adapter)
        if self.checkpoint is not None or not adapter.calibration_kinds:
            return None, None
        backbone = build_backbone(ModelSettings.of(self.cfg), self.task.num_classes)
        layout = calibration_layout(backbone[0], calibration_layers(adapter, backbone[0]), adapter.calibration_kinds)
        calibration, replies = collect_statistics(
            self.grid, {node: info[CLIENT_ID] for node, info in nodes.items()}, self.cfg, self.log, layout=layout,
            check_claim=lambda reply: check_claim(self.ledgers, reply, 0, self.plan))
        for reply in replies:
            record_claim(self.ledgers, reply, 0, self.plan)
        self._save_ledgers()
        return calibration, backbone

    def _initialize(self, nodes: dict[int, dict], calibration: Calibration | None, backbone: tuple | None) -> None:
        """The global model (initialized once, or loaded from the checkpoint) and the strategy around it."""
        cfg, checkpoint = self.cfg, self.checkpoint
        # Per-layer ranks (EVA) are part of the adapter's structure: a resumed server reads them off its checkpoint.
        per_layer = checkpoint is not None and get_method(cfg.adapter.method).ranks is not None
        self.model = GlobalModel(cfg, self.task, initialize=checkpoint is None, calibration=calibration,
                                 rank_pattern=ranks_in_state(checkpoint.state) if per_layer else None,
                                 backbone=backbone)
        if checkpoint is not None:
            self.model.load(checkpoint.state)
        elif calibration is not None:
            _check_finite_init(self.model.state(), cfg.adapter.method)
        self.global_state, self.base_init = split_fixed(self.model.state(), self.model.roles())
        secure = bool(cfg.federation.secure_aggregation.enabled)
        self.strategy = AdapterStrategy(
            self.rule,
            client_ids={node: info[CLIENT_ID] for node, info in nodes.items()},
            fraction_train=cfg.federation.fraction,
            min_train_nodes=min(cfg.federation.min_clients, len(nodes)),
            seed=cfg.run.seed,
            base_init=self.base_init,
            weighting=cfg.federation.weighting,
            client_dp=self.client_dp,
            client_trained=self.model.client_trained(),
            server_optimizer=self.server_optimizer,
            a_orthonormal=bool(checkpoint.meta.get("a_orthonormal", False)) if checkpoint else False,
            reference_norm=checkpoint.meta.get("reference_norm") if checkpoint else None,
            # Under secure aggregation no update is seen alone: the bounds become the clients' clip range and cap
            influence=None if secure else InfluenceBound(cfg.federation.update_clip, cfg.federation.weight_cap),
            secure=secure,
            check_claim=lambda reply, round_: check_claim(self.ledgers, reply, round_, self.plan),
        )
        self.secure_round = None
        if secure:
            self.secure_round = SecureRound(self.grid, cfg, self.strategy, self.traffic,
                                            on_reply=lambda _: self.progress.client_done(),
                                            noise=self.level_plan.distributed if self.level_plan else None)
        self.all_clients = sorted(str(info[CLIENT_ID]) for info in nodes.values())

    def _evaluate_start(self) -> None:
        started = time.monotonic()
        evaluation = self.model.evaluate(answers=True)
        self.rows.append(RoundRow(0, None, evaluation["accuracy"], evaluation["loss"], 0, None,
                                  time.monotonic() - started, evaluation["answer_accuracy"]))
        self.log.write("round", **vars(self.rows[-1]))
        self.progress.round_done(self.rows[-1])

    def _score_final_answers(self) -> None:
        """A causal LM's answers are scored at the last round (greedy decoding is costly); a run the privacy budgets
        stopped before it scores its final model's here, so the summary still compares start and end."""
        answers = self.model.evaluate(self.global_state, answers=True).get("answer_accuracy")
        if answers is not None:
            self.rows[-1] = dataclasses.replace(self.rows[-1], answer_accuracy=answers)
            self.log.write("answers", round=self.rows[-1].round, answer_accuracy=answers)

    def _stop_reason(self, round_: int) -> str | None:
        """Why the run ends before this round (privacy budgets), logged; None to go on."""
        stopped = self.budget.stop_reason(self.all_clients, self.ledgers, self.level_ledger,
                                          self.level_plan.charged if self.level_plan else None)
        if stopped:
            self.log.write("stopped", round=round_, reason=stopped)
            self.progress.note(f"stopping before round {round_}: {stopped}")
        return stopped

    def _train_round(self, round_: int) -> dict:
        """Send the global adapter to this round's clients, aggregate their replies, log and mirror them."""
        cfg, strategy = self.cfg, self.strategy
        self.traffic.clear()
        if self.secure_round is not None:
            return self._secure_train_round(round_)
        messages = strategy.train_messages(round_, self.global_state)
        self.progress.start_round(round_, len(messages), round_ - 1)
        replies = exchange(self.grid, messages, timeout=cfg.federation.round_timeout,
                           on_reply=lambda _: self.progress.client_done(), traffic=self.traffic)
        state, summary = strategy.aggregate_train(round_, replies)
        self._note_rejected(round_, summary)
        self._after_round(state, round_)
        self._charge_client_level(round_)  # the noised aggregate is released: it counts, whoever took part
        _log_replies(self.log, round_, strategy.last_replies, replies, self.budget, self.ledgers, cfg,
                     strategy.client_ids, self.traffic, self.plan)
        return summary

    def _secure_train_round(self, round_: int) -> dict:
        """The same round under secure aggregation: the server learns only the clients' weighted mean update."""
        strategy = self.strategy
        self.progress.start_round(round_, len(strategy.sample(round_)), round_ - 1)
        result = self.secure_round.run(round_, self.global_state)
        state, summary = strategy.aggregate_secure(result.outcome, result.mean)
        self._note_rejected(round_, summary)
        summary["secagg-dropped"] = result.dropped
        if result.failure is not None:
            summary["secagg-failed"] = 1
            self.log.write("secagg-failed", round=round_, reason=result.failure)
            self.progress.note(f"round {round_} skipped: {result.failure}")
        elif self.level_plan is not None:
            summary["noise-std"] = result.noise_std
        # The clients' noised sum was unmasked: a release, even when the server then refused it as corrupt (one
        # client can force that every round, and each refused sum still reached the server)
        if result.unmasked and self.level_plan is not None:
            self._charge_client_level(round_)
        self._after_round(state, round_)
        _log_replies(self.log, round_, strategy.last_replies, result.replies, self.budget, self.ledgers, self.cfg,
                     strategy.client_ids, self.traffic, self.plan)
        for node, stage, reason in result.errors:
            self.log.write("client-error", round=round_, node=node, client=strategy.client_ids.get(node),
                           reason=f"secure aggregation, {stage}: {reason}")
        return summary

    def _note_rejected(self, round_: int, summary: dict) -> None:
        if "rejected" in summary:
            self.log.write("round-rejected", round=round_, reason=summary["rejected"])
            self.progress.note(f"round {round_}: {summary['rejected']}; the global adapter stays as it was")

    def _after_round(self, state: dict, round_: int) -> None:
        """The method's server step on the aggregated state (e.g. SST's resampling), then the broadcast state. A
        tensor the step changed has a new layout (SST permutes its spectrum and swaps its trainable singular
        vectors): its server-momentum buffer, in the old layout, would push other triplets, so it is dropped, as
        SST's centralized optimizer resets its moments on every resample."""
        self.global_state = self.model.after_round(state, round_)
        self.server_optimizer.forget(key for key, value in state.items()
                                     if key in self.global_state and not torch.equal(value, self.global_state[key]))

    def _charge_client_level(self, round_: int) -> None:
        """Charge the release to the client-level ledger, on disk at once: the round's line in metrics.jsonl comes
        before the checkpoint, and a run killed in between and resumed would otherwise release the round again,
        with fresh noise, while counting it once."""
        if self.level_ledger is not None:
            self.level_ledger.record(round_, *self.level_plan.charged, 1, attempt=self.level_ledger.next_attempt(round_))
            self.level_ledger.save(self.paths.privacy / CLIENT_LEVEL_LEDGER_FILE)

    def _record_round(self, round_: int, summary: dict, seconds: float) -> None:
        """Evaluate the new global model; its row in metrics.jsonl and on screen."""
        evaluation = self.model.evaluate(self.global_state, answers=round_ == self.cfg.federation.rounds)
        row = RoundRow(round_, summary.get(TRAIN_LOSS), evaluation["accuracy"], evaluation["loss"],
                       int(summary["clients"]),
                       _round_max_epsilon(self.rows[-1].max_epsilon, summary, self.strategy.last_replies, self.ledgers),
                       seconds, evaluation.get("answer_accuracy"), quarantined=int(summary.get("quarantined", 0)),
                       bytes_sent=sum(self.traffic.sent.values()), bytes_received=sum(self.traffic.received.values()))
        self.rows.append(row)
        bounded = {"norm_clipped": int(summary.get("norm-clipped", 0)), "weight_capped": int(summary.get("weight-capped", 0))}
        if self.secure_round is not None:
            bounded |= {"secagg_dropped": int(summary.get("secagg-dropped", 0)),
                        "secagg_failed": int(summary.get("secagg-failed", 0))}
        self.log.write("round", **vars(row), **bounded, **_client_level_fields(summary, self.level_ledger))
        self.progress.round_done(row)

    def _save_ledgers(self) -> None:
        for ledger in self.ledgers.values():
            ledger.save(self.paths.ledgers / f"client-{ledger.client_id}.json")
        if self.level_ledger is not None:
            self.level_ledger.save(self.paths.privacy / CLIENT_LEVEL_LEDGER_FILE)

    def _save_checkpoint(self, round_: int) -> None:
        """The ledgers, then the round's checkpoint: what a resumed run needs to continue exactly. A failed write
        (disk full, folder gone read-only) ends the run with one line; every earlier checkpoint is whole."""
        try:
            self._write_checkpoint(round_)
        except OSError as error:
            raise FedspecError(f"could not write round {round_}'s checkpoint under {self.paths.root}: "
                               f"{error.strerror or error}; free the disk or fix the folder, then continue with "
                               f"--resume ({f'from round {round_ - 1}' if round_ else 'round 0 runs again'})") from None

    def _write_checkpoint(self, round_: int) -> None:
        self._save_ledgers()
        save_checkpoint(
            self.paths.checkpoints,
            round_,
            {**self.global_state, **self.base_init, **self.server_optimizer.state()},
            {"strategy": self.rule.name, "seed": self.cfg.run.seed, "rows": [vars(r) for r in self.rows],
             "declined": self.budget.declined, "a_orthonormal": self.strategy.a_orthonormal,
             "reference_norm": self.strategy.reference_norm},
        )


def _client_level_fields(summary, level_ledger: PrivacyLedger | None) -> dict:
    """Extra fields of a round's metrics line under client-level DP: its ε so far, how many updates were clipped
    (None under secure aggregation, where only each client knows)."""
    if level_ledger is None:
        return {}
    clipped = summary.get("clipped", 0)
    return {"client_level_epsilon": level_ledger.epsilon(), "clipped": None if clipped is None else int(clipped),
            "noise_std": float(summary.get("noise-std", 0.0))}

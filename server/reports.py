"""What a finished federation leaves behind: the final adapter, the privacy report and ``summary.md``."""

from __future__ import annotations

import statistics

import torch
from omegaconf import DictConfig

from fedspec.builders import (
    InitStatistics,
    ModelSettings,
    causal_lm_summary_lines,
    peft_export_line,
    write_peft_export,
)
from fedspec.devices import device_name
from fedspec.privacy import PrivacyLedger, load_ledgers, write_privacy_report
from fedspec.privacy.accounting import epsilon_text
from fedspec.privacy.client_level import CLIENT_LEVEL_LEDGER_FILE
from fedspec.privacy.disclosures import server_sees
from fedspec.privacy.planning import PlanSettings
from fedspec.privacy.report import ClientLevelSettings
from fedspec.rundir import MetricsLog, RunPaths
from fedspec.trained import labels_metadata

from .global_model import GlobalModel
from .messaging import NO_REPLY_IN_TIME
from .progress import RoundRow, byte_size, rounds_markdown


def privacy_settings(cfg: DictConfig) -> dict:
    plan = PlanSettings.of(cfg)
    return {
        "record_level_dp": bool(cfg.privacy.enabled),
        "client_level_dp": bool(cfg.privacy.client_level.enabled),
        # the ε the plan aims at: the target σ was planned for, or (σ given) the budget clients enforce
        "target_epsilon": (None if not cfg.privacy.enabled else
                           cfg.privacy.target_epsilon if cfg.privacy.noise_multiplier is None else plan.budget_epsilon),
        "budget_epsilon": plan.budget_epsilon if cfg.privacy.enabled else None,
        "max_grad_norm": cfg.privacy.max_grad_norm,
        "head_clip_share": cfg.privacy.get("head_clip_share"),  # per-group clipping: same total norm, same noise
        "rounds": cfg.federation.rounds,
        "local_steps": cfg.train.local_steps,
        "batch_size": cfg.train.batch_size,
        "participation_probability": plan.participation_probability,
        "weighting": cfg.federation.weighting,
        **InitStatistics.of(cfg).report(None),
    }


def write_run_privacy_report(
    cfg: DictConfig,
    paths: RunPaths,
    ledgers: dict[str, PrivacyLedger],
    *,
    declined: dict[str, list[int]] | None = None,
    stopped: str | None = None,
    client_level: PrivacyLedger | None = None,
) -> dict:
    """privacy/report.{json,md} and epsilon.png of a federated run, from its config and ledgers.

    Under record-level DP every client of the federation appears, those never sampled with ε = 0."""
    if cfg.privacy.enabled:
        ledgers = {**{str(c): PrivacyLedger(str(c), delta=cfg.privacy.delta, accountant=cfg.privacy.accountant)
                      for c in range(int(cfg.federation.clients))}, **ledgers}
    level = None
    if client_level is not None:
        level_cfg = cfg.privacy.client_level
        level = ClientLevelSettings(
            ledger=client_level,
            clipping_norm=float(level_cfg.clipping_norm),
            expected_clients=float(cfg.federation.fraction) * int(cfg.federation.clients),
            target_epsilon=level_cfg.target_epsilon,
            distributed=bool(cfg.federation.secure_aggregation.enabled),
        )
    quarantined, timed_out, reported = _reply_history(paths)
    return write_privacy_report(
        paths.privacy,
        ledgers,
        delta=cfg.privacy.delta,
        accountant=cfg.privacy.accountant,
        max_grad_norm=cfg.privacy.max_grad_norm if cfg.privacy.enabled else None,
        extra=privacy_settings(cfg),
        record_level=bool(cfg.privacy.enabled),
        client_level=level,
        declined=declined,
        quarantined=quarantined,
        timed_out=timed_out,
        reported=reported if cfg.privacy.enabled else None,
        server_sees=server_sees(cfg.privacy, cfg.federation, method=cfg.adapter.method,
                                batch_size=cfg.train.batch_size),
        stopped=stopped,
        secure_aggregation=bool(cfg.federation.secure_aggregation.enabled),
    )


def _reply_history(paths: RunPaths) -> tuple[dict[str, list[int]], dict[str, list[int]], dict[str, float]]:
    """From metrics.jsonl: each client's rounds whose reply was rejected, those it did not answer in time, and
    the largest ε it stated of its own ledger in any reply the server read."""
    quarantined: dict[str, list[int]] = {}
    timed_out: dict[str, list[int]] = {}
    reported: dict[str, float] = {}
    for line in MetricsLog(paths.metrics).read() if paths.metrics.is_file() else []:
        kind, client = line["kind"], line.get("client", line.get("client_id"))
        if client is None:
            continue
        client = str(int(client))
        if kind == "client-quarantined":
            quarantined.setdefault(client, []).append(int(line["round"]))
        elif kind == "client-error" and str(line.get("reason", "")).startswith(NO_REPLY_IN_TIME):
            timed_out.setdefault(client, []).append(int(line["round"]))
        elif kind in ("client", "client-declined") and line.get("epsilon") is not None:
            reported[client] = max(reported.get(client, 0.0), float(line["epsilon"]))
    return quarantined, timed_out, reported


def rewrite_run_privacy_report(cfg: DictConfig, paths: RunPaths) -> dict:
    """The report again from what the run folder holds: mirrored ledgers, the client-level ledger, and the
    declines and early stop recorded in metrics.jsonl (`fedspec privacy-report`)."""
    ledgers = load_ledgers(paths.ledgers) if paths.ledgers.is_dir() else {}
    declined: dict[str, list[int]] = {}
    stopped = None
    for line in MetricsLog(paths.metrics).read():
        if line["kind"] == "client-declined":
            declined.setdefault(str(int(line["client_id"])), []).append(int(line["round"]))
        elif line["kind"] == "stopped":
            stopped = str(line["reason"])
    level_path = paths.privacy / CLIENT_LEVEL_LEDGER_FILE
    client_level = PrivacyLedger.load(level_path) if level_path.is_file() else None
    return write_run_privacy_report(cfg, paths, ledgers if cfg.privacy.enabled else {}, declined=declined,
                                    stopped=stopped, client_level=client_level)


def write_final_reports(
    cfg: DictConfig,
    paths: RunPaths,
    model: GlobalModel,
    rows: list[RoundRow],
    ledgers: dict[str, PrivacyLedger],
    *,
    declined: dict[str, list[int]] | None = None,
    stopped: str | None = None,
    client_level: PrivacyLedger | None = None,
) -> None:
    settings = ModelSettings.of(cfg)
    model.save(paths.adapter, metadata={"run": cfg.run.name, "rounds": rows[-1].round, "strategy": cfg.strategy.name,
                                        **labels_metadata(settings, model.held_out.label_names)})
    peft_export = write_peft_export(model.model, paths.adapter_peft, settings)
    report = write_run_privacy_report(cfg, paths, ledgers, declined=declined, stopped=stopped,
                                      client_level=client_level)
    compute = compute_line(model.device, [line for line in MetricsLog(paths.metrics).read() if line["kind"] == "client"])
    paths.summary.write_text(summary_markdown(cfg, rows, report, peft_export, compute))


def compute_line(server_device: torch.device, client_lines: list[dict]) -> str:
    """Where the run computed: the server's device, and what the clients reported of theirs each round (their
    ``client`` lines in metrics.jsonl: CUDA or not, seconds per optimizer step, peak memory)."""
    line = f"- compute: the server evaluated on {device_name(server_device)}"
    reported = [c for c in client_lines if "cuda" in c]
    if not reported:
        return line
    on_gpu = {c["client_id"] for c in reported if c["cuda"]}
    on_cpu = {c["client_id"] for c in reported if not c["cuda"]}
    where = ", ".join(f"{len(ids)} on {kind}" for ids, kind in ((on_gpu, "CUDA"), (on_cpu, "their CPU")) if ids)
    line += f"; clients trained {where}"
    steps = [c["step_seconds"] for c in reported if "step_seconds" in c]
    if steps:
        line += f", median {statistics.median(steps) * 1000:.0f} ms per optimizer step"
    for ids, cuda, memory in ((on_gpu, True, "GPU memory"), (on_cpu, False, "resident memory")):
        peaks = [c["peak_memory_mib"] for c in reported if c["cuda"] == cuda and "peak_memory_mib" in c]
        if ids and peaks:
            line += f", peak {memory} up to {max(peaks) / 1024:.2f} GiB"
    return line


def summary_markdown(
    cfg: DictConfig, rows: list[RoundRow], privacy_report: dict, peft_export: str | None, compute: str | None = None
) -> str:
    """``peft_export``: why the run has no PEFT export (None: it has one); ``compute``: the line of
    :func:`compute_line`."""
    first, last = rows[0], rows[-1]
    if cfg.privacy.enabled:
        epsilons = [c["final_epsilon"] for c in privacy_report.get("clients", {}).values()]
        privacy = (
            f"record-level DP-SGD, each client's ε over the whole run at δ = {cfg.privacy.delta:g} "
            f"({cfg.privacy.accountant.upper()}): max {epsilon_text(max(epsilons))}" if epsilons else "no client trained"
        )
    else:
        privacy = "**no record-level differential privacy** (privacy.enabled=false)"
    level = privacy_report.get("client_level")
    if level:
        privacy += (f"; client-level DP of the aggregate: ε = {epsilon_text(level['final_epsilon'])} at δ = {level['delta']:g} "
                    f"after {level['rounds_released']} rounds")
    declined = privacy_report.get("declined") or {}
    lines = [
        f"# fedspec run `{cfg.run.name}`",
        "",
        f"- model: `{cfg.model.name}`, adapter: `{cfg.adapter.method}` rank {cfg.adapter.rank}, "
        f"strategy: `{cfg.strategy.name}`",
        f"- federation: {cfg.federation.clients} clients, {cfg.federation.rounds} rounds, "
        f"fraction {cfg.federation.fraction}, {cfg.train.local_steps} local steps of batch {cfg.train.batch_size}, "
        f"weighting `{cfg.federation.weighting}`",
        f"- data: `{cfg.data.source}` ("
        + (f"Dirichlet α = {cfg.data.alpha:g}" if cfg.data.partition == "dirichlet" else cfg.data.partition) + ")",
        f"- privacy: {privacy}",
    ]
    if compute:
        lines.append(compute)
    if declined:
        lines.append(f"- budget enforcement: clients {', '.join(declined)} declined rounds their budget did not cover")
    if privacy_report.get("stopped"):
        lines.append(f"- **stopped after round {last.round}**: {privacy_report['stopped']}")
    rejected = sum(row.quarantined for row in rows)
    if rejected:
        lines.append(f"- rejected replies: {rejected} (not aggregated; `client-quarantined` lines in metrics.jsonl "
                     "say why)")
    sent, received = sum(row.bytes_sent for row in rows), sum(row.bytes_received for row in rows)
    if sent or received:
        lines.append(f"- communication: {byte_size(sent)} sent to clients, {byte_size(received)} received from them "
                     f"over {len(rows) - 1} round{'' if len(rows) == 2 else 's'}")
    lines += [
        f"- eval accuracy: {first.eval_accuracy:.4f} (round {first.round}) → {last.eval_accuracy:.4f} (round {last.round})",
        *causal_lm_summary_lines(cfg.data, (first.eval_loss, last.eval_loss), (first.answer_accuracy, last.answer_accuracy),
                                 "round", last.round),
        "",
        rounds_markdown(rows),
        "",
        "Files: `config.yaml`, `metrics.jsonl`, `adapter/`, `checkpoints/round-NNNN/`, `privacy/report.md`.",
        peft_export_line(peft_export),
        "",
    ]
    return "\n".join(lines)

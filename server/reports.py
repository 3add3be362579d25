"""What a finished federation leaves behind: the final adapter, the privacy report and ``summary.md``."""

from __future__ import annotations

from omegaconf import DictConfig

from fedspec.builders import init_statistics_report, write_peft_export
from fedspec.privacy import PrivacyLedger, write_privacy_report
from fedspec.rundir import RunPaths

from .global_model import GlobalModel
from .progress import RoundRow, rounds_markdown


def privacy_settings(cfg: DictConfig) -> dict:
    return {
        "record_level_dp": bool(cfg.privacy.enabled),
        "target_epsilon": cfg.privacy.target_epsilon,
        "max_grad_norm": cfg.privacy.max_grad_norm,
        "rounds": cfg.federation.rounds,
        "local_steps": cfg.train.local_steps,
        "batch_size": cfg.train.batch_size,
        **init_statistics_report(cfg, None),
    }


def write_final_reports(
    cfg: DictConfig, paths: RunPaths, model: GlobalModel, rows: list[RoundRow], ledgers: dict[str, PrivacyLedger]
) -> None:
    model.save(paths.adapter, metadata={"run": cfg.run.name, "rounds": rows[-1].round, "strategy": cfg.strategy.name})
    write_peft_export(model.model, paths.adapter_peft, cfg)
    report = {}
    if ledgers:  # without DP (or before any client trained) there is no ledger and nothing to report
        report = write_privacy_report(
            paths.privacy,
            ledgers,
            delta=cfg.privacy.delta,
            accountant=cfg.privacy.accountant,
            max_grad_norm=cfg.privacy.max_grad_norm,
            extra=privacy_settings(cfg),
        )
    paths.summary.write_text(summary_markdown(cfg, rows, report))


def summary_markdown(cfg: DictConfig, rows: list[RoundRow], privacy_report: dict) -> str:
    first, last = rows[0], rows[-1]
    if cfg.privacy.enabled:
        epsilons = [c["final_epsilon"] for c in privacy_report.get("clients", {}).values()]
        privacy = (
            f"record-level DP-SGD, each client's ε over the whole run at δ = {cfg.privacy.delta:g} "
            f"({cfg.privacy.accountant.upper()}): max {max(epsilons):.3f}" if epsilons else "no client trained"
        )
    else:
        privacy = "**no differential privacy** (privacy.enabled=false)"
    return "\n".join([
        f"# fedspec run `{cfg.run.name}`",
        "",
        f"- model: `{cfg.model.name}`, adapter: `{cfg.adapter.method}` rank {cfg.adapter.rank}, "
        f"strategy: `{cfg.strategy.name}`",
        f"- federation: {cfg.federation.clients} clients, {cfg.federation.rounds} rounds, "
        f"fraction {cfg.federation.fraction}, {cfg.train.local_steps} local steps of batch {cfg.train.batch_size}",
        f"- data: `{cfg.data.source}` ({cfg.data.partition}, α = {cfg.data.alpha})",
        f"- privacy: {privacy}",
        f"- eval accuracy: {first.eval_accuracy:.4f} (round {first.round}) → {last.eval_accuracy:.4f} (round {last.round})",
        "",
        rounds_markdown(rows),
        "",
        "Files: `config.yaml`, `metrics.jsonl`, `adapter/`, `checkpoints/last/`, `privacy/report.md`.",
        "",
    ])

"""`fedspec audit`: run a whole federation once with canaries in the clients' data, then bound ε from below.

The run is an ordinary ``fedspec simulate`` run (same Flower apps, same DP-SGD, same aggregation) with
``audit.canaries = m``: every client appends the canaries it owns whose inclusion bit is set
(``fedspec.privacy.audit``). Afterwards the auditor rebuilds the initial global model and loads the final
adapter, scores each canary by how much its loss fell, and turns the correct membership guesses into ε̂
(Steinke, Nasr & Jagielski 2023, Theorem 3.1). Results go to ``runs/<name>/audit/`` (report.json, report.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from fedspec.adapters import get_method, load_adapter
from fedspec.builders import ModelSettings, build_model, build_task
from fedspec.errors import ConfigError
from fedspec.models import build_classifier, tokenize
from fedspec.privacy.atomic import write_atomic
from fedspec.privacy.audit import (
    MAX_DEFAULT_CANARIES,
    AuditResult,
    audit_scores,
    canaries_to_refute,
    loss_per_example,
    run_canaries,
    summary_lines,
)
from fedspec.rundir import RunPaths
from fedspec.strategies import get_rule

from .driver import simulate


@dataclass
class AuditOutcome:
    paths: RunPaths
    result: AuditResult
    claimed_epsilon: float | None  # the largest record-level ε of any client (None: no DP)
    client_level_epsilon: float | None


def canary_scores(cfg: DictConfig, paths: RunPaths) -> tuple[list[float], list[bool]]:
    """(loss under the initial global model − loss under the final one, inclusion bit) of every canary."""
    task = build_task(cfg.data, cfg.run.seed)
    initial, tokenizer = build_model(ModelSettings.of(cfg), task.num_classes,
                                     train_A=get_rule(cfg.strategy.name).clients_train_A)
    final, _ = build_classifier(cfg.model, task.num_classes, seed=cfg.run.seed)
    load_adapter(final, paths.adapter)
    texts, assignment = run_canaries(cfg.audit.canaries, cfg.federation.clients, cfg.audit.seed,
                                     tokenizer.get_vocab(), [*task.train.texts, *task.eval.texts], task.num_classes)
    inputs = tokenize(tokenizer, texts, cfg.model.max_length)
    labels = torch.tensor(assignment.labels, dtype=torch.long)
    before = loss_per_example(initial, inputs.input_ids, inputs.attention_mask, labels)
    after = loss_per_example(final, inputs.input_ids, inputs.attention_mask, labels)
    return (before - after).tolist(), list(assignment.included)


def default_canaries(cfg: DictConfig) -> int:
    """audit.canaries=0: as many canaries as it takes for the audit to be able to refute the run's target ε (an
    audit that cannot show ε̂ above the claim proves nothing about it); 1,000 for a run without DP."""
    if not cfg.privacy.enabled:
        return 1000
    claim = float(cfg.privacy.target_epsilon if cfg.privacy.noise_multiplier is None else
                  cfg.privacy.budget_epsilon or cfg.privacy.target_epsilon or 8.0)
    needed = canaries_to_refute(claim, float(cfg.audit.confidence), float(cfg.privacy.delta))
    if needed is None:
        raise ConfigError(
            f"no audit of up to {MAX_DEFAULT_CANARIES} canaries could refute ε = {claim:g} at δ = "
            f"{cfg.privacy.delta:g} (ε̂ grows only with the logarithm of the canaries); give --canaries M to audit "
            "anyway: the report states the largest ε̂ it could show"
        )
    return needed


def run_audit(cfg: DictConfig, console: Console | None = None) -> AuditOutcome:
    if cfg.data.task != "classification":
        raise ConfigError(f"fedspec audit plants labelled canary records, so it needs a classification task; "
                          f"data.task={cfg.data.task} has none (audit a classifier with the same privacy settings)")
    if get_method(cfg.adapter.method).calibration:
        # the canaries are scored against the initial global model, rebuilt here from the config: a data-driven one
        # comes from the clients' round-0 statistics, which only the run's server saw
        raise ConfigError(f"fedspec audit rebuilds the run's initial global model to score the canaries, but "
                          f"adapter.method={cfg.adapter.method} initializes from the clients' data (round 0); audit a "
                          "method that initializes from the weights (e.g. adapter=pissa) with the same privacy settings")
    if cfg.audit.canaries < 1:
        cfg = OmegaConf.merge(cfg, {"audit": {"canaries": default_canaries(cfg)}})
        (console or Console(stderr=True)).print(
            f"audit.canaries: {cfg.audit.canaries}, the fewest that could refute the run's target ε "
            f"(set --canaries M to choose)")
    if cfg.run.resume:
        raise ConfigError("fedspec audit does not resume runs; start a new one (drop --resume / run.resume)")
    simulation = simulate(cfg, console)
    paths = simulation.paths
    scores, included = canary_scores(cfg, paths)
    result = audit_scores(scores, included, confidence=float(cfg.audit.confidence), delta=float(cfg.privacy.delta))
    report = json.loads((paths.privacy / "report.json").read_text())
    claimed = report["summary"]["max_epsilon"] if report["record_level"] else None
    level = report["client_level"]["final_epsilon"] if report.get("client_level") else None
    outcome = AuditOutcome(paths, result, claimed, level)
    write_audit_report(outcome, cfg)
    return outcome


def audit_dict(outcome: AuditOutcome, cfg: DictConfig) -> dict[str, Any]:
    return {
        "format": "fedspec-audit-report",
        "version": 1,
        "method": "one-run canary audit, Steinke, Nasr & Jagielski (2023), Theorem 3.1",
        "result": outcome.result.to_dict(),
        "claimed_record_level_epsilon": outcome.claimed_epsilon,
        "client_level_epsilon": outcome.client_level_epsilon,
        "delta": float(cfg.privacy.delta),
        "record_level_dp": bool(cfg.privacy.enabled),
        "score": "loss under the initial global model minus loss under the final global model",
        "canary": "8 vocabulary words no training record uses, random label; owners and labels fixed by audit.seed",
    }


def write_audit_report(outcome: AuditOutcome, cfg: DictConfig) -> None:
    folder = outcome.paths.root / "audit"
    data = audit_dict(outcome, cfg)
    write_atomic(folder / "report.json", (json.dumps(data, indent=2, allow_nan=False, default=str) + "\n").encode())
    claimed = {"record-level ε claimed by the accountant (max over clients)": outcome.claimed_epsilon}
    if outcome.client_level_epsilon is not None:
        claimed["client-level ε claimed by the accountant"] = outcome.client_level_epsilon
    lines = ["# Privacy audit", "", f"Method: {data['method']}.", f"Score: {data['score']}.", f"Canaries: {data['canary']}.",
             "", *[f"- {line}" for line in summary_lines(outcome.result, claimed)], ""]
    write_atomic(folder / "report.md", "\n".join(lines).encode())

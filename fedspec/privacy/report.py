"""The privacy report of a run: per-client ε over rounds as JSON, Markdown and a plot.

Written to `runs/<name>/privacy/` (report.json, report.md, epsilon.png). Every ε in it is one
client's cumulative guarantee for the whole run up to that round, recomputed from the ledgers at
the report's δ and accountant, never a per-round figure.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .accounting import validate_accountant, validate_delta
from .atomic import write_atomic
from .ledger import PrivacyLedger, client_sort_key

__all__ = [
    "REPORT_FORMAT",
    "REPORT_VERSION",
    "build_privacy_report",
    "render_markdown",
    "write_privacy_report",
]

REPORT_FORMAT = "fedspec-privacy-report"
REPORT_VERSION = 1
GUARANTEE = (
    "record-level (epsilon, delta)-DP per client: each epsilon bounds what a client's released updates "
    "reveal about any single one of its training records, composed over every DP-SGD step of every "
    "round that client took part in (the whole run, not per round)"
)
_ACCOUNTANT_NAMES = {"rdp": "RDP (Opacus RDPAccountant)", "prv": "PRV (Opacus PRVAccountant)"}


def write_privacy_report(
    out_dir: str | os.PathLike[str],
    ledgers: Mapping[str, PrivacyLedger],
    *,
    delta: float,
    accountant: str,
    max_grad_norm: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `report.json`, `report.md` and `epsilon.png` into `out_dir`; return the report dict.

    `extra` is stored as is (it must be JSON-serializable); its "target_epsilon", if any, is drawn
    as a dashed line and each client is checked against it. In the returned dict an infinite ε is
    a float; report.json stores it as the string "inf" (standard JSON has no infinity).
    """
    from .plot import render_epsilon_png  # matplotlib loads only when a report is drawn

    report = build_privacy_report(
        ledgers, delta=delta, accountant=accountant, max_grad_norm=max_grad_norm, extra=extra
    )
    out = Path(out_dir)
    text = json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n"
    write_atomic(out / "report.json", text.encode("utf-8"))
    write_atomic(out / "report.md", render_markdown(report).encode("utf-8"))
    write_atomic(out / "epsilon.png", render_epsilon_png(report))
    return report


def build_privacy_report(
    ledgers: Mapping[str, PrivacyLedger],
    *,
    delta: float,
    accountant: str,
    max_grad_norm: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report as a dict: settings, per-client per-round ε, final ε per client, max and median."""
    delta = validate_delta(delta)
    accountant = validate_accountant(accountant)
    if max_grad_norm is not None and not _positive(max_grad_norm):
        raise ValueError(f"max_grad_norm must be a number > 0, got {max_grad_norm!r}")
    extra = dict(extra or {})
    target = extra.get("target_epsilon")
    if target is not None and not _positive(target):
        raise ValueError(f"extra['target_epsilon'] must be a number > 0, got {target!r}")
    if not ledgers:
        raise ValueError("no client ledgers to report on")

    clients = {}
    for client_id in sorted(ledgers, key=client_sort_key):
        ledger = ledgers[client_id]
        if ledger.client_id != client_id:
            raise ValueError(f"ledger under key {client_id!r} belongs to client {ledger.client_id!r}")
        clients[client_id] = _client_section(ledger, delta, accountant)

    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "guarantee": GUARANTEE,
        "delta": delta,
        "accountant": accountant,
        "max_grad_norm": max_grad_norm,
        "summary": _summary(clients, target),
        "clients": clients,
        "extra": extra,
    }


def _positive(value: object) -> bool:
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    return real and math.isfinite(value) and value > 0


def _client_section(ledger: PrivacyLedger, delta: float, accountant: str) -> dict[str, Any]:
    by_round = ledger.epsilon_by_round(delta, accountant)
    rounds = [
        {
            "round": entry.round,
            "epsilon": eps,
            "noise_multiplier": entry.noise_multiplier,
            "sample_rate": entry.sample_rate,
            "steps": entry.steps,
            "accountant": accountant,
        }
        for entry, (_, eps) in zip(ledger.entries, by_round)
    ]
    return {
        "rounds_taken_part": len(rounds),
        "total_steps": sum(entry.steps for entry in ledger.entries),
        "final_epsilon": rounds[-1]["epsilon"] if rounds else 0.0,
        "rounds": rounds,
    }


def _summary(clients: dict[str, dict[str, Any]], target: float | None) -> dict[str, Any]:
    finals = {client_id: section["final_epsilon"] for client_id, section in clients.items()}
    worst = max(finals, key=finals.__getitem__)
    summary: dict[str, Any] = {
        "num_clients": len(finals),
        "max_epsilon": finals[worst],
        "max_epsilon_client": worst,
        "median_epsilon": statistics.median(finals.values()),
        "target_epsilon": target,
    }
    if target is not None:
        summary["clients_above_target"] = [client_id for client_id, eps in finals.items() if eps > target]
    return summary


def _json_safe(value: Any) -> Any:
    """Non-finite floats as strings ("inf"), so report.json is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


# ------------------------------------------------------------------------------------------ markdown


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md: plain-words header, the summary line, a table of clients, a table of rounds."""
    return "\n".join([*_header(report), *_init_statistics(report), "", *_clients_table(report), "",
                      *_rounds_table(report), ""])


def _init_statistics(report: Mapping[str, Any]) -> list[str]:
    """The round-0 statistic of a data-driven initialization (CorDA, EVA, LoRA-GA, FWSVD), when there is one."""
    section = (report.get("extra") or {}).get("init_statistics")
    if not section:
        return []
    what = f"{', '.join(section['statistics'])} statistics of up to {section['examples_per_party']} records"
    if section["privatized"]:
        text = (
            f"**Initialization statistic (round 0): privatized.** `{section['method']}` initialized from {what} "
            f"per client; each record's whole contribution was clipped to norm {section['max_norm']:g} and Gaussian "
            f"noise of std {section['noise_multiplier']:g} × that norm added to the sums (the Gaussian mechanism). "
            "Each client's ledger counts it as round 0 with σ = "
            f"{section['noise_multiplier']:g}, q = 1, 1 step, so every ε below includes it."
        )
    else:
        text = (
            f"**Initialization statistic (round 0): NOT privatized.** `{section['method']}` initialized from exact "
            f"{what} per client, released without noise; the ε values below cover DP-SGD training only, not this "
            "statistic. Set privacy.private_init_stats=true to clip and noise it and count it in ε."
        )
    return ["", text]


def _header(report: Mapping[str, Any]) -> list[str]:
    norm = report["max_grad_norm"]
    clipping = "clipped" if norm is None else f"clipped to norm C = {norm:g}"
    summary = report["summary"]
    lines = [
        "# Privacy report",
        "",
        "**What is protected:** each client's individual training records. Every client trains with "
        f"record-level DP-SGD (Opacus: each record's gradient {clipping}, Gaussian noise added to the sum, "
        "Poisson-sampled batches), so the updates it sends reveal little about any one of its records.",
        "",
        f"**What ε means here:** one (ε, δ) guarantee per client, at δ = {report['delta']:g}, "
        "for the WHOLE run: composed over every local step of every round the client took part in, "
        "not per round. A round a client sat out costs it nothing. Smaller ε is stronger privacy.",
        "",
        "**Not covered:** whether a client took part at all (this is record-level, not client-level, DP), "
        "and anything outside DP-SGD training, such as evaluation metrics a client reports.",
        "",
        f"Accountant: {_ACCOUNTANT_NAMES[report['accountant']]}. "
        f"Clients: {summary['num_clients']}. "
        f"Max ε: {_fmt(summary['max_epsilon'])} (client {summary['max_epsilon_client']}). "
        f"Median ε: {_fmt(summary['median_epsilon'])}.",
    ]
    if summary["target_epsilon"] is not None:
        above = summary["clients_above_target"]
        lines[-1] += (
            f" Target ε: {_fmt(summary['target_epsilon'])}; "
            + (f"above target: {', '.join(above)}." if above else "no client above it.")
        )
    return lines


def _clients_table(report: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Clients",
        "",
        "| client | rounds taken part | total steps | σ (noise multiplier) | q (sample rate) | final ε |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for client_id, section in report["clients"].items():
        rounds = section["rounds"]
        sigma = _span([r["noise_multiplier"] for r in rounds])
        q = _span([r["sample_rate"] for r in rounds])
        lines.append(
            f"| {client_id} | {section['rounds_taken_part']} | {section['total_steps']} | {sigma} | {q} "
            f"| {_fmt(section['final_epsilon'])} |"
        )
    return lines


def _rounds_table(report: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Rounds",
        "",
        "ε after a round covers the whole run up to and including that round.",
        "",
        "| client | round | σ | q | steps | ε after round |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for client_id, section in report["clients"].items():
        for r in section["rounds"]:
            lines.append(
                f"| {client_id} | {r['round']} | {_fmt(r['noise_multiplier'])} | {_fmt(r['sample_rate'])} "
                f"| {r['steps']} | {_fmt(r['epsilon'])} |"
            )
    return lines


def _fmt(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.4g}"


def _span(values: Sequence[float]) -> str:
    """One value if all rounds agree, else "min–max"; "–" for a client with no rounds."""
    if not values:
        return "–"
    low, high = min(values), max(values)
    return _fmt(low) if low == high else f"{_fmt(low)}–{_fmt(high)}"

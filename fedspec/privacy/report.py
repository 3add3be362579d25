"""The privacy report of a run: what is protected, what is not, and every ε, as JSON, Markdown and a plot.

Written to `runs/<name>/privacy/` (report.json, report.md, epsilon.png). Every ε in it is a cumulative
guarantee for the whole run up to that round, recomputed from the ledgers at the report's δ and
accountant, never a per-round figure:
- record-level: one ε per client (each client's own DP-SGD ledger);
- client-level (when on): one ε for the noised aggregate, over every round it was released.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .accounting import epsilon_text, validate_accountant, validate_delta
from .atomic import write_atomic
from .ledger import PrivacyLedger, client_sort_key

__all__ = [
    "REPORT_FORMAT",
    "REPORT_VERSION",
    "ClientLevelSettings",
    "build_privacy_report",
    "render_markdown",
    "write_privacy_report",
]

REPORT_FORMAT = "fedspec-privacy-report"
REPORT_VERSION = 2
GUARANTEE = (
    "record-level (epsilon, delta)-DP per client: each epsilon bounds what a client's released updates "
    "reveal about any single one of its training records, composed over every DP-SGD step of every "
    "round that client took part in (the whole run, not per round)"
)
CLIENT_LEVEL_GUARANTEE = (
    "client-level (epsilon, delta)-DP of the aggregate: each round's global update is the clipped sum of the "
    "sampled clients' updates plus Gaussian noise, so the sequence of global models reveals little about "
    "whether any one client took part at all, composed over every released round"
)
DISTRIBUTED_GUARANTEE = (
    "client-level (epsilon, delta)-DP of the aggregate under zero-out adjacency: each round's global update is the "
    "sum of the clients' clipped, integer updates plus the Skellam noise shares they added themselves, unmasked by "
    "secure aggregation, so no party (the server included) sees a sum with less than the whole noise and the global "
    "models reveal little about any one client's data; every summed round is charged in full, without "
    "amplification by sampling. Against the server it assumes honest clients (each adds its noise share) and a "
    "server that relays the secure-aggregation protocol as written"
)
_ACCOUNTANT_NAMES = {"rdp": "RDP (Opacus RDPAccountant)", "prv": "PRV (Opacus PRVAccountant)",
                     "skellam": "Skellam RDP at integer orders (Agarwal et al. 2021), Opacus' RDP conversion"}


@dataclass(frozen=True)
class ClientLevelSettings:
    """The server's client-level DP: its ledger (one entry of one step per released round) and settings."""

    ledger: PrivacyLedger
    clipping_norm: float
    expected_clients: float  # q·N, the fixed denominator
    target_epsilon: float | None = None
    distributed: bool = False  # the clients added the noise under secure aggregation (fedspec.privacy.skellam)


def write_privacy_report(
    out_dir: str | os.PathLike[str], ledgers: Mapping[str, PrivacyLedger], **settings: Any
) -> dict[str, Any]:
    """Write `report.json`, `report.md` and `epsilon.png` into `out_dir`; return the report dict.

    `settings` are the keywords of :func:`build_privacy_report` (delta, accountant, ...). Its `extra` is stored
    as is (it must be JSON-serializable); its "target_epsilon", if any, is drawn as a dashed line and each
    client is checked against it. In the returned dict an infinite ε is a float; report.json stores it as the
    string "inf" (standard JSON has no infinity).
    """
    from .plot import render_epsilon_png  # matplotlib loads only when a report is drawn

    report = build_privacy_report(ledgers, **settings)
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
    record_level: bool = True,
    client_level: ClientLevelSettings | None = None,
    declined: Mapping[str, Sequence[int]] | None = None,
    quarantined: Mapping[str, Sequence[int]] | None = None,
    timed_out: Mapping[str, Sequence[int]] | None = None,
    reported: Mapping[str, float] | None = None,
    server_sees: Sequence[str] | None = None,
    stopped: str | None = None,
    secure_aggregation: bool = False,
) -> dict[str, Any]:
    """The report as a dict: what is protected and what is not, settings, per-client per-round ε, final ε
    per client with max and median, the client-level ε over rounds, the rounds clients declined, those whose
    replies the server rejected and those it got no reply for in time.

    The ledgers are the server's copies, built from the replies it accepted: a round whose reply was rejected
    or late is missing there, though the client spent it. ``reported``: the largest ε each client stated of its own
    ledger in a later reply; where it exceeds the copy's, it is the client's final ε (``final_from_client``), so
    the report never shows less than the client spent, as far as the server can know."""
    delta = validate_delta(delta)
    accountant = validate_accountant(accountant)
    if max_grad_norm is not None and not _positive(max_grad_norm):
        raise ValueError(f"max_grad_norm must be a number > 0, got {max_grad_norm!r}")
    extra = dict(extra or {})
    target = extra.get("target_epsilon")
    if target is not None and not _positive(target):
        raise ValueError(f"extra['target_epsilon'] must be a number > 0, got {target!r}")
    if ledgers and not record_level:
        raise ValueError("client ledgers given, but record_level=False: a run without record-level DP has none")

    clients = {}
    for client_id in sorted(ledgers, key=client_sort_key):
        ledger = ledgers[client_id]
        if ledger.client_id != client_id:
            raise ValueError(f"ledger under key {client_id!r} belongs to client {ledger.client_id!r}")
        clients[client_id] = _client_section(ledger, delta, accountant)
        stated = (reported or {}).get(client_id)
        if stated is not None and stated > clients[client_id]["final_epsilon"] * (1 + 1e-9):
            clients[client_id].update(final_epsilon=float(stated), final_from_client=True)

    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "record_level": bool(record_level),
        "guarantee": GUARANTEE if record_level else None,
        "delta": delta,
        "accountant": accountant,
        "max_grad_norm": max_grad_norm,
        "summary": _summary(clients, target),
        "clients": clients,
        "client_level": _client_level_section(client_level) if client_level else None,
        "declined": _rounds_by_client(declined),
        "quarantined": _rounds_by_client(quarantined),
        "timed_out": _rounds_by_client(timed_out),
        "server_sees": list(server_sees or []),
        "secure_aggregation": bool(secure_aggregation),
        "stopped": stopped,
        "extra": extra,
    }


def _rounds_by_client(rounds_of: Mapping[str, Sequence[int]] | None) -> dict[str, list[int]]:
    """Each round once: a round run again after a resume is logged twice in metrics.jsonl."""
    return {cid: sorted({int(r) for r in rounds}) for cid, rounds in sorted(
        (rounds_of or {}).items(), key=lambda item: client_sort_key(item[0])) if rounds}


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


def _client_level_section(settings: ClientLevelSettings) -> dict[str, Any]:
    ledger = settings.ledger
    by_round = ledger.epsilon_by_round()
    entries = ledger.entries
    return {
        "guarantee": DISTRIBUTED_GUARANTEE if settings.distributed else CLIENT_LEVEL_GUARANTEE,
        "distributed": settings.distributed,
        "delta": ledger.delta,
        "accountant": ledger.accountant,
        "clipping_norm": settings.clipping_norm,
        "noise_multiplier": entries[-1].noise_multiplier if entries else None,
        "sample_rate": entries[-1].sample_rate if entries else None,
        # Under distributed noise the server divides by the clients it summed, not by a fixed q·N
        "expected_clients": None if settings.distributed else settings.expected_clients,
        "target_epsilon": settings.target_epsilon,
        "rounds_released": len(entries),
        "final_epsilon": by_round[-1][1] if by_round else 0.0,
        "rounds": [{"round": r, "epsilon": eps} for r, eps in by_round],
    }


def _summary(clients: dict[str, dict[str, Any]], target: float | None) -> dict[str, Any]:
    finals = {client_id: section["final_epsilon"] for client_id, section in clients.items()}
    summary: dict[str, Any] = {
        "num_clients": len(finals),
        "clients_trained": sum(1 for section in clients.values() if section["rounds_taken_part"]),
        "max_epsilon": None,
        "max_epsilon_client": None,
        "median_epsilon": None,
        "target_epsilon": target,
    }
    if finals:
        worst = max(finals, key=finals.__getitem__)
        summary.update(max_epsilon=finals[worst], max_epsilon_client=worst,
                       median_epsilon=statistics.median(finals.values()))
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
    """report.md: what is protected and what is not in plain words, the numbers, then the tables."""
    parts = [_header(report), *_init_statistics(report), _not_protected(report), _numbers(report)]
    if report["record_level"]:
        parts += [_clients_table(report)]
    if report["client_level"]:
        parts += [_client_level_table(report)]
    if report["declined"]:
        parts += [_declined_table(report)]
    if report["record_level"]:
        parts += [_rounds_table(report)]
    return "\n\n".join("\n".join(part) for part in parts) + "\n"


def _init_statistics(report: Mapping[str, Any]) -> list[list[str]]:
    """The round-0 statistic of a data-driven initialization (CorDA, EVA, LoRA-GA, FWSVD), when there is one."""
    section = (report.get("extra") or {}).get("init_statistics")
    if not section:
        return []  # a list of parts: none
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
    return [[text]]


def _header(report: Mapping[str, Any]) -> list[str]:
    lines = ["# Privacy report", "", "## What is protected", ""]
    if report["record_level"]:
        norm = report["max_grad_norm"]
        clipping = "clipped" if norm is None else f"clipped to norm C = {norm:g}"
        lines += [
            "- **Each client's individual training records (record-level DP).** Every client trains with "
            f"record-level DP-SGD (Opacus: each record's gradient {clipping}, Gaussian noise added to the sum, "
            "Poisson-sampled batches), so the updates it sends reveal little about any one of its records. "
            f"Each client has one (ε, δ) guarantee, at δ = {report['delta']:g}, for the WHOLE run: composed over "
            "every local step of every round the client took part in, not per round. A round a client sat "
            "out costs it nothing. Smaller ε is stronger privacy.",
        ]
    else:
        lines += ["- **Training records: not protected.** Record-level DP is off (privacy.enabled=false): clients "
                  "train without DP-SGD, and their updates can reveal individual records."]
    level = report["client_level"]
    if level and level.get("distributed"):
        lines += [
            "- **One client's data as a whole (client-level DP, noise added by the clients).** Each client clips "
            f"its whole update to L2 norm {level['clipping_norm']:g}, rounds it to integers and adds its share of "
            "Skellam noise before masking; secure aggregation lets the server unmask only the sum, and only when "
            "enough clients survived for the shares to make the whole noise: each client checks the number of "
            "shares the server asks for against the run's plan, and refuses to unmask when the server names fewer "
            "survivors than that. The global models carry one (ε, δ) "
            f"guarantee for every client at δ = {level['delta']:g}, against anyone, the server included: as if "
            "one client's update had been replaced by zero (zero-out adjacency; the server knows who took part). "
            "Every summed round is charged in full. Against the server this assumes that the clients follow the "
            "protocol (honest clients): a client that adds no noise share, or a smaller one, lowers the noise in "
            "the sum for everyone, and no other client can tell. It also assumes that the server relays the "
            "secure-aggregation protocol as written (honest-but-curious): the clients' keys are not signed, so a "
            "server that forged clients' keys or survivor lists could unmask a sum with less than the whole noise, "
            "or a single client's update.",
        ]
    elif level:
        lines += [
            "- **Whether a client took part at all (client-level DP).** The server clips each sampled client's "
            f"whole update to L2 norm {level['clipping_norm']:g}, adds Gaussian noise to the sum and divides by "
            f"the expected number of clients ({level['expected_clients']:g}); clients are Poisson-sampled with "
            f"rate {_fmt(level['sample_rate'])} and weighted uniformly. The global models it releases carry one "
            f"(ε, δ) guarantee for all clients, at δ = {level['delta']:g}, over every round released. It "
            "protects against anyone who sees the global models (other clients, users of the final adapter), "
            "not against the server itself, which sees each update before the noise. Its ε is amplified by the "
            "sampling, which holds only while who took part in which round stays secret: this report's round "
            "tables and the run's metrics.jsonl name them, so release the adapter without them.",
        ]
    else:
        lines += ["- **Whether a client took part: not protected.** Client-level DP is off "
                  "(privacy.client_level.enabled=false): one client's data as a whole, or its presence, can "
                  "show in the global model."]
    return lines


def _not_protected(report: Mapping[str, Any]) -> list[str]:
    lines = ["## What is not protected: what the server still sees", ""]
    seen = report["server_sees"] or ["(not stated: this report was written without the run's settings)"]
    return lines + [f"- {item}" for item in seen]


def _numbers(report: Mapping[str, Any]) -> list[str]:
    summary = report["summary"]
    lines = ["## Summary", ""]
    if report["record_level"]:
        if summary["clients_trained"]:
            line = (f"Record-level: accountant {_ACCOUNTANT_NAMES[report['accountant']]}. "
                    f"Clients: {summary['num_clients']}, of which {summary['clients_trained']} trained. "
                    f"Max ε: {epsilon_text(summary['max_epsilon'])} (client {summary['max_epsilon_client']}). "
                    f"Median ε over all clients: {epsilon_text(summary['median_epsilon'])}.")
        else:
            line = "Record-level: no client trained, so no client spent any privacy."
        if summary["target_epsilon"] is not None:
            above = summary["clients_above_target"]
            line += (f" Target ε: {_fmt(summary['target_epsilon'])}; "
                     + (f"above target: {', '.join(above)}." if above else "no client above it."))
        budget = report["extra"].get("budget_epsilon")
        if budget is not None:
            line += f" Budget each client enforces before every round: ε ≤ {_fmt(budget)}."
        lines.append(line)
    level = report["client_level"]
    if level:
        target = level["target_epsilon"]
        lines += ["", (f"Client-level: ε = {epsilon_text(level['final_epsilon'])} at δ = {level['delta']:g} after "
                       f"{level['rounds_released']} released rounds (σ = {_fmt(level['noise_multiplier'])}, "
                       f"q = {_fmt(level['sample_rate'])}, {_ACCOUNTANT_NAMES[level['accountant']]}"
                       + (": σ bounds the clients' summed Skellam noise" if level.get("distributed") else "") + ")"
                       + (f"; target ε: {_fmt(target)}." if target is not None else "."))]
    if report["declined"]:
        lines += ["", f"Clients that declined a round because it would have exceeded their budget: "
                      f"{', '.join(report['declined'])}."]
    budget = report["extra"].get("budget_epsilon")
    # Clients check their own ledgers, which hold the rounds the server's copy lacks, before every round.
    capped = f" (never past the budget ε ≤ {_fmt(budget)} each client enforces)" if budget is not None else ""
    if report.get("quarantined"):
        rejected = ", ".join(f"{cid} (round {', '.join(map(str, rounds))})" for cid, rounds in report["quarantined"].items())
        lines += ["", f"Replies the server rejected (their updates were not used; `client-quarantined` lines in "
                      f"metrics.jsonl say why): {rejected}. What a client spent in a rejected round is in its own "
                      f"ledger on its node, which can exceed the server's copy shown here{capped}."]
    if report.get("timed_out"):
        late = ", ".join(f"{cid} (round {', '.join(map(str, rounds))})" for cid, rounds in report["timed_out"].items())
        lines += ["", f"Clients that did not answer a round in time: {late}. If they trained it, the server's copy of "
                      f"their history lacks that round; their own ledgers hold it{capped}."]
    stated = [cid for cid, section in report["clients"].items() if section.get("final_from_client")]
    if stated:
        lines += ["", f"Final ε of client {', '.join(stated)} as the client stated it in a later reply: larger than "
                      "the server's copy of its history, which lacks a round whose reply was rejected or late."]
    if report["stopped"]:
        lines += ["", f"**The run stopped early:** {report['stopped']}"]
    return lines


def _clients_table(report: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Record-level ε per client",
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
            f"| {epsilon_text(section['final_epsilon'])} |"
        )
    if not report["clients"]:
        lines.append("| – | 0 | 0 | – | – | 0 |")
    return lines


def _client_level_table(report: Mapping[str, Any]) -> list[str]:
    level = report["client_level"]
    lines = ["## Client-level ε over rounds", "", "| round | ε after round |", "|---:|---:|"]
    lines += [f"| {r['round']} | {epsilon_text(r['epsilon'])} |" for r in level["rounds"]]
    return lines


def _declined_table(report: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Budget enforcement",
        "",
        "Before training a round, each client checks whether that round would push its ε past its budget; if "
        "so it declines (sends no update) and the server goes on without it.",
        "",
        "| client | rounds declined | ε when declining |",
        "|---|---|---:|",
    ]
    for client_id, rounds in report["declined"].items():
        section = report["clients"].get(client_id)
        eps = section["final_epsilon"] if section else 0.0
        lines.append(f"| {client_id} | {', '.join(map(str, rounds))} | {epsilon_text(eps)} |")
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
                f"| {r['steps']} | {epsilon_text(r['epsilon'])} |"
            )
    return lines


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return "∞" if math.isinf(value) else f"{value:.4g}"


def _span(values: Sequence[float]) -> str:
    """One value if all rounds agree, else "min–max"; "–" for a client with no rounds."""
    if not values:
        return "–"
    low, high = min(values), max(values)
    return _fmt(low) if low == high else f"{_fmt(low)}–{_fmt(high)}"

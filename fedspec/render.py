"""Rich tables for the terminal: what the CLI and the simulation driver print. Rendering lives here, apart
from the computations it shows (privacy planning, training), which return plain data."""

from __future__ import annotations

import statistics

from omegaconf import DictConfig
from rich.table import Table

from .privacy.accounting import epsilon_text
from .privacy.planning import ClientPlan, PlanSettings


def number(value: float | None, spec: str) -> str:
    """A table cell: the value formatted, or a dash for a missing one."""
    return "—" if value is None else format(value, spec)


def results_table(title: str, headers: list[str], rows: list[list[str]]) -> Table:
    """A table of per-round (or per-epoch) results for the terminal, numbers right-aligned."""
    table = Table(title=title)
    for header in headers:
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(*row)
    return table


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """The same table as Markdown, for summary.md."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---:|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _rounds_cell(plan: ClientPlan, rounds: int) -> str:
    if plan.rounds_within_budget is None:
        return "no cap"
    if plan.rounds_within_budget >= plan.rounds_limit:
        return f"≥ {plan.rounds_limit}"
    warn = " (runs out)" if plan.rounds_within_budget < rounds else ""
    return f"{plan.rounds_within_budget}{warn}"


def plan_table(cfg: DictConfig, plans: list[ClientPlan], *, per_client: bool = True) -> Table:
    """One row per client (or min / median / max over clients): σ, expected and worst-case ε, rounds in budget."""
    settings = PlanSettings.of(cfg)
    rounds, p, budget = settings.rounds, settings.participation_probability, settings.budget_epsilon
    sigma = ("given" if cfg.privacy.noise_multiplier is not None
             else f"planned for ε ≤ {cfg.privacy.target_epsilon:g} in the worst case")
    limit = plans[0].rounds_limit if plans else rounds
    fixed_rate = cfg.privacy.get("sample_rate")
    batch = (f"q = {fixed_rate:g} for every client (privacy.sample_rate)" if fixed_rate is not None else
             f"expected batch {cfg.train.batch_size}, q = 1/⌈records/batch⌉")
    table = Table(
        title=f"record-level DP-SGD plan (δ = {cfg.privacy.delta:g}, {cfg.privacy.accountant.upper()} accountant)",
        caption=(
            f"σ {sigma}; {rounds} rounds × {cfg.train.local_steps} local steps, {batch}. ε expected: averaged over how often the client is "
            f"sampled (probability {p:.3g} per round, {p * rounds:.3g} rounds on average). ε worst case: sampled in "
            f"all {rounds} rounds. Both stop growing where a client's budget runs out (it declines from then on). "
            f"Rounds in budget: rounds of taking part that keep ε ≤ "
            + ("the budget (no budget set)." if budget is None else f"{budget:g} (searched up to {limit}).")
        ),
        caption_justify="left",
        title_justify="left",
    )
    for column in ("client", "records", "q", "σ", "ε expected", "ε worst case", "rounds in budget"):
        table.add_column(column, justify="right")
    if per_client:
        for plan in plans:
            table.add_row(str(plan.client), str(plan.num_examples), f"{plan.sample_rate:.4f}",
                          f"{plan.noise_multiplier:.4f}", epsilon_text(plan.expected_epsilon),
                          epsilon_text(plan.epsilon), _rounds_cell(plan, rounds))
        return table
    for name, pick in (("min", min), ("median", statistics.median), ("max", max)):
        within = [p.rounds_within_budget for p in plans if p.rounds_within_budget is not None]
        table.add_row(
            name,
            f"{pick(p.num_examples for p in plans):g}",
            f"{pick(p.sample_rate for p in plans):.4f}",
            f"{pick(p.noise_multiplier for p in plans):.4f}",
            epsilon_text(pick(p.expected_epsilon for p in plans)),  # rounded up, as every ε shown
            epsilon_text(pick(p.epsilon for p in plans)),
            f"{pick(within):g}" if within else "no cap",
        )
    return table

"""Noise planning for a federated schedule, and the checks that run before any training.

A client's noise multiplier is planned for its *whole* schedule: every round it could take part in
(``federation.rounds``, not the expected ``fraction × rounds``: a client sampled more often than average
must not exceed its target) times ``train.local_steps``, at its own sample rate ``batch_size / n_k``, after
a privatized round-0 statistic when the run releases one (``init_statistics_entries``).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from functools import lru_cache

from omegaconf import DictConfig
from rich.table import Table

from ..errors import ConfigError
from ..training import sample_rate
from .accounting import epsilon, plan_noise


@dataclass(frozen=True)
class ClientPlan:
    client: int
    num_examples: int
    sample_rate: float
    steps: int
    noise_multiplier: float
    epsilon: float


def schedule_steps(cfg: DictConfig) -> int:
    """The most DP-SGD steps one client can take in the run: it may be sampled in every round."""
    return int(cfg.federation.rounds) * int(cfg.train.local_steps)


def check_delta(delta: float, sizes: list[int]) -> None:
    """δ must be well below 1/n for every client's dataset: δ ≥ 1/n allows leaking one whole record."""
    for client, n in enumerate(sizes):
        if delta >= 1.0 / n:
            raise ConfigError(
                f"privacy.delta={delta:g} is not below 1/n for client {client} (n={n} records, 1/n={1.0 / n:.3g}); "
                f"choose privacy.delta < {1.0 / max(sizes):.3g} (1e-5 is typical)"
            )


def init_statistics_entries(cfg: DictConfig) -> tuple[tuple[float, float, int], ...]:
    """The ledger entries of a privatized round-0 statistic (data-driven initializers with
    ``privacy.private_init_stats``): one Gaussian mechanism, (σ₀, q = 1, 1 step). Empty otherwise."""
    from ..adapters import get_method

    privacy = cfg.privacy
    if privacy.enabled and privacy.private_init_stats and get_method(cfg.adapter.method).calibration:
        return ((float(privacy.init_noise_multiplier), 1.0, 1),)
    return ()


@lru_cache(maxsize=1024)
def _planned_sigma(target: float, delta: float, q: float, steps: int, accountant: str,
                   prior: tuple[tuple[float, float, int], ...] = ()) -> float:
    return plan_noise(target, delta, q, steps, accountant=accountant, prior=prior)


def client_noise_multiplier(cfg: DictConfig, num_examples: int) -> float:
    """σ for a client with ``num_examples`` records: the configured one, or planned from the target ε."""
    if cfg.privacy.noise_multiplier is not None:
        return float(cfg.privacy.noise_multiplier)
    q = sample_rate(num_examples, cfg.train.batch_size)
    return _planned_sigma(
        float(cfg.privacy.target_epsilon), float(cfg.privacy.delta), q, schedule_steps(cfg), cfg.privacy.accountant,
        init_statistics_entries(cfg),
    )


def plan_clients(cfg: DictConfig, sizes: list[int]) -> list[ClientPlan]:
    """Every client's σ and ε after the whole schedule; raises on δ too large or an unreachable target."""
    if not cfg.privacy.enabled:
        return []
    check_delta(float(cfg.privacy.delta), sizes)
    steps = schedule_steps(cfg)
    plans = []
    for client, n in enumerate(sizes):
        q = sample_rate(n, cfg.train.batch_size)
        sigma = client_noise_multiplier(cfg, n)
        history = [*init_statistics_entries(cfg), (sigma, q, steps)]
        eps = epsilon(history, float(cfg.privacy.delta), accountant=cfg.privacy.accountant)
        plans.append(ClientPlan(client, n, q, steps, sigma, eps))
    return plans


def plan_table(cfg: DictConfig, plans: list[ClientPlan]) -> Table:
    """min / median / max over clients of what the plan gives each one."""
    table = Table(title=f"privacy plan: record-level DP, δ = {cfg.privacy.delta:g}, {cfg.privacy.accountant.upper()}, "
                        f"up to {schedule_steps(cfg)} steps per client")
    for column in ("", "records", "sample rate", "σ", "ε after the run"):
        table.add_column(column, justify="right")
    for name, pick in (("min", min), ("median", statistics.median), ("max", max)):
        table.add_row(
            name,
            f"{pick(p.num_examples for p in plans):g}",
            f"{pick(p.sample_rate for p in plans):.4f}",
            f"{pick(p.noise_multiplier for p in plans):.3f}",
            f"{pick(p.epsilon for p in plans):.3f}",
        )
    return table

"""Noise planning for a federated schedule, and the checks that run before any training.

A client's noise multiplier is planned for its *whole* schedule: every round it could take part in
(``federation.rounds``, not the expected ``fraction × rounds``: a client sampled more often than average
must not exceed its target) times ``train.local_steps``, at its own sample rate
``1 / ⌈n_k / batch_size⌉``, after a privatized round-0 statistic when the run releases one
(``init_statistics_entries``). The plan also says what a client can expect — its ε averaged over how often it
is sampled — and, for a given σ, how many rounds of taking part its budget allows: the budget each client
enforces before every round (``privacy.budget_epsilon``, by default ``privacy.target_epsilon``).

With client-level DP on, the server's guarantee is planned the same way over ``federation.rounds``
releases at client sampling rate ``federation.fraction`` (see ``client_level``); under secure aggregation the
clients add the noise and the plan is the distributed Skellam mechanism's, every round charged in full (see
``skellam``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from omegaconf import DictConfig

from ..errors import ConfigError
from .accounting import SKELLAM, PrivacyBudgetError, epsilon, epsilon_text, plan_noise, sample_rate
from .client_level import noise_std_of_mean
from .skellam import SkellamNoise, noise_multiplier_for

__all__ = [
    "ClientLevelPlan",
    "ClientLevelTarget",
    "ClientPlan",
    "PlanSettings",
    "PrivacyPlan",
    "check_delta",
    "client_noise_multiplier",
    "client_sample_rate",
    "init_statistics_entries",
    "plan_client_level",
    "plan_clients",
    "plan_run",
    "rounds_within_budget",
]


@dataclass(frozen=True)
class ClientPlan:
    client: int
    num_examples: int
    sample_rate: float
    steps: int  # the worst case: local steps of every round
    noise_multiplier: float
    epsilon: float  # after the worst case (sampled in every round; capped by the budget, as it declines beyond)
    expected_rounds: float  # rounds it is sampled in on average (participation probability × rounds)
    expected_epsilon: float  # ε after the run, averaged over how often it is sampled (capped likewise)
    budget: float | None  # the ε it refuses to exceed (None: no cap)
    rounds_within_budget: int | None  # rounds of taking part its budget allows, up to rounds_limit
    rounds_limit: int  # the search for rounds_within_budget stopped here


@dataclass(frozen=True)
class ClientLevelPlan:
    noise_multiplier: float  # σ of the server's Gaussian noise; distributed: z of the clients' summed Skellam noise
    clipping_norm: float
    sample_rate: float  # Poisson client sampling rate = federation.fraction
    rounds: int
    delta: float
    epsilon: float
    expected_clients: float  # q·N, the fixed denominator of the mean (distributed: the number of clients summed)
    noise_std: float  # per coordinate of the aggregated (mean) update: σ·C/(q·N)
    accountant: str  # of the client-level ledger: the run's accountant, or SKELLAM
    charged: tuple[float, float]  # the (σ, q) the ledger records for every released round
    distributed: SkellamNoise | None = None  # the clients' noise under secure aggregation; None: the server's


@dataclass(frozen=True)
class PrivacyPlan:
    clients: list[ClientPlan]
    client_level: ClientLevelPlan | None


Prior = tuple[tuple[float, float, int], ...]  # ledger entries a client pays for before DP-SGD


@dataclass(frozen=True)
class ClientLevelTarget:
    """The server's client-level DP settings (``privacy.client_level``)."""

    enabled: bool
    target_epsilon: float | None
    noise_multiplier: float | None
    clipping_norm: float
    delta: float
    distributed: bool  # under secure aggregation the clients add the noise (fedspec.privacy.skellam)
    min_survivors: int | None = None  # distributed: m, the clients whose noise shares make the whole noise


@dataclass(frozen=True)
class PlanSettings:
    """What planning reads from a run's config, and all it reads: build it with :meth:`of`."""

    enabled: bool  # record-level DP on every client
    target_epsilon: float | None
    noise_multiplier: float | None  # given: no planning
    budget_epsilon: float | None  # the ε each client refuses to exceed (None: no cap)
    budget_key: str  # the config key that sets it, for messages
    delta: float
    accountant: str
    fixed_sample_rate: float | None  # privacy.sample_rate: the server's one rate for every client
    batch_size: int
    local_steps: int
    rounds: int
    clients: int
    fraction: float
    min_clients: int
    init_statistics: Prior  # a privatized round-0 statistic, paid for before DP-SGD
    client_level: ClientLevelTarget

    @classmethod
    def of(cls, cfg: DictConfig) -> PlanSettings:
        privacy, federation, level = cfg.privacy, cfg.federation, cfg.privacy.client_level
        budget_key = "privacy.budget_epsilon" if privacy.budget_epsilon is not None else "privacy.target_epsilon"
        budget = privacy.budget_epsilon if privacy.budget_epsilon is not None else privacy.target_epsilon
        return cls(
            enabled=bool(privacy.enabled), target_epsilon=_optional_float(privacy.target_epsilon),
            noise_multiplier=_optional_float(privacy.noise_multiplier), budget_epsilon=_optional_float(budget),
            budget_key=budget_key, delta=float(privacy.delta), accountant=str(privacy.accountant),
            fixed_sample_rate=_optional_float(privacy.get("sample_rate")), batch_size=int(cfg.train.batch_size),
            local_steps=int(cfg.train.local_steps), rounds=int(federation.rounds), clients=int(federation.clients),
            fraction=float(federation.fraction), min_clients=int(federation.min_clients),
            init_statistics=init_statistics_entries(privacy, cfg.adapter.method),
            client_level=ClientLevelTarget(
                enabled=bool(level.enabled), target_epsilon=_optional_float(level.target_epsilon),
                noise_multiplier=_optional_float(level.noise_multiplier), clipping_norm=float(level.clipping_norm),
                delta=float(level.delta), distributed=bool(federation.secure_aggregation.enabled),
                min_survivors=_optional_int(level.min_survivors)),
        )

    @property
    def schedule_steps(self) -> int:
        """The most DP-SGD steps one client can take in the run: it may be sampled in every round."""
        return self.rounds * self.local_steps

    @property
    def participation_probability(self) -> float:
        """Probability that a given client is sampled in a round.

        Under client-level DP with the server's noise clients are Poisson-sampled with rate ``fraction``;
        otherwise the server samples ⌈fraction·N⌉ clients (at least ``min_clients``) uniformly without replacement.
        """
        if self.client_level.enabled and not self.client_level.distributed:
            return self.fraction
        return self.cohort / self.clients

    @property
    def cohort(self) -> int:
        """The clients the server samples in a round when it does not Poisson-sample: ⌈fraction·N⌉, at least
        ``min_clients``, at most N (strategies.flower.AdapterStrategy.sample)."""
        return min(self.clients, max(math.ceil(self.fraction * self.clients), self.min_clients))

    @property
    def noise_shares(self) -> int:
        """Distributed client-level noise: m, the number of clients whose noise shares make the whole noise
        (each adds 1/m of it) — ``privacy.client_level.min_survivors``, else the whole cohort: the largest m a
        client accepts from the server (client/secure_aggregation.py)."""
        fixed = self.client_level.min_survivors
        return fixed if fixed is not None else self.cohort


def _optional_float(value: object) -> float | None:
    return None if value is None else float(value)


def _optional_int(value: object) -> int | None:
    return None if value is None else int(value)


def check_delta(delta: float, sizes: list[int], clients: list[int] | None = None) -> None:
    """δ must be well below 1/n for every client's dataset: δ ≥ 1/n allows leaking one whole record. ``clients``: the
    ids of the datasets (default 0, 1, …)."""
    for client, n in zip(clients if clients is not None else range(len(sizes)), sizes):
        if delta >= 1.0 / n:
            raise ConfigError(
                f"privacy.delta={delta:g} is not below 1/n for client {client} (n={n} records, 1/n={1.0 / n:.3g}); "
                f"choose privacy.delta < {1.0 / max(sizes):.3g} (1e-5 is typical)"
            )


def init_statistics_entries(privacy: DictConfig, method: str) -> Prior:
    """The ledger entries of a privatized round-0 statistic (data-driven initializers with
    ``privacy.private_init_stats``; ``privacy`` is the config's privacy section): one Gaussian mechanism,
    (σ₀, q = 1, 1 step). Empty otherwise."""
    from ..adapters import get_method

    if privacy.enabled and privacy.private_init_stats and get_method(method).calibration:
        return ((float(privacy.init_noise_multiplier), 1.0, 1),)
    return ()


@lru_cache(maxsize=1024)
def _planned_sigma(target: float, delta: float, q: float, steps: int, accountant: str,
                   prior: tuple[tuple[float, float, int], ...] = ()) -> float:
    return plan_noise(target, delta, q, steps, accountant=accountant, prior=prior)


def client_sample_rate(settings: PlanSettings, num_examples: int) -> float:
    """The Poisson rate a client with ``num_examples`` records trains and is accounted at: the server's fixed
    ``privacy.sample_rate`` (1/k, the same for every client), or 1/⌈n/B⌉ as Opacus derives it from a loader of
    batch B. A fixed rate needs at least k records: fewer would make the expected batch less than one record."""
    fixed = settings.fixed_sample_rate
    if fixed is None:
        return sample_rate(num_examples, settings.batch_size)
    batches = round(1 / fixed)
    if num_examples < batches:
        raise ConfigError(f"privacy.sample_rate={fixed:g} samples {batches} batches per epoch, but a client has only "
                          f"{num_examples} records (the expected batch would be under one record); raise "
                          "privacy.sample_rate, or give every client at least that many records")
    return 1.0 / batches


def client_noise_multiplier(settings: PlanSettings, num_examples: int) -> float:
    """σ for a client with ``num_examples`` records: the configured one, or planned from the target ε."""
    if settings.noise_multiplier is not None:
        return settings.noise_multiplier
    q = client_sample_rate(settings, num_examples)
    try:
        return _planned_sigma(settings.target_epsilon, settings.delta, q, settings.schedule_steps,
                              settings.accountant, settings.init_statistics)
    except PrivacyBudgetError as error:
        raise PrivacyBudgetError(f"privacy.{error} (a client with {num_examples} records)") from None


@lru_cache(maxsize=4096)
def _epsilon_after(sigma: float, q: float, steps: int, delta: float, accountant: str, prior: Prior = ()) -> float:
    """ε after `steps` steps at (σ, q), following the ``prior`` entries (a privatized round-0 statistic):
    exactly what a client's ledger computes for its history."""
    history = [*prior, (sigma, q, steps)] if steps else list(prior)
    return epsilon(history, delta, accountant)


def _epsilons_by_round(sigma: float, q: float, steps_per_round: int, rounds: int, delta: float,
                       accountant: str, prior: Prior = ()) -> tuple[float, ...]:
    """ε after taking part in 1, 2, ..., `rounds` rounds."""
    return tuple(_epsilon_after(sigma, q, k * steps_per_round, delta, accountant, prior) for k in range(1, rounds + 1))


def rounds_within_budget(
    sigma: float, q: float, steps_per_round: int, budget: float, delta: float, accountant: str, limit: int,
    prior: Prior = (),
) -> int:
    """How many rounds of taking part (``steps_per_round`` steps at (σ, q) each) keep ε ≤ ``budget``, at most
    ``limit``. ε grows with every round, so this is a search: doubling, then bisection."""
    def fits(k: int) -> bool:
        return k == 0 or _epsilon_after(sigma, q, k * steps_per_round, delta, accountant, prior) <= budget

    if fits(limit):
        return limit
    low, high = 0, 1  # fits(low), not fits(high)
    while fits(high):
        low, high = high, min(2 * high, limit)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _expected_epsilon(by_round: tuple[float, ...], p: float, before: float = 0.0) -> float:
    """E[ε after the run] when the number of rounds a client takes part in is Binomial(R, p); ``before`` is its
    ε without taking part (a privatized round-0 statistic, else 0)."""
    rounds = len(by_round)
    return (1 - p) ** rounds * before + sum(
        math.comb(rounds, k) * p**k * (1 - p) ** (rounds - k) * by_round[k - 1] for k in range(1, rounds + 1))


def plan_clients(settings: PlanSettings, sizes: list[int], *, rounds_limit: int | None = None) -> list[ClientPlan]:
    """Every client's σ, its expected and worst-case ε, and the rounds its budget allows; raises on δ too large
    or an unreachable target. ``rounds_limit`` caps the search for rounds within budget (default: the
    configured rounds, enough to tell whether a client runs out during the run)."""
    if not settings.enabled:
        return []
    delta, accountant, prior = settings.delta, settings.accountant, settings.init_statistics
    check_delta(delta, sizes)
    rounds, local_steps = settings.rounds, settings.local_steps
    p = settings.participation_probability
    budget = settings.budget_epsilon
    limit = rounds if rounds_limit is None else max(int(rounds_limit), rounds)
    plans = []
    for client, n in enumerate(sizes):
        q = client_sample_rate(settings, n)
        sigma = client_noise_multiplier(settings, n)
        before = _epsilon_after(sigma, q, 0, delta, accountant, prior)
        by_round = _epsilons_by_round(sigma, q, local_steps, rounds, delta, accountant, prior)
        within = (None if budget is None
                  else rounds_within_budget(sigma, q, local_steps, budget, delta, accountant, limit, prior))
        if within is not None and within < rounds:  # it declines every round beyond its budget: ε stops there
            by_round = tuple(by_round[min(k, within) - 1] if min(k, within) else before for k in range(1, rounds + 1))
        plans.append(ClientPlan(
            client=client, num_examples=n, sample_rate=q, steps=rounds * local_steps, noise_multiplier=sigma,
            epsilon=by_round[-1], expected_rounds=p * rounds, expected_epsilon=_expected_epsilon(by_round, p, before),
            budget=budget, rounds_within_budget=within, rounds_limit=limit,
        ))
    return plans


def plan_client_level(settings: PlanSettings) -> ClientLevelPlan | None:
    """The server's client-level σ (given, or planned for the whole run) and its ε; None when it is off."""
    level = settings.client_level
    if not level.enabled:
        return None
    n, q, rounds = settings.clients, settings.fraction, settings.rounds
    delta, accountant = level.delta, settings.accountant
    if delta >= 1.0 / n:
        raise ConfigError(
            f"privacy.client_level.delta={delta:g} is not below 1/federation.clients = {1.0 / n:.3g}; "
            f"choose privacy.client_level.delta < {1.0 / n:.3g} (well below: it is the chance of exposing a whole client)"
        )
    if level.distributed:  # the cohort is ⌈fraction·N⌉ clients (at least min_clients), not Poisson-sampled
        return _plan_distributed(level, float(settings.cohort), q, rounds)
    if level.noise_multiplier is not None:
        sigma = level.noise_multiplier
    else:
        sigma = _planned_client_level_sigma(level, q, rounds, accountant)
    eps = epsilon([(sigma, q, rounds)], delta, accountant)
    expected = q * n
    return ClientLevelPlan(sigma, level.clipping_norm, q, rounds, delta, eps, expected,
                           noise_std_of_mean(sigma, level.clipping_norm, expected), accountant, (sigma, q))


def _planned_client_level_sigma(level: ClientLevelTarget, q: float, rounds: int, accountant: str) -> float:
    try:
        return _planned_sigma(level.target_epsilon, level.delta, q, rounds, accountant)
    except PrivacyBudgetError as error:
        raise PrivacyBudgetError(f"privacy.client_level.{error}") from None


def _plan_distributed(level: ClientLevelTarget, expected: float, q: float, rounds: int) -> ClientLevelPlan:
    """The clients' Skellam noise: z given, or planned so that every round charged in full (no amplification
    by sampling: the server knows the cohort) stays within the target."""
    if level.noise_multiplier is not None:
        z = level.noise_multiplier
    else:
        # A hair above the planned σ, so that the round trip z → σ cannot land a rounding error over the target
        z = noise_multiplier_for(_planned_client_level_sigma(level, 1.0, rounds, SKELLAM) * (1 + 1e-12))
    noise = SkellamNoise(z, level.clipping_norm)
    charged = (noise.accounted_multiplier, 1.0)
    eps = epsilon([(*charged, rounds)], level.delta, SKELLAM)
    return ClientLevelPlan(z, level.clipping_norm, q, rounds, level.delta, eps, expected,
                           noise.std_of_mean(expected), SKELLAM, charged, noise)


def plan_run(settings: PlanSettings, sizes: list[int], *, rounds_limit: int | None = None) -> PrivacyPlan:
    """The whole privacy plan of a run, and the checks every run makes before it starts: δ against every
    client's size, reachable targets, and enough clients with budget for at least one round."""
    plans = plan_clients(settings, sizes, rounds_limit=rounds_limit)
    can_train = [p for p in plans if p.rounds_within_budget is None or p.rounds_within_budget >= 1]
    needed = min(settings.min_clients, len(sizes))
    if plans and len(can_train) < needed:
        low, high = (f"{f(p.noise_multiplier for p in plans):.3g}" for f in (min, max))
        sigmas = [low] if low == high else [low, high]
        raise ConfigError(
            f"{settings.budget_key}={settings.budget_epsilon:g} allows not even one round of {settings.local_steps} "
            f"local steps for {len(plans) - len(can_train)} of {len(plans)} clients at noise_multiplier "
            f"{'–'.join(sigmas)}, "
            f"so fewer than federation.min_clients={needed} could train; raise the budget or privacy.noise_multiplier"
        )
    return PrivacyPlan(plans, plan_client_level(settings))


def client_level_lines(plan: ClientLevelPlan) -> list[str]:
    """Plain-words summary of the client-level plan."""
    if plan.distributed is not None:
        return [
            f"client-level DP, noise added by the clients under secure aggregation: each client's whole update "
            f"clipped to C = {plan.clipping_norm:g} and rounded to integers; the clients' Skellam noise shares add up "
            f"to z = {plan.noise_multiplier:.4f} times the sensitivity in the masked sum, which nobody sees un-noised "
            f"(noise std ≈ {plan.noise_std:.3g} per coordinate of the mean of {plan.expected_clients:g} clients); "
            f"ε = {epsilon_text(plan.epsilon)} at δ = {plan.delta:g} after {plan.rounds} rounds, each charged in full "
            f"(zero-out adjacency, no amplification by sampling: the server knows the cohort)",
        ]
    return [
        f"client-level DP: each sampled client's whole update clipped to C = {plan.clipping_norm:g}, "
        f"Gaussian noise σ·C on the sum with σ = {plan.noise_multiplier:.4f}, divided by q·N = "
        f"{plan.expected_clients:g} expected clients (noise std {plan.noise_std:.3g} per coordinate of the mean update); "
        f"clients Poisson-sampled with q = {plan.sample_rate:g}; ε = {epsilon_text(plan.epsilon)} at δ = {plan.delta:g} "
        f"after {plan.rounds} rounds",
    ]

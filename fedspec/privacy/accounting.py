"""(ε, δ) of DP-SGD histories, computed by Opacus' own accountants, and noise planning.

A history is a list of `(noise_multiplier, sample_rate, steps)` entries, the same triple Opacus'
accountants keep. Every entry is one run of Poisson-subsampled Gaussian steps; composing the
entries gives the guarantee for everything a client ever did, which is what fedspec reports
(never a per-round ε).

Rules that keep the numbers honest:
- ε is only ever rounded *up*. Opacus 1.6.0 can return a negative ε at large δ (opacus#585). Both
  conversions bound a hockey-stick divergence that is non-increasing in ε, so a bound ε' < 0 also
  proves (0, δ)-DP: we clamp to 0, which is larger than what Opacus said and still true. A NaN
  proves nothing and raises. An infinite ε (no guarantee) is returned as is.
- The PRV accountant is numerical. We call it with Opacus' own error budget, stated here:
  `eps_error = 0.01` and `delta_error = δ / 1000`, and Opacus returns the *upper* end of its error
  interval (ε at δ − delta_error, plus eps_error). The reported number is therefore a bound that
  already pays for the discretization, at the cost of at most ~0.02 of slack; these are also the
  settings behind Opacus' published reference values, so they can be checked.
- Entries with the same (σ, q) are merged before accounting (their steps add up). Composition is
  commutative, so this is exact; it makes PRV far cheaper and avoids stacking one discretization
  error per round.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

from ..errors import FedspecError


def sample_rate(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate as Opacus derives it from a DataLoader: 1 / number of batches per epoch."""
    return 1.0 / math.ceil(num_examples / batch_size)

__all__ = [
    "epsilon_text",
    "ACCOUNTANTS",
    "MAX_NOISE_MULTIPLIER",
    "PRV_DELTA_ERROR_FRACTION",
    "PRV_EPS_ERROR",
    "PRV_MAX_GRID_POINTS",
    "HistoryEntry",
    "PrivacyBudgetError",
    "cumulative_epsilons",
    "epsilon",
    "plan_noise",
    "validate_accountant",
    "validate_delta",
    "validate_entry",
]

HistoryEntry = tuple[float, float, int]

ACCOUNTANTS = ("rdp", "prv")  # a user's choice (privacy.accountant)
# Client-level DP with distributed Skellam noise under secure aggregation (fedspec.privacy.skellam): its ledger's
# accountant, never a user's choice. Each entry's σ is the Gaussian multiplier whose RDP bounds the Skellam
# mechanism's at every *integer* order; q must be 1 (no amplification by sampling is claimed).
SKELLAM = "skellam"
SKELLAM_ORDERS = np.arange(2, 513, dtype=float)  # the Skellam RDP bound holds at integer orders > 1
PRV_EPS_ERROR = 0.01
PRV_DELTA_ERROR_FRACTION = 1e-3
# PRV discretizes the privacy loss on a grid whose size grows with ε and with sqrt(steps); at about
# 150 bytes per point, 10M points is ~1.5 GB and ~10 s. Beyond that we refuse instead of letting
# the process be killed for memory (σ = 0.1, q = 0.5, 1000 steps would need ~10^9 points).
PRV_MAX_GRID_POINTS = 10_000_000
# Same ceiling as opacus.accountants.utils.MAX_SIGMA: the σ at which we read off the smallest ε
# an accountant can certify for a setting (its limit as σ → ∞, to 4 significant digits).
MAX_NOISE_MULTIPLIER = 1e6
_EXTREME_ORDER_WARNING = "Optimal order is the"


class PrivacyBudgetError(FedspecError, ValueError):
    """A target ε that no noise level can reach; the message names the target, the floor and the fix."""


# ----------------------------------------------------------------------------------------- validation


def epsilon_text(value: float | None, decimals: int = 3) -> str:
    """ε for people to read, rounded *up* to ``decimals`` places: a shown ε is never below the bound computed (a
    value a float's last bits above a round number, 2.9999999999, still shows as 3.000)."""
    if value is None:
        return "—"
    if math.isinf(value):
        return "∞"
    scale = 10**decimals
    return f"{math.ceil(round(value * scale, 6)) / scale:.{decimals}f}"


def _real(name: str, value: object) -> float:
    """`value` as a float; bools and non-numbers are rejected (True is not a noise multiplier)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    return float(value)


def validate_accountant(accountant: str) -> str:
    """Return `accountant` if fedspec supports it, else raise naming the allowed values."""
    if accountant not in (*ACCOUNTANTS, SKELLAM):
        allowed = ", ".join(repr(a) for a in (*ACCOUNTANTS, SKELLAM))
        raise ValueError(f"accountant must be one of {allowed}, got {accountant!r}")
    return accountant


def validate_delta(delta: float) -> float:
    """δ must lie strictly between 0 and 1: δ = 0 has no finite ε, δ >= 1 promises nothing."""
    value = _real("delta", delta)
    if not 0.0 < value < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return value


def validate_entry(noise_multiplier: float, sample_rate: float, steps: int, where: str = "") -> HistoryEntry:
    """Check one `(σ, q, steps)` entry; `where` locates it in the message ("history[3]: ...")."""
    prefix = f"{where}: " if where else ""
    sigma = _real(f"{prefix}noise_multiplier", noise_multiplier)
    if not (math.isfinite(sigma) and sigma > 0.0):
        raise ValueError(f"{prefix}noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")
    q = _real(f"{prefix}sample_rate", sample_rate)
    if not 0.0 < q <= 1.0:
        raise ValueError(f"{prefix}sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"{prefix}steps must be an integer >= 0, got {steps!r}")
    return sigma, q, int(steps)


def _canonical(history: Iterable[Sequence[float]]) -> list[HistoryEntry]:
    """Validated history with zero-step entries dropped and equal (σ, q) merged, first-seen order."""
    merged: dict[tuple[float, float], int] = {}
    for i, entry in enumerate(history):
        if len(entry) != 3:
            raise ValueError(f"history[{i}] must be (noise_multiplier, sample_rate, steps), got {entry!r}")
        sigma, q, steps = validate_entry(*entry, where=f"history[{i}]")
        if steps:
            merged[(sigma, q)] = merged.get((sigma, q), 0) + steps
    return [(sigma, q, steps) for (sigma, q), steps in merged.items()]


# ----------------------------------------------------------------------------------------- accounting


def epsilon(history: Iterable[Sequence[float]], delta: float, accountant: str = "rdp") -> float:
    """ε at `delta` of all entries of `history` composed, by Opacus' RDP or PRV accountant.

    An empty history (or one with zero steps in total) has spent nothing: 0.0.
    """
    accountant = validate_accountant(accountant)
    delta = validate_delta(delta)
    canonical = _canonical(history)
    if not canonical:
        return 0.0
    if accountant == "rdp":
        raw = _rdp_epsilon(canonical, delta)
    elif accountant == SKELLAM:
        raw = _skellam_epsilon(canonical, delta)
    else:
        raw = _prv_epsilon(canonical, delta)
    return _upper_bound(raw, canonical, accountant)


def _rdp_epsilon(history: list[HistoryEntry], delta: float) -> float:
    """What RDPAccountant.get_epsilon computes, from cached one-step RDP curves.

    Opacus' compute_rdp is the one-step curve times the steps, and the accountant sums the entries' curves
    and converts with get_privacy_spent at its DEFAULT_ALPHAS; we do exactly that, but compute each
    (σ, q)'s one-step curve once per process: it is the expensive part (~0.4 s at fractional orders), and
    planning, enforcement and reports ask for many step counts at the same (σ, q).
    """
    rdp = sum([_rdp_unit_curve(sigma, q) * steps for sigma, q, steps in history])
    with warnings.catch_warnings():
        # "Optimal order is the largest/smallest alpha": the bound at Opacus' orders is still valid, only not
        # the tightest possible; it is what every fedspec report, plan and check uses, so they agree.
        warnings.filterwarnings("ignore", message=_EXTREME_ORDER_WARNING, category=UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=4096)
def _rdp_unit_curve(sigma: float, q: float) -> np.ndarray:
    curve = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    curve.setflags(write=False)  # shared by every caller through the cache
    return curve


def _skellam_epsilon(history: list[HistoryEntry], delta: float) -> float:
    """Composition of releases whose RDP at integer order α is at most α / (2σ²) (the distributed Skellam
    mechanism, see fedspec.privacy.skellam), converted to (ε, δ) by Opacus' RDP conversion at integer orders."""
    if any(q != 1.0 for _, q, _ in history):
        raise ValueError(f"the {SKELLAM!r} accountant claims no amplification by sampling: every entry's "
                         f"sample_rate must be 1, got {history}")
    rdp = sum(SKELLAM_ORDERS * steps / (2.0 * sigma**2) for sigma, _, steps in history)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_EXTREME_ORDER_WARNING, category=UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=SKELLAM_ORDERS, rdp=rdp, delta=delta)
    return float(eps)


def _prv_epsilon(history: list[HistoryEntry], delta: float) -> float:
    delta_error = delta * PRV_DELTA_ERROR_FRACTION
    _check_prv_grid(history, delta_error)
    acc = PRVAccountant()
    acc.history = list(history)
    try:
        return acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR, delta_error=delta_error)
    except RuntimeError as err:  # e.g. "Discrete mean differs significantly" (opacus#601)
        raise RuntimeError(
            f"Opacus' PRV accountant failed on history {history} at delta={delta:g}: {err}. "
            "Use accountant='rdp' for this setting."
        ) from err


def _check_prv_grid(history: list[HistoryEntry], delta_error: float) -> None:
    """Refuse PRV settings whose discretization grid would exhaust memory.

    Uses Opacus' own (private) domain rule so the estimate is exactly the grid it would build;
    opacus is pinned to one version in pyproject.toml.
    """
    domain = PRVAccountant()._get_domain(
        prvs=[PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history],
        num_self_compositions=[steps for _, _, steps in history],
        eps_error=PRV_EPS_ERROR,
        delta_error=delta_error,
    )
    if domain.size > PRV_MAX_GRID_POINTS:
        raise ValueError(
            f"the PRV accountant would need a grid of {domain.size:,} points (limit "
            f"{PRV_MAX_GRID_POINTS:,}) for history {history}; its privacy loss reaches ~{domain.t_max:.3g}, "
            "so ε is very large here. Use accountant='rdp' for this setting."
        )


def _upper_bound(raw: float, history: list[HistoryEntry], accountant: str) -> float:
    """Turn Opacus' answer into a value never below the truth (see the module docstring)."""
    value = float(raw)
    if math.isnan(value):
        raise RuntimeError(
            f"the {accountant!r} accountant returned NaN for history {history}; refusing to report it"
        )
    return max(value, 0.0)


def cumulative_epsilons(
    history: Sequence[Sequence[float]], delta: float, accountant: str = "rdp"
) -> list[float]:
    """ε after each prefix of `history`: element k is `epsilon(history[:k + 1])`, so a report's last value is
    exactly the ledger's ε.

    The true ε never decreases as steps are added, but a numerical bound (PRV) computed afresh per
    prefix could come out a hair lower than the previous one; we report the running maximum,
    which is still a valid bound and never smaller than the per-prefix one. For RDP each prefix costs
    only a conversion: the one-step curves are cached (see `_rdp_epsilon`).
    """
    accountant = validate_accountant(accountant)
    delta = validate_delta(delta)
    entries = [validate_entry(*entry, where=f"history[{i}]") for i, entry in enumerate(history)]
    values = [epsilon(entries[: k + 1], delta, accountant) for k in range(len(entries))]
    return [float(v) for v in np.maximum.accumulate(values)] if values else []


# ------------------------------------------------------------------------------------------- planning


def plan_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    *,
    rtol: float = 1e-4,
    prior: Sequence[Sequence[float]] = (),
) -> float:
    """Smallest noise multiplier σ (to relative precision `rtol`) with ε([*prior, (σ, q, steps)], δ) <= target.

    `prior` holds releases the same records pay for before DP-SGD at fixed settings, e.g. a privatized
    round-0 statistic `(σ₀, 1.0, 1)`; the plan leaves them room within the target.

    Bisection on σ with the same `epsilon` used for reporting, so the plan and the report can
    never disagree. The returned σ is always one whose ε was computed and found <= target; it is
    at most `rtol` (relative) above the exact threshold. Targets no σ reaches (<= 0, or below the
    accountant's floor, e.g. RDP's ≈0.103 at δ = 1e-5 from its finite list of orders) raise
    PrivacyBudgetError.

    `steps` is the number of DP-SGD steps the client will *actually* take over the whole run
    (plan for every round it may take part in, not the expected number: a client sampled more often than
    average must not exceed its target).
    """
    accountant = validate_accountant(accountant)
    delta = validate_delta(delta)
    _, q, steps = validate_entry(1.0, sample_rate, steps)
    target = _real("target_epsilon", target_epsilon)
    if math.isnan(target) or math.isinf(target):
        raise ValueError(f"target_epsilon must be finite, got {target_epsilon!r}")
    if steps == 0:
        raise ValueError("steps must be >= 1 to plan noise: zero steps spend no privacy at any noise level")
    if not 0.0 < rtol < 1.0:
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")
    prior = _canonical(prior)

    @functools.lru_cache(maxsize=None)  # the bracket and the solver revisit their end points
    def eps_at(sigma: float) -> float:
        return epsilon([*prior, (sigma, q, steps)], delta, accountant)

    def floor() -> float:
        # RDP's limit as σ → ∞ is the conversion of an all-zero RDP curve: exact and instant, where evaluating
        # Opacus' RDP at σ = 1e6 and q = 0.5 takes minutes. PRV has no such shortcut.
        return eps_at(MAX_NOISE_MULTIPLIER) if accountant == "prv" else _rdp_floor(delta, accountant)

    with warnings.catch_warnings():
        # Large σ probes sit at RDP's largest order; the floor check reports that case.
        warnings.filterwarnings("ignore", message=_EXTREME_ORDER_WARNING, category=UserWarning)
        if target <= 0.0 or (accountant != "prv" and target <= floor()):
            raise PrivacyBudgetError(_unreachable_message(target, floor(), delta, q, steps, accountant))
        high = _bracket_high(eps_at, target)
        if high is None:
            raise PrivacyBudgetError(_unreachable_message(target, floor(), delta, q, steps, accountant))
        return _solve(eps_at, target, rtol, high)


def _rdp_floor(delta: float, accountant: str = "rdp") -> float:
    """The smallest ε an RDP accountant certifies at δ with any noise: every order's RDP is 0 in the limit."""
    orders = SKELLAM_ORDERS if accountant == SKELLAM else RDPAccountant.DEFAULT_ALPHAS
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_EXTREME_ORDER_WARNING, category=UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=np.zeros(len(orders)), delta=delta)
    return max(float(eps), 0.0)


def _bracket_high(eps_at: Callable[[float], float], target: float) -> float | None:
    """A σ with eps_at(σ) <= target, found by doubling from 1; None when even the largest σ misses the target.

    The floor (ε as σ → ∞) is only computed when the target is out of reach: at large σ and large q,
    Opacus' RDP evaluation is slow, and a reachable target never needs it.
    """
    sigma = 1.0
    while eps_at(sigma) > target:
        if sigma >= MAX_NOISE_MULTIPLIER:
            return None
        sigma = min(2.0 * sigma, MAX_NOISE_MULTIPLIER)
    return sigma


def _solve(eps_at: Callable[[float], float], target: float, rtol: float, high: float) -> float:
    """Smallest σ (to relative precision ``rtol``) with eps_at(σ) <= target, given eps_at(high) <= target.

    Regula falsi with the Illinois modification on log ε, which needs a handful of accountant evaluations
    where bisection needs ~15; each step keeps a bracket [low, high] with ε(low) > target >= ε(high), and the
    answer is always a ``high`` whose ε was computed.
    """
    def gap(sigma: float) -> float:
        value = eps_at(sigma)
        return math.log(value / target) if value > 0 else -math.inf

    f_high = gap(high)
    low = high / 2.0
    f_low = gap(low)
    while f_low <= 0.0:  # ε(low) within target too: move the bracket down
        high, f_high, low = low, f_low, low / 2.0
        f_low = gap(low)
    retained = 0
    while high - low > rtol * high:
        width = high - low
        if math.isfinite(f_low) and math.isfinite(f_high) and f_low != f_high:
            guess = high - f_high * width / (f_high - f_low)
            guess = min(max(guess, low + 0.01 * width), high - 0.01 * width)
        else:
            guess = low + 0.5 * width
        f_guess = gap(guess)
        if f_guess <= 0.0:
            high, f_high = guess, f_guess
            if retained == +1:
                f_low /= 2.0
            retained = +1
        else:
            low, f_low = guess, f_guess
            if retained == -1:
                f_high /= 2.0
            retained = -1
    return high


def _unreachable_message(
    target: float, floor: float, delta: float, q: float, steps: int, accountant: str
) -> str:
    advice = f"Raise target_epsilon above {floor:.4g} or raise delta"
    if accountant == "rdp":
        advice += "; the 'prv' accountant is tighter and certifies smaller ε"
    return (
        f"target_epsilon={target:g} is unreachable: with the {accountant!r} accountant at delta={delta:g}, "
        f"sample_rate={q:g}, steps={steps}, the smallest ε any noise level gives is {floor:.4g} "
        f"(its limit as noise_multiplier → ∞). {advice}."
    )

"""Client-level DP: what the noised aggregate reveals about whether one client took part at all.

The mechanism (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models", DP-FedAvg
with the fixed denominator): every round the server samples each client independently with probability q
(Poisson sampling), clips each sampled client's *whole* update vector to L2 norm C, sums the clipped
updates, adds Gaussian noise N(0, (σ·C)² I) to the sum and divides by the *expected* number of clients
q·N, never by the number that replied (that number depends on who took part). Adding or removing one
client changes the sum by at most C, so one round is exactly the Poisson-subsampled Gaussian mechanism
of one DP-SGD step with noise multiplier σ and rate q, and R rounds compose like R DP-SGD steps:

    ε_client = epsilon([(σ, q, R)], δ)

with the same Opacus accountants (RDP or PRV) record-level DP uses. Client weights must be uniform: with
example weighting one client's share of the mean grows with its (private) number of records and the
sensitivity is no longer C / (q·N).

The history of released rounds is kept in a `PrivacyLedger` under the id `CLIENT_LEVEL_ID`, one entry of
one step per round, so it survives restarts and resumed runs exactly like a client's ledger.
"""

from __future__ import annotations

import math

from .accounting import epsilon, plan_noise, validate_entry
from .ledger import PrivacyLedger

__all__ = [
    "CLIENT_LEVEL_ID",
    "CLIENT_LEVEL_LEDGER_FILE",
    "client_level_epsilon",
    "client_level_ledger",
    "noise_std_of_mean",
    "plan_client_level_noise",
]

CLIENT_LEVEL_ID = "all-clients"
# Kept beside ledgers/ (not in it): load_ledgers reads every client-*.json there as a client's ledger.
CLIENT_LEVEL_LEDGER_FILE = "client-level-ledger.json"


def client_level_epsilon(
    noise_multiplier: float, sample_rate: float, rounds: int, delta: float, accountant: str = "rdp"
) -> float:
    """ε at δ of `rounds` released aggregates, each the Poisson(q)-subsampled Gaussian with multiplier σ."""
    return epsilon([(noise_multiplier, sample_rate, rounds)], delta, accountant)


def plan_client_level_noise(
    target_epsilon: float, delta: float, sample_rate: float, rounds: int, accountant: str = "rdp"
) -> float:
    """The smallest σ whose `rounds` releases stay within `target_epsilon` (raises PrivacyBudgetError if none)."""
    return plan_noise(target_epsilon, delta, sample_rate, rounds, accountant)


def noise_std_of_mean(noise_multiplier: float, clipping_norm: float, expected_clients: float) -> float:
    """Standard deviation of the noise on each coordinate of the aggregated (mean) update: σ·C / (q·N)."""
    validate_entry(noise_multiplier, 1.0, 0)
    if not (clipping_norm > 0 and math.isfinite(clipping_norm)):
        raise ValueError(f"clipping_norm must be a finite number > 0, got {clipping_norm!r}")
    if not expected_clients > 0:
        raise ValueError(f"expected_clients must be > 0, got {expected_clients!r}")
    return noise_multiplier * clipping_norm / expected_clients


def client_level_ledger(delta: float, accountant: str = "rdp") -> PrivacyLedger:
    """An empty ledger for the client-level guarantee of a run."""
    return PrivacyLedger(CLIENT_LEVEL_ID, delta=delta, accountant=accountant)

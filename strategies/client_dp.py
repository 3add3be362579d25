"""Client-level DP on the server, as pure functions on tensors: clip each client's whole update, add
Gaussian noise to the sum, divide by the expected number of clients (DP-FedAvg with the fixed denominator,
McMahan et al. 2018). The accountant is `fedspec.privacy.client_level`.

One round, for the clients S sampled with probability q each (Poisson) out of N:

    mean = ( Σ_{k∈S} clip(Δ_k, C) + N(0, σ²C²·I) ) / (q·N),    clip(Δ, C) = Δ · min(1, C / ‖Δ‖₂)

‖Δ‖₂ is the norm of the whole update vector of a client (every tensor it sends: ΔB and the head under FedSVD),
so adding or removing one client moves the sum by at most C and the mean by at most C/(q·N); the noise on the
mean has standard deviation σ·C/(q·N) per coordinate. Weights are uniform: with weights ∝ records one client
could move the mean by more than C/(q·N). The denominator is q·N, never the number
of replies, which depends on who took part.

FedSVD: the noise goes on the summed ΔB (and head) *before* the SVD re-factorization of B·A; the refactor is
a function of the noised state only, so it is post-processing and costs no privacy.

Why not Flower's ``DifferentialPrivacyServerSideFixedClipping`` (checked in flwr 1.42.0):
- it clips ``reply − current`` array by array with ``zip(..., strict=True)`` over all arrays sent to the
  client; fedspec replies hold only the *differences* of the tensors a client trains (FedSVD clients never
  send A), so the lists do not line up (ValueError) and the difference would be taken twice;
- it adds noise to what the wrapped strategy returns, i.e. *after* the FedSVD refactor and to A as well:
  the refactor is nonlinear, so the sensitivity of its output is not C/n and the noise is not calibrated;
- it divides by the ``num_sampled_clients`` given at construction, uses NumPy's global RNG, and its
  accountant (``PrivacyAccountant``) only supports sampling without amplification and plain FedAvg.
"""

from __future__ import annotations

import math
import random
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "ClientDP",
    "PrivateAggregate",
    "clip_update",
    "noise_generator",
    "poisson_sample",
    "private_mean",
    "update_norm",
]


@dataclass(frozen=True)
class ClientDP:
    """Client-level DP settings of a run."""

    noise_multiplier: float
    clipping_norm: float
    sample_rate: float  # Poisson client sampling rate q
    num_clients: int  # N
    seed: int | None = None  # tests only: seeded sampling and noise are not private against who knows the seed

    @property
    def expected_clients(self) -> float:
        return self.sample_rate * self.num_clients


@dataclass(frozen=True)
class PrivateAggregate:
    mean: dict[str, torch.Tensor]  # float64
    clients: int  # updates summed
    clipped: int  # of them, how many were longer than C
    noise_std: float  # per coordinate of the mean


def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of a whole update: all its tensors as one vector (float64)."""
    return math.sqrt(sum(float(t.detach().to(torch.float64).square().sum()) for t in update.values()))


def clip_update(update: Mapping[str, torch.Tensor], clipping_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """(the update scaled to L2 norm ≤ C, in float64; its norm before clipping)."""
    if not clipping_norm > 0:
        raise ValueError(f"clipping_norm must be > 0, got {clipping_norm!r}")
    norm = update_norm(update)
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    return {k: t.detach().to(torch.float64) * scale for k, t in update.items()}, norm


def private_mean(
    updates: Sequence[Mapping[str, torch.Tensor]],
    template: Mapping[str, torch.Tensor],
    *,
    clipping_norm: float,
    noise_multiplier: float,
    expected_clients: float,
    generator: torch.Generator,
) -> PrivateAggregate:
    """(Σ clip(Δ_k, C) + N(0, σ²C²)) / (q·N) over the keys of ``template`` (what clients train and send).

    With no updates at all (nobody sampled, everyone declined) the result is noise alone: the release must
    look the same whoever took part.
    """
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier!r}")
    if not expected_clients > 0:
        raise ValueError(f"expected_clients must be > 0, got {expected_clients!r}")
    total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in template.items()}
    clipped = 0
    for update in updates:
        if update.keys() != template.keys():
            raise ValueError(f"a client update carries other tensors than expected: {sorted(update.keys() ^ template.keys())[:3]}")
        scaled, norm = clip_update(update, clipping_norm)
        clipped += norm > clipping_norm
        for key, value in scaled.items():
            total[key] += value
    sum_std = noise_multiplier * clipping_norm
    mean = {}
    for key, value in total.items():
        noise = torch.normal(0.0, sum_std, size=value.shape, generator=generator, dtype=torch.float64)
        mean[key] = (value + noise) / expected_clients
    return PrivateAggregate(mean, len(updates), clipped, sum_std / expected_clients)


def noise_generator(seed: int | None, server_round: int) -> torch.Generator:
    """The round's noise generator: OS entropy, or (tests only) derived from the run seed and round."""
    value = secrets.randbits(63) if seed is None else (seed * 1_000_003 + server_round) % (2**63)
    return torch.Generator().manual_seed(value)


def poisson_sample(candidates: Sequence[int], rate: float, seed: int | None, server_round: int) -> list[int]:
    """Each candidate independently with probability ``rate``: the sampling the client-level accountant
    assumes. The outcome must stay secret to amplify privacy, so it comes from OS entropy (seeded in tests)."""
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"rate must be in (0, 1], got {rate!r}")
    rng = random.SystemRandom() if seed is None else random.Random(f"client-level:{seed}:{server_round}")
    return [c for c in candidates if rng.random() < rate]

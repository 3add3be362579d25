"""Client-level DP under secure aggregation: each client adds its share of the noise (distributed Skellam noise).

With secure aggregation the server learns only the sum of the clients' updates, so it cannot add client-level
noise itself without first seeing the sum un-noised. Instead every client adds a share of integer noise to its
integer-encoded update before masking; the shares add up inside the masked sum, and nobody — the server included —
ever sees an un-noised sum. The noise is Skellam (the difference of two Poisson variables: integer-valued, so it
survives the modular arithmetic of the masks, and a sum of Skellams is again Skellam, so the shares compose exactly)
— the Skellam mechanism of Agarwal, Kairouz & Liu, "The Skellam Mechanism for Differentially Private Federated
Learning" (NeurIPS 2021).

One round, on every client k of the cohort (``m`` = the number of shares, see below; d = the update's size):

    x_k = clip(Δ_k, C) · S / C                       the whole update (every tensor it sends), norm ≤ S
    x̃_k = stochastic rounding of x_k to integers     unbiased; each coordinate moves by < 1, so ‖x̃_k‖₂ ≤ S + √d
    y_k = x̃_k + Sk(μ / m)^d                           each coordinate: Poisson(μ/2m) − Poisson(μ/2m)

and the server unmasks Σ y_k over the clients that survived, then divides by their number. The resolution
``S = units(d)`` is the smallest power of two ≥ 64·√d (at least 2^12), so rounding inflates the sensitivity by at
most 1/64; ``μ = (z·Δ₂)²`` with ``Δ₂ = S + √d`` makes the summed noise's standard deviation z times the
sensitivity, like σ in the central mechanism. A round is summed only when at least ``m`` clients survive, so the
summed noise has variance at least μ. The clients enforce it, not only the server: each accepts an ``m`` no larger
than its config plans (``PlanSettings.noise_shares``; a smaller one only enlarges its share) and refuses to unmask
when fewer than ``m`` survivors are named (client/secure_aggregation.py) — assuming honest clients, each adding its
share, and a server that relays the secure-aggregation protocol as written (its keys are not signed).

Guarantee (what the ledger composes). Neighbouring runs differ in one client's whole data, which becomes a zero
update (*zero-out* adjacency: the server knows which clients take part, so it is the content of a client's data
that is protected, not its participation; Kairouz et al. 2021). The sum then moves by x̃_k: ‖x̃_k‖₂ ≤ Δ₂ and
‖x̃_k‖₁ ≤ √d·Δ₂. The Skellam mechanism's RDP at integer order α > 1 (Agarwal et al., the multi-dimensional bound)

    ε(α) ≤ αΔ₂²/(2μ) + min(((2α−1)Δ₂² + 6Δ₁)/(4μ²), 3Δ₁/(2μ))

with μ = z²Δ₂² and Δ₁ ≤ √d·Δ₂ ≤ Δ₂²/6 (as √d ≤ S/64) is at most α/(2z²)·(1 + 1/(z²Δ₂²)) ≤ α/(2σ²) with

    σ = z / √(1 + 1/(z²·2^24))                        (``accounted_multiplier``: Δ₂ ≥ S ≥ 2^12)

— the Gaussian mechanism's RDP at multiplier σ, at integer orders. The ledger records σ with sample rate 1 under the
``skellam`` accountant, which composes at integer orders only. No amplification by sampling is claimed (the server
knows the cohort), and every summed round is charged in full to every client: an upper bound for each of them.

What the server checks (``check_sum``). It cannot see what a client masked, so it refuses a sum that n honest
clients would not send: its count slot must be exactly n (nothing is added to it), and every coordinate within
``n·(S + 1) + b`` in magnitude — each client's rounded coordinate is at most S (+1 for float rounding at the edge)
and ``b`` bounds the summed noise, Skellam of variance ``V = n·μ/m``: as a difference of two Poisson variables it
obeys Bernstein's inequality ``P(|X| ≥ b) ≤ 2·exp(−b²/(2(V + b/3)))``, and ``b`` makes that 2·e^−100
(< 10^−43 per coordinate: an honest sum is never refused in practice; about 14 standard deviations once V is
large).
Nothing wraps: ``check_headroom`` keeps the signal and 40 standard deviations below 2^61, so the signed lift of
the residues is the integer sum itself. A client that masks a vector of its own choosing can move a coordinate of
the decoded mean by at most about C·(1 + b/(n·S)), never without limit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..secagg.quantize import MODULUS_BITS, unflatten

__all__ = ["MIN_UNITS", "SkellamNoise", "noise_multiplier_for", "skellam", "units"]

MIN_UNITS = 2**12  # the coarsest resolution S: the accounted σ holds for every S at least this
# torch's (and numpy's) Poisson sampler drifts from the Poisson law at rates above ~1e13 (variance off by 1-3 % and
# kurtosis by 0.07-0.4 at 1e14-3e14; within 0.15 % and 0.01 up to 4.4e12, measured on 4M draws). Larger rates are
# drawn as sums of Poisson variables of rate at most this, and more parts than _MAX_PARTS are refused.
_MAX_POISSON_RATE = float(2**40)
_MAX_PARTS = 4096
# The tail the server's check allows the summed noise, in nats: an honest coordinate is refused with probability
# at most 2·e^−100 (Bernstein's inequality, see the module docstring)
_TAIL_NATS = 100.0


def units(dimension: int) -> int:
    """S for an update of ``dimension`` coordinates: the smallest power of two ≥ 64·√d, at least MIN_UNITS."""
    if dimension < 1:
        raise ValueError(f"an update needs at least one coordinate, got {dimension}")
    return max(MIN_UNITS, 2 ** math.ceil(math.log2(64 * math.sqrt(dimension))))


def noise_multiplier_for(accounted: float) -> float:
    """The z whose accounted multiplier (see the module docstring) is ``accounted``: the inverse of
    σ = z / √(1 + 1/(z²S²)) at S = MIN_UNITS, i.e. 1/z² = u with u + u²/S² = 1/σ², solved without cancellation."""
    if not (math.isfinite(accounted) and accounted > 0):
        raise ValueError(f"the accounted noise multiplier must be a finite number > 0, got {accounted!r}")
    inverse_square = 2.0 / (accounted**2 * (1.0 + math.sqrt(1.0 + 4.0 / (MIN_UNITS**2 * accounted**2))))
    return 1.0 / math.sqrt(inverse_square)


@dataclass(frozen=True)
class SkellamNoise:
    """One run's distributed-noise settings: the same on the server and on every client."""

    noise_multiplier: float  # z: the summed noise's standard deviation over the sensitivity Δ₂
    clipping_norm: float  # C: bound on the L2 norm of one client's whole update

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be a finite number > 0, got {self.noise_multiplier!r}")
        if not (math.isfinite(self.clipping_norm) and self.clipping_norm > 0):
            raise ValueError(f"clipping_norm must be a finite number > 0, got {self.clipping_norm!r}")

    @property
    def accounted_multiplier(self) -> float:
        """σ whose Gaussian RDP at integer orders bounds one round's Skellam RDP (what the ledger records)."""
        z = self.noise_multiplier
        return z / math.sqrt(1.0 + 1.0 / (z * z * MIN_UNITS * MIN_UNITS))

    @staticmethod
    def sensitivity(dimension: int) -> float:
        """Δ₂ = S + √d: the largest norm of one client's rounded update, in integer units."""
        return units(dimension) + math.sqrt(dimension)

    def summed_variance(self, dimension: int) -> float:
        """μ = (z·Δ₂)²: the noise variance per coordinate of the sum, in integer units, once all shares are in."""
        return (self.noise_multiplier * self.sensitivity(dimension)) ** 2

    def std_of_mean(self, clients: float, dimension: int | None = None) -> float:
        """The noise's standard deviation per coordinate of the decoded mean of ``clients`` updates: z·C·Δ₂/(S·n),
        or z·C/n (low by at most 1/64) when the update's size is not known."""
        inflation = 1.0 if dimension is None else self.sensitivity(dimension) / units(dimension)
        return self.noise_multiplier * self.clipping_norm * inflation / clients

    def check_headroom(self, dimension: int, clients: int, shares: int) -> None:
        """Refuse settings whose masked sum could wrap around the modulus: the signal (≤ S + 1 per coordinate and
        client) plus 40 standard deviations of the noise must stay below 2^61 in magnitude."""
        noise = math.sqrt(self.summed_variance(dimension) * clients / shares)
        if clients * (units(dimension) + 1) + 40 * noise >= 2 ** (MODULUS_BITS - 1):
            raise ConfigError(f"distributed client-level noise with z = {self.noise_multiplier:.4g} and {clients} "
                              "clients could wrap the masked sum around 2^62: lower the noise or the clients")

    def noise_bound(self, dimension: int, clients: int, shares: int) -> int:
        """b: the summed noise of ``clients`` shares exceeds it on a coordinate with probability at most 2·e^−100.
        Bernstein's inequality for Skellam noise of variance V, P(|X| ≥ b) ≤ 2·exp(−b²/(2(V + b/3))), solved for
        b: b = L/3 + √(L²/9 + 2LV) with L = 100 (the log-MGF V(cosh t − 1) meets Bernstein's condition)."""
        variance = self.summed_variance(dimension) * clients / shares
        tail = _TAIL_NATS
        return math.ceil(tail / 3 + math.sqrt(tail * tail / 9 + 2 * tail * variance))

    def check_sum(self, total: torch.Tensor, clients: int, shares: int) -> None:
        """Refuse (ValueError) an unmasked sum (residues modulo 2^62) of ``clients`` encodings with ``shares``
        noise shares that no honest clients could send: a count other than ``clients``, or a coordinate beyond
        ``clients·(S + 1) + noise_bound`` in magnitude (see the module docstring)."""
        signed = _signed(total)
        count = int(signed[-1])
        if count != clients:
            raise ValueError(f"the unmasked sum counts {count} clients, but {clients} masked vectors were summed: a "
                             "client masked a vector it did not encode")
        dimension = total.numel() - 1
        bound = clients * (units(dimension) + 1) + self.noise_bound(dimension, clients, shares)
        outside = (signed[:-1].abs() > bound).nonzero().flatten()
        if outside.numel():
            first = int(outside[0])
            raise ValueError(f"{outside.numel()} coordinate(s) of the unmasked sum are beyond ±{bound} ({clients} "
                             f"clipped updates and their noise), the first #{first} at {int(signed[first])}: a "
                             "client masked a vector it did not encode")

    # ------------------------------------------------------------------------------------------ client side

    def encode(
        self, update: Mapping[str, torch.Tensor], shares: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, float]:
        """``[x̃ + noise share …, 1]`` as int64 residues modulo 2^62, ready to mask (keys in sorted order; the
        trailing 1 counts the client in the sum), and the update's norm before clipping. ``shares`` = m: this
        client adds 1/m of the noise."""
        if not isinstance(shares, int) or shares < 1:
            raise ValueError(f"the number of noise shares must be an integer >= 1, got {shares!r}")
        flat = torch.cat([update[key].detach().reshape(-1).to(torch.float64) for key in sorted(update)])
        if not torch.isfinite(flat).all():
            raise ValueError("the update has non-finite values: it cannot enter the masked sum")
        dimension = flat.numel()
        variance_share = self.summed_variance(dimension) / shares
        norm = float(flat.norm())
        scale = units(dimension) / max(norm, self.clipping_norm)  # clip to C, then C ↦ S
        scaled = flat * scale
        low = scaled.floor()
        rounded = (low + (torch.rand(scaled.shape, generator=generator, dtype=torch.float64) < scaled - low))
        noise = skellam(variance_share, dimension, generator)
        values = torch.cat([rounded.to(torch.int64) + noise, torch.ones(1, dtype=torch.int64)])
        return values.bitwise_and_(2**MODULUS_BITS - 1), norm  # two's complement: −1 becomes 2^62 − 1

    # ------------------------------------------------------------------------------------------ server side

    def decode(
        self, total: torch.Tensor, like: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], int]:
        """(Σ noised updates per key in update units, the number of clients summed) from the unmasked sum
        (residues modulo 2^62, lifted to signed integers)."""
        sizes = [like[key].numel() for key in sorted(like)]
        if total.numel() != sum(sizes) + 1:
            raise ValueError(f"the masked sum has {total.numel()} coordinates, the update {sum(sizes)} + 1")
        signed = _signed(total)
        clients = int(signed[-1])
        values = signed[:-1].to(torch.float64) * (self.clipping_norm / units(sum(sizes)))
        return unflatten(values, like), clients


def _signed(total: torch.Tensor) -> torch.Tensor:
    """Residues modulo 2^62 lifted to the signed integers in [−2^61, 2^61) (two's complement, as clients encode)."""
    half = 2 ** (MODULUS_BITS - 1)
    return torch.where(total >= half, total - 2 * half, total)


def skellam(variance: float, size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` independent Skellam draws of the given variance: Poisson(v/2) − Poisson(v/2), as int64."""
    rate = variance / 2.0
    return _poisson(rate, size, generator) - _poisson(rate, size, generator)


def _poisson(rate: float, size: int, generator: torch.Generator) -> torch.Tensor:
    parts = max(1, math.ceil(rate / _MAX_POISSON_RATE))
    if parts > _MAX_PARTS:
        raise ValueError(f"a noise share of variance {2 * rate:.3g} per coordinate is beyond what fedspec draws "
                         "exactly: lower the noise")
    total = torch.zeros(size, dtype=torch.int64)
    for _ in range(parts):
        total += torch.poisson(torch.full((size,), rate / parts, dtype=torch.float64), generator=generator).to(torch.int64)
    return total

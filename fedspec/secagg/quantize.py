"""Fixed-point encoding of a client's weighted update for the masked sum, and its decoding on the server.

Masks live in the integers modulo 2^62, so a client's float update becomes integers first: each coordinate is
clipped to [−clip, clip] and rounded stochastically (unbiased) to one of 2^bits levels, ``q = (x + clip) / step``
with ``step = 2·clip / (2^bits − 1)``. The client sends ``[w·q, w]`` (its weight, a record count or 1, inside the
sum: the server never learns it alone). From the sums the server recovers

    Σ w·x = step·Σ w·q − clip·Σ w,    and the weighted mean Σ w·x / Σ w,

exact up to the rounding: every coordinate of the mean is within ``step`` of the unquantized mean (a coordinate
beyond ±clip is clipped first; clients count those and report the count).

The server cannot see what a client masked, so it checks the sum (``check_sum``): n honest clients, each with
``1 ≤ w ≤ max_weight`` and ``0 ≤ q ≤ 2^bits − 1``, sum to ``n ≤ Σ w ≤ n·max_weight`` and to
``0 ≤ Σ w·q ≤ (2^bits − 1)·Σ w`` on every coordinate, exactly: nothing is added to the levels (no noise here:
client-level DP encodes with ``fedspec.privacy.skellam`` instead), nothing wraps modulo 2^bits, and
``max_clients`` keeps every such sum below the modulus 2^62, so the residues are the integer sums themselves. A
sum outside those limits is refused; one inside decodes to a mean within [−clip, clip] on every coordinate, so a
client that masks a vector of its own choosing moves the model at most that far, never without limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .primitives import SecAggError

MODULUS_BITS = 62  # sums of two residues stay below 2^63: int64 arithmetic never overflows


@dataclass(frozen=True)
class Quantizer:
    clip: float  # every coordinate is clipped to [-clip, clip] before rounding
    bits: int  # 2^bits levels across [-clip, clip]
    max_weight: int  # a client's weight is capped here, so that no sum can wrap around the modulus

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise SecAggError(f"secure_aggregation.clip_range={self.clip!r} must be a positive number")
        if not 8 <= self.bits <= 32:
            raise SecAggError(f"secure_aggregation.bits={self.bits!r} must be in 8..32")
        if self.max_weight < 1:
            raise SecAggError(f"secure_aggregation.max_weight={self.max_weight!r} must be >= 1")

    @property
    def step(self) -> float:
        """The rounding step: the bound on each coordinate's error in the decoded mean."""
        return 2 * self.clip / (2**self.bits - 1)

    def max_clients(self) -> int:
        """How many clients' ``w·q`` fit below the modulus: more would wrap the sum around."""
        return 2**MODULUS_BITS // (self.max_weight * 2**self.bits)

    def encode(
        self, update: dict[str, torch.Tensor], weight: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, int]:
        """``[w·q(update) …, w]`` as int64 (keys in sorted order), and how many coordinates were clipped."""
        if not 1 <= weight <= self.max_weight:
            raise SecAggError(f"a client's weight {weight} is outside 1..{self.max_weight} (secure_aggregation.max_weight)")
        flat = torch.cat([update[key].detach().reshape(-1).to(torch.float64) for key in sorted(update)])
        if not torch.isfinite(flat).all():
            raise SecAggError("the update has non-finite values: it cannot enter the masked sum")
        clipped = int((flat.abs() > self.clip).sum())
        scaled = (flat.clamp(-self.clip, self.clip) + self.clip) / self.step
        low = scaled.floor()
        levels = low + (torch.rand(scaled.shape, generator=generator, dtype=torch.float64) < scaled - low)
        levels = levels.clamp(0, 2**self.bits - 1).to(torch.int64)
        return torch.cat([levels * weight, torch.tensor([weight], dtype=torch.int64)]), clipped

    def check_sum(self, total: torch.Tensor, clients: int) -> None:
        """Refuse (SecAggError) an unmasked sum of ``clients`` encodings that no honest clients could send: its
        total weight outside ``clients..clients·max_weight``, or a coordinate outside ``0..(2^bits − 1)·weight``."""
        weight, heaviest = int(total[-1]), clients * self.max_weight
        if not clients <= weight <= heaviest:
            raise SecAggError(f"the unmasked sum's total weight {weight} is outside {clients}..{heaviest} ({clients} "
                              f"clients of weight 1..{self.max_weight}): a client masked a vector it did not encode")
        top = (2**self.bits - 1) * weight  # below 2^62 (max_clients): an exact int64 comparison
        outside = ((total[:-1] < 0) | (total[:-1] > top)).nonzero().flatten()
        if outside.numel():
            first = int(outside[0])
            raise SecAggError(f"{outside.numel()} coordinate(s) of the unmasked sum are outside 0..{top} "
                              f"((2^{self.bits} − 1) × total weight {weight}), the first #{first} at "
                              f"{int(total[first])}: a client masked a vector it did not encode")

    def decode(self, total: torch.Tensor, like: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
        """(Σ w·x per key, Σ w) from the unmasked sum of the clients' encodings; ``like`` gives keys and shapes."""
        sizes = [like[key].numel() for key in sorted(like)]
        if total.numel() != sum(sizes) + 1:
            raise SecAggError(f"the masked sum has {total.numel()} coordinates, the update {sum(sizes)} + 1")
        weight = int(total[-1])
        values = total[:-1].to(torch.float64) * self.step - self.clip * weight
        return unflatten(values, like), weight


def unflatten(values: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A flat vector back into tensors shaped as ``like``'s, keys in sorted order (how updates are flattened)."""
    out, start = {}, 0
    for key in sorted(like):
        size = like[key].numel()
        out[key] = values[start:start + size].reshape(like[key].shape)
        start += size
    return out

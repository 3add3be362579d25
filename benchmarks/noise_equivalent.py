"""How much DP noise does a federation's aggregate carry, in the units of one centralized DP-SGD run?

    python benchmarks/noise_equivalent.py RUN_DIR [RUN_DIR …] [--batch 128]

Reads a finished `fedspec simulate` run's metrics.jsonl (each client's records, noise multiplier σ_k and sample rate
q_k in round 1) and prints the noise multiplier σ_eq at which `fedspec train` — K·R·L steps of batch B, the
federation's total client steps — carries the same noise for the same signal as the federation's aggregate.

Why: a client's DP-SGD step adds N(0, σ_k²C²) to the sum of its clipped gradients and divides by its expected batch
q_k·n_k, and the server takes the weighted mean (w_k = n_k / N) of K clients' L-step updates, so every local step
of the aggregate carries noise of std s = C·√(Σ w_k² σ_k² / (q_k n_k)²) on the mean gradient. Over R rounds the
signal grows as R·L and the noise as √(R·L); one stream of T = K·R·L steps grows as T and √T with noise σ·C/B a
step. Equal noise-to-signal ratio: σ_eq = B·√K·s / C. The server's step size and momentum scale signal and noise
alike and drop out. This is first-order (no curvature, no client drift); docs/recipe.md tests it by training
centrally at σ_eq (`python benchmarks/accuracy.py --grid noise`).

Each client plans σ_k for its own ε over its own records: a 3,000-record client samples at q = 128/3,000, twenty
times the pooled q, and privacy amplification by subsampling weakens with q, so at the same ε and the same total
steps the aggregate is noisier than the pooled run.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from study_cells import read_metrics


@dataclass(frozen=True)
class ClientNoise:
    examples: int
    noise_multiplier: float
    sample_rate: float


def first_round_clients(run_dir: Path) -> list[ClientNoise]:
    """Every client's records, σ and q in round 1 (each plans them once, for the whole run)."""
    metrics = run_dir / "metrics.jsonl"
    rows = read_metrics(run_dir)
    clients = [ClientNoise(row["num_examples"], row["noise_multiplier"], row["sample_rate"])
               for row in rows if row.get("kind") == "client" and row.get("round") == 1]
    if not clients:
        raise SystemExit(f"{metrics}: no round-1 client rows (not a finished DP federation?)")
    if any(c.noise_multiplier is None for c in clients):
        raise SystemExit(f"{metrics}: a client trained without DP; there is no noise to compare")
    return clients


def centralized_equivalent_sigma(clients: list[ClientNoise], batch: int) -> float:
    """σ_eq of the module docstring, for an examples-weighted mean of these clients."""
    total = sum(c.examples for c in clients)
    noise_on_mean = math.sqrt(sum((c.examples / total) ** 2
                                  * (c.noise_multiplier / (c.sample_rate * c.examples)) ** 2 for c in clients))
    return batch * math.sqrt(len(clients)) * noise_on_mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished `fedspec simulate` run directories")
    parser.add_argument("--batch", type=int, default=128, help="the centralized run's batch size")
    args = parser.parse_args()
    for run in args.runs:
        clients = first_round_clients(run)
        sigmas = [c.noise_multiplier for c in clients]
        print(f"{run.name}: {len(clients)} clients, {sum(c.examples for c in clients):,} records, "
              f"σ_k {min(sigmas):.3f}–{max(sigmas):.3f} → centralized-equivalent σ "
              f"{centralized_equivalent_sigma(clients, args.batch):.3f} at batch {args.batch}")


if __name__ == "__main__":
    main()

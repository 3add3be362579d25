"""benchmarks/noise_equivalent.py: the centralized DP-SGD noise multiplier that matches a federation's aggregate."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from noise_equivalent import ClientNoise, centralized_equivalent_sigma, first_round_clients


def test_identical_clients_drawing_the_pooled_batch_are_as_noisy_as_the_pooled_run_at_their_sigma():
    clients = [ClientNoise(examples=1280, noise_multiplier=0.9, sample_rate=0.1)] * 20  # expected batch 128
    assert centralized_equivalent_sigma(clients, batch=128) == pytest.approx(0.9)
    # half the batch on every client: twice the noise on each client's mean gradient
    assert centralized_equivalent_sigma(clients, batch=256) == pytest.approx(1.8)


def test_the_equivalent_sigma_gives_equal_noise_for_equal_signal_by_simulation():
    """K clients × R rounds × L local steps of weighted-mean noise against K·R·L pooled steps at lr / K, which
    moves the model by the same signal: the two end points must scatter alike."""
    clients = [ClientNoise(300, 3.4, 1 / 3), ClientNoise(2000, 0.8, 1 / 16), ClientNoise(5000, 0.7, 1 / 40)]
    batch, rounds, local_steps, trials = 128, 3, 2, 200_000
    generator = torch.Generator().manual_seed(0)
    total = sum(c.examples for c in clients)
    federated = torch.zeros(trials, dtype=torch.float64)
    for _ in range(rounds * local_steps):
        for c in clients:
            std = c.noise_multiplier / (c.sample_rate * c.examples)
            federated += c.examples / total * std * torch.randn(trials, generator=generator, dtype=torch.float64)
    steps = len(clients) * rounds * local_steps
    sigma = centralized_equivalent_sigma(clients, batch)
    pooled = sigma / batch / len(clients) * torch.randn(trials, steps, generator=generator, dtype=torch.float64).sum(1)
    assert pooled.std().item() == pytest.approx(federated.std().item(), rel=0.01)


def test_round_one_client_rows_are_read_and_a_run_without_them_is_refused(tmp_path: Path):
    rows = [{"kind": "round", "round": 0, "eval_accuracy": 0.5},
            {"kind": "client", "round": 1, "num_examples": 283, "noise_multiplier": 3.4, "sample_rate": 1 / 3},
            {"kind": "client", "round": 1, "num_examples": 2040, "noise_multiplier": 0.8, "sample_rate": 1 / 16},
            {"kind": "client", "round": 2, "num_examples": 283, "noise_multiplier": 3.4, "sample_rate": 1 / 3}]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    assert first_round_clients(tmp_path) == [ClientNoise(283, 3.4, 1 / 3), ClientNoise(2040, 0.8, 1 / 16)]
    expected = 128 * math.sqrt(2) * math.hypot(283 / 2323 * 3.4 / (283 / 3), 2040 / 2323 * 0.8 / (2040 / 16))
    assert centralized_equivalent_sigma(first_round_clients(tmp_path), 128) == pytest.approx(expected)
    metrics.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(SystemExit, match="no round-1 client rows"):
        first_round_clients(tmp_path)

"""Federated round 0 of the data-driven initializers on Flower's simulation runtime: the server's global adapter
is initialized from the exact sum of the clients' statistics, a privatized statistic is counted in every client's
ε (as the Gaussian mechanism (σ₀, q = 1, 1 step), before any DP-SGD step) and the privacy report says whether it
was privatized; EVA's per-layer ranks reach the clients."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import fedspec
from fedspec.adapters import adapter_layers, load_adapter, sum_calibrations
from fedspec.builders import build_task, client_partitions, encode
from fedspec.models import build_classifier
from fedspec.privacy import PrivacyLedger, load_ledgers
from fedspec.rundir import MetricsLog
from fedspec.simulations.driver import simulate

SIGMA0 = 4.0


def _config(tmp_path, *overrides):
    from fedspec.config import compose_config

    return compose_config([
        "model=tiny-bert", "data.num_examples=240", "data.partition=iid", "data.eval_examples=32",
        "data.min_client_examples=8",
        "federation.clients=3", "federation.rounds=1", "federation.fraction=1.0", "train.local_steps=1",
        "train.batch_size=16", "adapter.rank=4", "adapter.calibration_examples=24", "privacy.seed_noise=true",
        f"run.output_dir={tmp_path}", "run.progress=false", *overrides,
    ])


def _expected_calibration(cfg):
    """Every client's statistic as the client computes it, summed: what the server must initialize from."""
    from fedspec.client.statistics import local_calibration

    task = build_task(cfg)
    model, tokenizer = build_classifier(cfg.model, task.num_classes, seed=cfg.run.seed)
    parts = []
    for client, indices in enumerate(client_partitions(cfg, task.train.labels)):
        inputs, labels = encode(tokenizer, task.train.subset(indices), cfg.model.max_length)
        parts.append(local_calibration(cfg, client, model, inputs, labels))
    return task, sum_calibrations(parts)


@pytest.fixture(scope="module")
def corda_run(tmp_path_factory):
    cfg = _config(tmp_path_factory.mktemp("runs"), "adapter=corda", "adapter.rank=4", "run.name=corda",
                  "privacy.private_init_stats=true", f"privacy.init_noise_multiplier={SIGMA0}")
    return cfg, simulate(cfg)


def test_the_global_init_is_computed_from_the_sum_of_the_clients_privatized_statistics(corda_run):
    cfg, result = corda_run
    task, calibration = _expected_calibration(cfg)
    assert calibration.privatized and calibration.count == 3 * 24
    model, _ = build_classifier(cfg.model, task.num_classes, seed=cfg.run.seed)
    fedspec.adapt(model, "corda", 4, calibration=calibration, svd_method="exact", mode="ipm")
    saved = load_file(str(result.paths.checkpoints / "round-0001" / "state.safetensors"))
    for name, layer in adapter_layers(model).items():  # the residual's init factors are the round-0 init
        assert torch.allclose(saved[f"{name}.init_lora_B"], layer.init_lora_B, atol=1e-6), name
        assert torch.allclose(saved[f"{name}.init_lora_A"], layer.init_lora_A, atol=1e-6), name


def test_the_privatized_statistic_is_round_0_of_every_clients_ledger(corda_run):
    cfg, result = corda_run
    mirror = load_ledgers(result.paths.ledgers)
    assert set(mirror) == {"0", "1", "2"}
    for client, ledger in mirror.items():
        own = PrivacyLedger.load(result.paths.clients / f"client-{client}" / "ledger.json")
        assert own.history() == ledger.history()
        assert own.entries[0].round == 0 and own.history()[0] == (SIGMA0, 1.0, 1)
        assert [e.round for e in own.entries] == [0, 1]
        assert own.epsilon() <= cfg.privacy.target_epsilon + 1e-9  # planned with room for round 0
        without_round_0 = PrivacyLedger.from_dict({**own.to_dict(), "entries": own.to_dict()["entries"][1:]})
        assert own.epsilon() > without_round_0.epsilon()
    rows = [r for r in MetricsLog(result.paths.metrics).read() if r["kind"] == "init"]
    assert rows and rows[0]["statistics_privatized"] and rows[0]["clients"] == 3


def test_the_privacy_report_says_the_init_statistic_was_privatized(corda_run):
    _, result = corda_run
    report = json.loads((result.paths.privacy / "report.json").read_text())
    section = report["extra"]["init_statistics"]
    assert section["privatized"] and section["noise_multiplier"] == SIGMA0 and section["statistics"] == ["inputs"]
    assert "Initialization statistic (round 0): privatized." in (result.paths.privacy / "report.md").read_text()
    assert (result.paths.adapter_peft / "adapter_config.json").is_file()


def test_eva_ranks_decided_in_round_0_reach_the_clients(tmp_path):
    """FFA keeps A at its initial value, so the final A is EVA's round-0 init: the principal components of the
    pooled statistic, with the per-layer ranks the server decided (clients rebuild them from the state)."""
    cfg = _config(tmp_path, "adapter=eva", "strategy=ffa", "adapter.targets=[query,value,attention.output.dense]",
                  "adapter.rank=4", "adapter.options.rho=8.0", "run.name=eva", "privacy=none")
    result = simulate(cfg)
    task, calibration = _expected_calibration(cfg)
    assert not calibration.privatized
    model, _ = build_classifier(cfg.model, task.num_classes, seed=cfg.run.seed)
    fedspec.adapt(model, "eva", 4, list(cfg.adapter.targets), calibration=calibration, rho=8.0)
    trained, _ = build_classifier(cfg.model, task.num_classes, seed=cfg.run.seed)
    load_adapter(trained, result.paths.adapter)
    expected, got = adapter_layers(model), adapter_layers(trained)
    assert {n: layer.rank for n, layer in got.items()} == {n: layer.rank for n, layer in expected.items()}
    assert len({layer.rank for layer in got.values()}) > 1  # the budget was redistributed: ranks differ per layer
    for name, layer in expected.items():
        assert torch.allclose(got[name].lora_A.weight, layer.lora_A.weight, atol=1e-6), name
    clients = [r for r in MetricsLog(result.paths.metrics).read() if r["kind"] == "client" and r["round"] == 1]
    assert len(clients) == 3  # every client loaded the state into its EVA-shaped model and trained
    assert not (result.paths.privacy / "report.json").exists() or "NOT privatized" in (
        result.paths.privacy / "report.md").read_text()

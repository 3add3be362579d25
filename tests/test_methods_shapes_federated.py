"""The structured methods end to end: `fedspec train` for every one, the server's round step (SST), and a tiny
Flower simulation of a FedAvg method whose frozen bases are sent once."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fedspec.adapters import adapter_layers, load_adapter
from fedspec.builders import build_task, encode
from fedspec.centralized import train_centralized
from fedspec.models import build_classifier
from fedspec.rundir import MetricsLog
from fedspec.server.global_model import GlobalModel, split_fixed
from fedspec.training import evaluate

# One method per shape (and the ones with schedules) in the default suite; all of them with -m slow.
QUICK = ["adalora", "loldu", "sst", "dora"]
SHAPE_METHODS = QUICK + [pytest.param(m, marks=pytest.mark.slow) for m in
                         ("sorsa", "kasa", "sora", "lora_xs", "effort", "svfit", "clip_svd", "salt")]


def _reloaded_accuracy(cfg, adapter_dir) -> float:
    task = build_task(cfg.data, cfg.run.seed)
    model, tokenizer = build_classifier(cfg.model, task.num_classes, seed=cfg.run.seed)
    load_adapter(model, adapter_dir)
    inputs, labels = encode(tokenizer, task.eval, cfg.model.max_length)
    return evaluate(model, inputs, labels)["accuracy"]


@pytest.mark.parametrize("method", SHAPE_METHODS)
def test_fedspec_train_runs_every_method_under_dp_and_saves_a_reloadable_adapter(tiny_cfg, method):
    cfg = tiny_cfg(f"adapter={method}", "adapter.rank=4", "data.num_examples=96", "data.eval_examples=32",
                   "train.epochs=2", "privacy.noise_multiplier=1.0", f"run.name=train-{method}",
                   "adapter.options.resample_every=3" if method == "sst" else "run.seed=0")
    result = train_centralized(cfg)
    assert [r.epoch for r in result.rows] == [0, 1, 2]
    assert result.rows[-1].epsilon is not None and result.rows[-1].epsilon > 0
    assert _reloaded_accuracy(cfg, result.paths.adapter) == pytest.approx(result.rows[-1].eval_accuracy, abs=1e-6)


def test_server_round_step_of_sst_redraws_vectors_and_keeps_the_global_weight(tiny_cfg):
    cfg = tiny_cfg("adapter=sst", "adapter.rank=4", "strategy=fedavg")
    server = GlobalModel(cfg, build_task(cfg.data, cfg.run.seed))
    broadcast, fixed = split_fixed(server.state(), server.roles())
    assert not fixed  # SST has no fixed tensors: its frozen vectors are server-owned
    weights = {n: layer.adapted_weight().detach().clone() for n, layer in adapter_layers(server.model).items()}
    after = server.after_round(broadcast, 4)
    assert after.keys() == broadcast.keys()
    changed = [k for k in after if not torch.equal(after[k], broadcast[k])]
    assert any(k.endswith("sel_left.weight") for k in changed) and any(k.endswith("rest_left.weight") for k in changed)
    for name, layer in adapter_layers(server.model).items():
        assert torch.allclose(layer.adapted_weight(), weights[name], atol=1e-5)
    # Methods without a server step broadcast exactly what was aggregated.
    cfg = tiny_cfg("adapter=svfit", "adapter.rank=4", "strategy=fedavg")
    server = GlobalModel(cfg, build_task(cfg.data, cfg.run.seed))
    broadcast, fixed = split_fixed(server.state(), server.roles())
    assert fixed and all(k.endswith(("left.weight", "right.weight", "init_spectrum")) for k in fixed)
    assert server.after_round(broadcast, 1) is broadcast


def test_server_momentum_of_a_tensor_the_sst_step_relaid_out_is_dropped(tiny_cfg):
    """SST's resampling permutes the spectrum and swaps the trainable singular vectors: a momentum buffer kept in
    the old layout would push other triplets next round (strategy=fedavg carries momentum 0.5). The buffers of the
    tensors the step changed are dropped; the others (the head's) keep their momentum."""
    from types import SimpleNamespace

    from fedspec.server.federation import Federation
    from fedspec.strategies.server_optimizer import ServerOptimizer

    cfg = tiny_cfg("adapter=sst", "adapter.rank=4", "strategy=fedavg")
    server = GlobalModel(cfg, build_task(cfg.data, cfg.run.seed))
    broadcast, _ = split_fixed(server.state(), server.roles())
    optimizer = ServerOptimizer(0.5, 0.5, {k: torch.ones_like(v, dtype=torch.float64) for k, v in broadcast.items()})
    federation = SimpleNamespace(model=server, server_optimizer=optimizer)
    Federation._after_round(federation, broadcast, 4)
    changed = {k for k in broadcast if not torch.equal(broadcast[k], federation.global_state[k])}
    assert changed and any(k.endswith("sel_left.weight") for k in changed)
    assert set(optimizer.buffers) == set(broadcast) - changed and any(k.startswith("head.") for k in optimizer.buffers)


def test_simulation_of_a_fedavg_method_with_frozen_bases_sent_once(tiny_cfg):
    from fedspec.simulations.driver import simulate

    cfg = tiny_cfg("adapter=lora_xs", "adapter.rank=4", "strategy=fedavg", "federation.clients=3",
                   "federation.rounds=2", "privacy.seed_noise=true", "run.name=sim-lora_xs")
    result = simulate(cfg)
    rounds = [r for r in MetricsLog(result.paths.metrics).read() if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert _reloaded_accuracy(cfg, result.paths.adapter) == pytest.approx(rounds[-1]["eval_accuracy"], abs=1e-6)
    # The frozen SVD bases never change: the final adapter's are bit-identical to a fresh server's.
    fresh = GlobalModel(cfg, build_task(cfg.data, cfg.run.seed))
    saved = load_file(str(result.paths.adapter / "adapter_model.safetensors"))
    _, fixed = split_fixed(fresh.state(), fresh.roles())
    assert fixed and all(torch.equal(saved[k], v) for k, v in fixed.items())
    trained = [k for k in saved if k.endswith("core.weight")]
    assert trained and not all(torch.equal(saved[k], fresh.state()[k]) for k in trained)  # R was trained


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sst", "sorsa", "kasa", "adalora", "sora", "effort", "svfit", "clip_svd", "salt",
                                    "loldu", "dora"])
def test_simulation_of_every_method_with_fedavg(tiny_cfg, method):
    """Every structured method federates under FedAvg (SST with the server's resampling between rounds)."""
    from fedspec.simulations.driver import simulate

    cfg = tiny_cfg(f"adapter={method}", "adapter.rank=4", "strategy=fedavg", "federation.clients=3",
                   "federation.rounds=2", "privacy.seed_noise=true", f"run.name=sim-{method}")
    result = simulate(cfg)
    rounds = [r for r in MetricsLog(result.paths.metrics).read() if r["kind"] == "round"]
    assert _reloaded_accuracy(cfg, result.paths.adapter) == pytest.approx(rounds[-1]["eval_accuracy"], abs=1e-6)

"""train.device and federation.server_device: what `auto` picks, the errors of a device a machine lacks, the run
summary's compute line, and training and evaluation on a GPU end to end (``gpu``)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from fedspec.config import compose_config
from fedspec.devices import peak_memory_mib, resolve_device
from fedspec.errors import ConfigError


def test_auto_takes_a_gpu_when_torch_sees_one_and_the_cpu_otherwise(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_gpu_the_node_lacks_is_an_error_that_says_what_to_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="train.device=cuda but torch sees no CUDA device.*train.device=auto"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="cuda:3 but this machine has 1 CUDA device"):
        resolve_device("cuda:3")


@pytest.mark.parametrize("key", ["train.device", "federation.server_device"])
@pytest.mark.parametrize("bad", ["gpu", "cuda:", "mps", "CUDA"])
def test_a_setting_that_is_no_device_is_refused_when_the_config_is_composed(key, bad):
    with pytest.raises(ConfigError, match=key):
        compose_config([f"{key}={bad}"])
    assert OmegaConf.select(compose_config([]), key) == "auto"


def test_a_gpu_the_server_lacks_is_named_by_its_own_setting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="federation.server_device=cuda but torch sees no CUDA device.*"
                                           "federation.server_device=auto"):
        resolve_device("cuda", "federation.server_device")


def test_the_summary_says_where_server_and_clients_computed():
    from fedspec.server.reports import compute_line

    def client(id_, cuda, step, peak):
        return {"kind": "client", "client_id": id_, "cuda": cuda, "step_seconds": step, "peak_memory_mib": peak}

    lines = [client(0, 1, 0.010, 2048), client(1, 1, 0.030, 3072), client(0, 1, 0.020, 1024), client(2, 0, 0.5, 512)]
    assert compute_line(torch.device("cpu"), lines) == (
        "- compute: the server evaluated on `cpu`; clients trained 2 on CUDA, 1 on their CPU, median 25 ms per "
        "optimizer step, peak GPU memory up to 3.00 GiB, peak resident memory up to 0.50 GiB")
    # Replies from before this metric existed (or a run with no trained round) leave only the server's part.
    assert compute_line(torch.device("cpu"), [{"kind": "client", "client_id": 0}]) == (
        "- compute: the server evaluated on `cpu`")


def test_the_cpu_peak_is_the_process_resident_set():
    assert 10 < peak_memory_mib(torch.device("cpu")) < 1e6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fedspec_train_runs_on_the_gpu_and_says_so(tmp_path):
    from fedspec.centralized import train_centralized

    cfg = compose_config(["model=tiny-bert", "train.device=cuda", "train.epochs=1", "run.progress=false",
                          f"run.output_dir={tmp_path}", "run.name=gpu"])
    result = train_centralized(cfg)
    summary = (result.paths.root / "summary.md").read_text()
    assert "- device: `cuda" in summary and "peak GPU memory" in summary
    assert result.rows[-1].eval_accuracy > 0
    assert (result.paths.root / "adapter" / "adapter_model.safetensors").is_file()


def test_a_node_picks_its_own_device_and_a_bad_one_is_named():
    pytest.importorskip("flwr")
    from flwr.app import Context, RecordDict

    from fedspec.client.runtime import node_device
    from fedspec.errors import FedspecError

    cfg = compose_config(["train.device=auto"])

    def context(node_config):
        return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})

    assert node_device(cfg, context({"partition-id": 0})) == torch.device("cpu")  # the run's auto, on this CPU
    assert node_device(cfg, context({"partition-id": 0, "device": "cpu"})) == torch.device("cpu")
    with pytest.raises(FedspecError, match="node config device='tpu'"):
        node_device(cfg, context({"partition-id": 0, "device": "tpu"}))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_server_evaluates_on_its_gpu_and_hands_out_cpu_tensors(tiny_cfg):
    from fedspec.builders import build_task
    from fedspec.server.global_model import GlobalModel

    cfg = tiny_cfg("federation.server_device=cuda")
    on_gpu = GlobalModel(cfg, build_task(cfg.data, cfg.run.seed))
    on_cpu = GlobalModel(tiny_cfg("federation.server_device=cpu"), build_task(cfg.data, cfg.run.seed))
    assert next(on_gpu.model.parameters()).is_cuda
    state = on_gpu.state()
    assert all(t.device.type == "cpu" for t in state.values())  # broadcast, aggregated and checkpointed as such
    for key, tensor in on_cpu.state().items():
        torch.testing.assert_close(state[key], tensor, atol=1e-5, rtol=1e-5)
    gpu, cpu = on_gpu.evaluate(state), on_cpu.evaluate(state)
    assert gpu["accuracy"] == pytest.approx(cpu["accuracy"], abs=0.02)
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-3)

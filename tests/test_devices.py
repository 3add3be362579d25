"""train.device: what `auto` picks, the errors of a device a node lacks, and GPU training end to end (``gpu``)."""

from __future__ import annotations

import pytest
import torch

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
    with pytest.raises(RuntimeError, match="train.device=cuda but torch sees no CUDA device.*train.device=auto"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match="cuda:3 but this machine has 1 CUDA device"):
        resolve_device("cuda:3")


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "mps", "CUDA"])
def test_a_setting_that_is_no_device_is_refused_when_the_config_is_composed(bad):
    with pytest.raises(ConfigError, match="train.device"):
        compose_config([f"train.device={bad}"])
    assert compose_config([]).train.device == "auto"


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

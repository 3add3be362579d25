"""Test environment: Flower, Ray and Hugging Face stay offline, quiet and out of the home directory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_HOME = Path(tempfile.mkdtemp(prefix="fedspec-tests-"))
for key, value in {
    "FLWR_HOME": str(_HOME / "flwr"),
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared evaluation data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def tiny_cfg(tmp_path):
    """A composed config on the tiny random BERT and a small generated task, writing into tmp_path."""
    from fedspec.config import compose_config

    def make(*overrides: str):
        return compose_config([
            "model=tiny-bert",
            "data.num_examples=400",
            "data.eval_examples=64",
            "data.min_client_examples=8",
            "federation.clients=4",
            "federation.rounds=2",
            "train.local_steps=2",
            "train.batch_size=16",
            "run.name=test",
            f"run.output_dir={tmp_path}",
            "run.progress=false",
            *overrides,
        ])

    return make


@pytest.fixture
def flower_task(monkeypatch):
    """Flower builds messages only inside a running task: give this process a task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)

"""A finished run's model, loaded back from its folder: the run's backbone with its final adapter (and head).

`fedspec predict` labels texts with a classifier run, `fedspec generate` answers prompts with a causal-LM run and
`fedspec export-peft` rewrites the adapter in PEFT's format; all three start here, so a run folder is checked and
read in one place."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from .adapters import load_adapter, read_adapter_config
from .builders import ModelSettings, build_backbone
from .config import load_config_file
from .errors import FedspecError
from .models import tokenize
from .training import predict_logits

ADAPTER = "adapter"
HEAD_WEIGHT = "head.weight"
# The adapter's metadata key for the class names in head order (written at the end of every classification run).
LABELS = "labels"


@dataclass
class TrainedRun:
    cfg: DictConfig  # the run's config.yaml
    settings: ModelSettings
    model: nn.Module
    tokenizer: object
    labels: list[str]  # a classifier's class names in head order; empty for a causal LM
    max_length: int
    batch_size: int


@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict[str, float]  # every class, in head order


def load_trained(run_dir: Path, *, adapter_dir: Path | None = None, with_adapter: bool = True) -> TrainedRun:
    """The model of the run in ``run_dir`` (its config.yaml names backbone, adapter and task) with the adapter
    saved in ``adapter_dir`` (default: the run's final ``adapter/``); ``with_adapter=False``: the base model."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FedspecError(f"{config} does not exist: give a run folder (runs/NAME) or its adapter/ folder")
    cfg = load_config_file(config)
    settings = ModelSettings.of(cfg)
    adapter_dir = adapter_dir or run_dir / ADAPTER
    if with_adapter:
        if not adapter_dir.is_dir():
            raise FedspecError(f"{run_dir} has no {adapter_dir.name}/ yet (is the run finished?)")
        read_adapter_config(adapter_dir)  # a clear error when it is not a fedspec adapter
    labels = [] if settings.causal_lm else _class_names(adapter_dir)
    model, tokenizer = build_backbone(settings, len(labels))
    if with_adapter:
        load_adapter(model, adapter_dir)
    model.eval()
    return TrainedRun(cfg, settings, model, tokenizer, labels, int(cfg.model.max_length),
                      int(cfg.train.eval_batch_size))


def _class_names(adapter_dir: Path) -> list[str]:
    """The head's classes: their number from the saved head, their names from the adapter's metadata (runs made
    before the names were saved there get "0".."K-1"). A run with a frozen head (adapter.train_head=false) saves
    none: its head is the one the run seed initializes, which build_backbone rebuilds, with the saved names' count."""
    from safetensors import safe_open

    names = json.loads((adapter_dir / "adapter_config.json").read_text()).get("metadata", {}).get(LABELS)
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as weights:
        if HEAD_WEIGHT not in weights.keys():
            if isinstance(names, list) and len(names) >= 2:
                return [str(name) for name in names]
            raise FedspecError(f"{adapter_dir} holds no classification head and no class names")
        num_classes = weights.get_slice(HEAD_WEIGHT).get_shape()[0]
    if isinstance(names, list) and len(names) == num_classes:
        return [str(name) for name in names]
    return [str(index) for index in range(num_classes)]


def labels_metadata(settings: ModelSettings, label_names: list[str]) -> dict[str, list[str]]:
    """What a run saves in its adapter's metadata so that `fedspec predict` names the head's classes."""
    return {} if settings.causal_lm else {LABELS: [str(name) for name in label_names]}


@torch.no_grad()
def classify(run: TrainedRun, texts: list[str]) -> list[Prediction]:
    """Each text's most probable class and the probabilities of all classes (softmax of the head's logits)."""
    if run.settings.causal_lm:
        raise FedspecError("this run trained a causal LM: answer prompts with `fedspec generate`")
    inputs = tokenize(run.tokenizer, texts, run.max_length)
    probabilities = predict_logits(run.model, inputs, run.batch_size).float().softmax(-1)
    return [Prediction(run.labels[int(row.argmax())], dict(zip(run.labels, row.tolist())))
            for row in probabilities]

"""Small builders from config, shared by `fedspec train`, the server and every client, so all three see
the same model, adapter and data for the same config."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .adapters import adapt
from .data import TextExamples, load_task, partition
from .errors import ConfigError, DataError
from .models import Tokenized, build_classifier, tokenize


@dataclass(frozen=True)
class Task:
    train: TextExamples
    eval: TextExamples

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


def build_task(cfg: DictConfig) -> Task:
    """The training and held-out records; the run seed drives generation and any train/eval carving."""
    settings = OmegaConf.create({**OmegaConf.to_container(cfg.data, resolve=True), "seed": cfg.run.seed})
    train, evaluation = load_task(settings)
    return Task(train, evaluation)


def client_partitions(cfg: DictConfig, labels: list[int]) -> list[list[int]]:
    """The indices of each client's records: a seeded IID or Dirichlet label-skew split."""
    try:
        return partition(
            labels,
            cfg.federation.clients,
            scheme=cfg.data.partition,
            alpha=cfg.data.alpha,
            seed=cfg.run.seed,
            min_size=cfg.data.min_client_examples,
        )
    except DataError as error:
        raise ConfigError(
            f"cannot split the data over the clients: {error} (settings: federation.clients={cfg.federation.clients}, "
            f"data.min_client_examples={cfg.data.min_client_examples}, data.partition={cfg.data.partition}, "
            f"data.alpha={cfg.data.alpha})"
        ) from None


def build_model(cfg: DictConfig, num_classes: int, *, train_A: bool, initialize: bool = True,
                federated: bool = False):
    """The pretrained backbone + head with the configured adapter; returns (model, tokenizer).

    ``initialize=False`` leaves the adapter factors at zero and the base untouched, for a model whose adapter
    state (and residual init factors) will be loaded from elsewhere — a client, or a resumed server.
    ``federated=True`` applies the method's federated trainable mask (the server and every client use it).
    """
    model, tokenizer = build_classifier(cfg.model, num_classes, seed=cfg.run.seed)
    adapter = cfg.adapter
    adapt(
        model,
        adapter.method,
        adapter.rank,
        list(adapter.targets) if adapter.targets else None,
        alpha=adapter.alpha,
        dropout=adapter.dropout,
        train_A=train_A,
        initialize=initialize,
        seed=cfg.run.seed,
        federated=federated,
        svd_method=adapter.svd_method,
        niter=adapter.niter,
        oversample=adapter.oversample,
        **OmegaConf.to_container(adapter.options, resolve=True),
    )
    head: nn.Module = model.head
    head.requires_grad_(bool(adapter.train_head))
    return model, tokenizer


def encode(tokenizer, examples: TextExamples, max_length: int) -> tuple[Tokenized, torch.Tensor]:
    return tokenize(tokenizer, list(examples.texts), max_length), torch.tensor(examples.labels, dtype=torch.long)


@lru_cache(maxsize=1)
def torch_threads(threads: int) -> int:
    """Set torch's intra-op threads once per process (simulated clients share the machine's cores)."""
    torch.set_num_threads(max(1, threads))
    return threads

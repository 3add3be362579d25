"""What a client process keeps between messages, and what a client node keeps between rounds.

Flower rebuilds the ClientApp for every message, and a simulation worker runs many virtual clients one
after another. So the expensive parts — the base model with its adapter structure, the tokenized data —
are cached per *process* and shared by every client it runs (memory does not grow with the number of
clients); everything that belongs to one client (its privacy history, the residual init factors) lives in
that node's ``context.state`` and, for the ledger, on disk so it survives restarts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from omegaconf import DictConfig, OmegaConf

from fedspec.builders import build_model, build_task, client_partitions, encode, torch_threads
from fedspec.data import load_examples
from fedspec.models import Tokenized
from fedspec.privacy import PrivacyLedger
from fedspec.privacy.planning import client_noise_multiplier, schedule_steps
from fedspec.rundir import run_paths
from fedspec.strategies import get_rule

LEDGER_STATE_KEY = "privacy-ledger"
BASE_INIT_STATE_KEY = "base-init"
PLAN_STATE_KEY = "privacy-plan"


@dataclass
class LocalData:
    inputs: Tokenized
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def client_id(context: Context) -> int:
    node_config = context.node_config
    if "partition-id" not in node_config:
        raise ValueError("this SuperNode has no partition-id; start it with --node-config 'partition-id=<i> ...'")
    return int(node_config["partition-id"])


def _key(cfg: DictConfig) -> str:
    """A hashable fingerprint of the parts of the config the cached objects depend on."""
    return json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True)


@lru_cache(maxsize=2)
def _cached_model(model_key: str):
    cfg = OmegaConf.create(json.loads(model_key))
    torch_threads(int(max(1, cfg.federation.client_cpus)))
    task = _cached_task(model_key)
    rule = get_rule(cfg.strategy.name)
    return build_model(cfg, task.num_classes, train_A=rule.clients_train_A, initialize=False, federated=True)


@lru_cache(maxsize=2)
def _cached_task(model_key: str):
    return build_task(OmegaConf.create(json.loads(model_key)))


@lru_cache(maxsize=64)
def _cached_partition(model_key: str, client: int, data_path: str | None) -> LocalData:
    cfg = OmegaConf.create(json.loads(model_key))
    _, tokenizer = _cached_model(model_key)
    task = _cached_task(model_key)
    if data_path:  # a real client with its own file: all of it is its data, labelled as the server's task
        examples = load_examples(
            data_path,
            text_field=cfg.data.text_field,
            label_field=cfg.data.label_field,
            format=cfg.data.format,
            label_names=task.train.label_names,
        )
    else:
        parts = client_partitions(cfg, task.train.labels)
        if client >= len(parts):
            raise ValueError(f"partition-id={client} but the data is split into federation.clients={len(parts)} parts")
        examples = task.train.subset(parts[client])
    inputs, labels = encode(tokenizer, examples, cfg.model.max_length)
    return LocalData(inputs, labels)


def model_and_data(cfg: DictConfig, context: Context):
    """(model, local data) for this node; the model object is shared with other clients of this process."""
    key = _key(cfg)
    model, _ = _cached_model(key)
    data = _cached_partition(key, client_id(context), context.node_config.get("data-path"))
    return model, data


# --- node state: residual init factors and the privacy ledger ------------------------------------------------


def remember_base_init(context: Context, record: ArrayRecord | None) -> dict[str, torch.Tensor]:
    """Keep the init factors the server sends on first contact; later messages omit them."""
    if record is not None:
        context.state[BASE_INIT_STATE_KEY] = record
    stored = context.state.array_records.get(BASE_INIT_STATE_KEY)
    return stored.to_torch_state_dict() if stored is not None else {}


def ledger_path(cfg: DictConfig, context: Context) -> Path:
    """Where this client keeps its ledger on disk: the node's ``state-dir`` (real clients) or, in a
    simulation, the run folder's ``clients/``."""
    state_dir = context.node_config.get("state-dir")
    base = Path(str(state_dir)) / str(cfg.run.name) if state_dir else run_paths(cfg).clients
    return base / f"client-{client_id(context)}" / "ledger.json"


def load_ledger(cfg: DictConfig, context: Context) -> PrivacyLedger:
    record = context.state.config_records.get(LEDGER_STATE_KEY)
    if record is not None:
        return PrivacyLedger.from_json(str(record["json"]))
    path = ledger_path(cfg, context)
    if path.is_file():  # the process restarted, or the run resumed: the disk copy is authoritative
        return PrivacyLedger.load(path)
    return PrivacyLedger(client_id=str(client_id(context)), delta=cfg.privacy.delta, accountant=cfg.privacy.accountant)


def store_ledger(cfg: DictConfig, context: Context, ledger: PrivacyLedger) -> None:
    context.state[LEDGER_STATE_KEY] = ConfigRecord({"json": ledger.to_json()})
    path = ledger_path(cfg, context)
    path.parent.mkdir(parents=True, exist_ok=True)
    ledger.save(path)


def noise_multiplier(cfg: DictConfig, context: Context, num_examples: int) -> float:
    """This client's σ for the whole run, planned once per node (planning runs the accountant many times)."""
    privacy = cfg.privacy
    settings = json.dumps([privacy.target_epsilon, privacy.noise_multiplier, privacy.delta, privacy.accountant,
                           num_examples, cfg.train.batch_size, schedule_steps(cfg)])
    record = context.state.config_records.get(PLAN_STATE_KEY)
    if record is not None and record["settings"] == settings:
        return float(record["noise-multiplier"])
    sigma = client_noise_multiplier(cfg, num_examples)
    context.state[PLAN_STATE_KEY] = ConfigRecord({"settings": settings, "noise-multiplier": sigma})
    return sigma

"""What a client process keeps between messages, and what a client node keeps between rounds.

Flower rebuilds the ClientApp for every message, and a simulation worker runs many virtual clients one
after another. So the expensive parts — the base model with its adapter structure, the tokenized data —
are cached per *process* and shared by every client it runs (memory does not grow with the number of
clients); everything that belongs to one client (its privacy history, the residual init factors) lives in
that node's ``context.state`` and, for the ledger, on disk so it survives restarts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from omegaconf import DictConfig

from fedspec.builders import (
    ModelSettings,
    build_backbone,
    build_model,
    build_task,
    client_partitions,
    encode,
    is_causal_lm,
    torch_threads,
)
from fedspec.config import DEVICE_PATTERN, config_from_json, config_to_json
from fedspec.data import load_examples
from fedspec.data.instructions import cast_classification, load_conversations
from fedspec.devices import resolve_device
from fedspec.errors import ConfigError, FedspecError
from fedspec.models import Tokenized, load_tokenizer
from fedspec.privacy import PrivacyLedger
from fedspec.privacy.audit import run_canaries, with_canaries
from fedspec.privacy.planning import PlanSettings, client_noise_multiplier
from fedspec.rundir import run_paths
from fedspec.strategies import get_rule

LEDGER_STATE_KEY = "privacy-ledger"
BASE_INIT_STATE_KEY = "base-init"
PLAN_STATE_KEY = "privacy-plan"
LABELS_STATE_KEY = "label-names"


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
    """A hashable fingerprint of the parts of the config the cached objects depend on. The cached builders parse it
    back without file checks: on a deployed node data.path names a file on the server's machine."""
    return config_to_json(cfg)


@lru_cache(maxsize=2)
def _cached_model(model_key: str, num_classes: int, rank_pattern: str | None = None):
    """The adapted model (factors zero, loaded from each message). ``rank_pattern`` (JSON): per-layer ranks
    (EVA), read off the global state the server sends, since they are decided by the server in round 0."""
    cfg = config_from_json(model_key, check_files=False)
    torch_threads(int(max(1, cfg.federation.client_cpus)))
    rule = get_rule(cfg.strategy.name)
    return build_model(ModelSettings.of(cfg), num_classes, train_A=rule.clients_train_A, initialize=False,
                       rank_pattern=json.loads(rank_pattern) if rank_pattern else None, federated=True)


@lru_cache(maxsize=1)
def _cached_base_model(model_key: str, num_classes: int):
    """The un-adapted backbone + head, for round 0's calibration statistics (same seed, same head as the
    server's)."""
    cfg = config_from_json(model_key, check_files=False)
    torch_threads(int(max(1, cfg.federation.client_cpus)))
    model, _ = build_backbone(ModelSettings.of(cfg), num_classes)
    return model


@lru_cache(maxsize=2)
def _cached_tokenizer(model_key: str):
    model_cfg = config_from_json(model_key, check_files=False).model
    return load_tokenizer(model_cfg.name, model_cfg.path)


@lru_cache(maxsize=2)
def _cached_task(model_key: str):
    cfg = config_from_json(model_key, check_files=False)
    return build_task(cfg.data, cfg.run.seed)


@lru_cache(maxsize=64)
def _cached_partition(model_key: str, client: int) -> LocalData:
    """A simulated client's share of the task's training records."""
    cfg = config_from_json(model_key, check_files=False)
    task = _cached_task(model_key)
    tokenizer = _cached_tokenizer(model_key)
    parts = client_partitions(task.train.labels, cfg.data, clients=cfg.federation.clients, seed=cfg.run.seed)
    if client >= len(parts):
        raise ValueError(f"partition-id={client} but the data is split into federation.clients={len(parts)} parts")
    examples = task.train.subset(parts[client])
    if cfg.audit.canaries:  # `fedspec audit`: this client's included canaries join its records
        texts, assignment = run_canaries(cfg.audit.canaries, cfg.federation.clients, cfg.audit.seed,
                                         tokenizer.get_vocab(), [*task.train.texts, *task.eval.texts], task.num_classes)
        examples = with_canaries(examples, texts, assignment, client)
    inputs, labels = encode(tokenizer, examples, cfg.model.max_length)
    return LocalData(inputs, labels)


@lru_cache(maxsize=8)
def _cached_own_data(model_key: str, data_path: str, label_names: tuple[str, ...]) -> LocalData:
    """A real client's own file, all of it, labelled with the server task's class names. The node never
    reads the task's data.path / data.eval_path: those are files on the server's machine."""
    cfg = config_from_json(model_key, check_files=False)
    if is_causal_lm(cfg.data) and not cfg.data.get("prompt"):  # an instruction file: its records need no labels
        examples = load_conversations(data_path, path_key="data-path")
    else:
        examples = load_examples(
            data_path,
            text_field=cfg.data.text_field,
            label_field=cfg.data.label_field,
            format=cfg.data.format,
            has_header=cfg.data.has_header,
            label_names=list(label_names),
            # a bare class id is a position in the class names only where data.label_names set their order: names
            # sorted from the server's training file say nothing about which id is which class
            allow_ids=cfg.data.label_names is not None,
            path_key="data-path",  # a node-config key, not a config key
        )
        if is_causal_lm(cfg.data):  # classification records answered with label words, as on the server
            examples = cast_classification(examples, cfg.data.prompt, cfg.data.label_words)
    inputs, labels = encode(_cached_tokenizer(model_key), examples, cfg.model.max_length)
    return LocalData(inputs, labels)


def local_data(cfg: DictConfig, context: Context) -> LocalData:
    """This node's tokenized records (no model is built for them): its own file (``data-path``) or, in a
    simulation, its partition of the task."""
    key = _key(cfg)
    data_path = context.node_config.get("data-path")
    if data_path:
        return _cached_own_data(key, str(Path(str(data_path)).expanduser()), label_names(context))
    # The task is split into federation.clients shares, as in `fedspec simulate`. A node that names another number
    # of shares (Flower's usual num-partitions, `fedspec node --num-partitions`) expects a split that never happens:
    # refused, rather than training silently on a share of another split.
    shares = context.node_config.get("num-partitions")
    if shares is not None and int(shares) != cfg.federation.clients:
        raise ConfigError(f"this node's num-partitions={shares}, but the run splits the task's data into "
                          f"federation.clients={cfg.federation.clients} shares; start the node with "
                          f"--num-partitions {cfg.federation.clients} (or none), or give it its own data-path")
    return _cached_partition(key, client_id(context))


def _num_classes(cfg: DictConfig, context: Context) -> int:
    if context.node_config.get("data-path"):
        return len(label_names(context))
    return _cached_task(_key(cfg)).num_classes


def model_and_data(cfg: DictConfig, context: Context, rank_pattern: dict[str, int] | None = None):
    """(model, local data) for this node, the model on its device (moved once: it is shared with the other clients
    of this process); the data stays on the CPU, batches move as they are used."""
    pattern = json.dumps(rank_pattern, sort_keys=True) if rank_pattern else None
    model, _ = _cached_model(_key(cfg), _num_classes(cfg, context), pattern)
    return model.to(node_device(cfg, context)), local_data(cfg, context)


def node_device(cfg: DictConfig, context: Context) -> torch.device:
    """The node's own ``device`` (node config: its operator knows its hardware), else the run's ``train.device``."""
    setting = str(context.node_config.get("device") or cfg.train.device)
    if not DEVICE_PATTERN.fullmatch(setting):
        raise FedspecError(f"node config device={setting!r} is not a device; use auto, cpu, cuda or cuda:N")
    return resolve_device(setting)


def base_model_and_data(cfg: DictConfig, context: Context):
    """(un-adapted model, local data): what round 0's statistics are computed on."""
    return _cached_base_model(_key(cfg), _num_classes(cfg, context)), local_data(cfg, context)


# --- node state: residual init factors and the privacy ledger ------------------------------------------------


def remember_label_names(context: Context, names: list[str] | None) -> None:
    """Keep the task's class names the server sends with its first query (a node with its own data file
    labels it with them)."""
    if names:
        context.state[LABELS_STATE_KEY] = ConfigRecord({"names": list(names)})


def label_names(context: Context) -> tuple[str, ...]:
    record = context.state.config_records.get(LABELS_STATE_KEY)
    if record is None:
        raise FedspecError(
            f"client {client_id(context)}: this node has a data-path but never received the task's label names "
            "from the server (its state was lost); restart the run with run.resume=true"
        )
    return tuple(str(n) for n in record["names"])


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
    base = Path(str(state_dir)).expanduser() / str(cfg.run.name) if state_dir else run_paths(cfg).clients
    return base / f"client-{client_id(context)}" / "ledger.json"


def load_ledger(cfg: DictConfig, context: Context) -> PrivacyLedger:
    """The client's ledger: the longer of the node-state and disk copies (a ledger only grows). The disk copy can be
    the newer one: a process restarted, a run resumed, or a retried message brought back the node state as it was
    before a round whose ledger was already written; an older copy saved over it would forget that round."""
    copies = []
    path = ledger_path(cfg, context)
    if path.is_file():
        copies.append(PrivacyLedger.load(path))
    record = context.state.config_records.get(LEDGER_STATE_KEY)
    if record is not None:
        copies.append(PrivacyLedger.from_json(str(record["json"])))
    expected = {"client": str(client_id(context)), "delta": cfg.privacy.delta, "accountant": cfg.privacy.accountant}
    for ledger in copies:  # one history is one guarantee: another δ or accountant cannot be composed into it
        found = {"client": ledger.client_id, "delta": ledger.delta, "accountant": ledger.accountant}
        if found != expected:
            raise ConfigError(f"{path} holds the privacy ledger of an earlier run with {found}, but this run has "
                              f"{expected}; give this run another run.name, or move the old ledger away")
    if copies:
        return max(copies, key=lambda ledger: len(ledger.entries))  # the first, the disk's, on a tie
    return PrivacyLedger(client_id=expected["client"], delta=cfg.privacy.delta, accountant=cfg.privacy.accountant)


def store_ledger(cfg: DictConfig, context: Context, ledger: PrivacyLedger) -> None:
    context.state[LEDGER_STATE_KEY] = ConfigRecord({"json": ledger.to_json()})
    path = ledger_path(cfg, context)
    path.parent.mkdir(parents=True, exist_ok=True)
    ledger.save(path)


def noise_multiplier(plan: PlanSettings, context: Context, num_examples: int) -> float:
    """This client's σ for the whole run, planned once per node (planning runs the accountant many times)."""
    settings = json.dumps([asdict(plan), num_examples])
    record = context.state.config_records.get(PLAN_STATE_KEY)
    if record is not None and record["settings"] == settings:
        return float(record["noise-multiplier"])
    sigma = client_noise_multiplier(plan, num_examples)
    context.state[PLAN_STATE_KEY] = ConfigRecord({"settings": settings, "noise-multiplier": sigma})
    return sigma

"""Small builders shared by `fedspec train`, the server and every client, so all three see the same model,
adapter and data for the same config.

Each builder takes only what it reads: a config section (``data``, ``model``) with the run seed, or one of the
frozen settings below, each built from the app config once with ``.of(cfg)``."""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .adapters import (
    Calibration,
    StatisticsPrivacy,
    adapt,
    collect_calibration,
    export_peft,
    get_method,
    peft_exportable,
)
from .adapters.targets import default_targets, match_targets
from .data import TextExamples, load_task, partition
from .data.instructions import Conversations
from .errors import ConfigError, DataError
from .models import Tokenized, build_classifier, load_tokenizer, tokenize

log = logging.getLogger("fedspec")


# --- data ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    train: TextExamples | Conversations
    eval: TextExamples | Conversations

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


def build_task(data: DictConfig, seed: int) -> Task:
    """The training and held-out records of the ``data`` section; the run seed drives generation and any
    train/eval carving."""
    train, evaluation = load_task(OmegaConf.create({**OmegaConf.to_container(data, resolve=True), "seed": seed}))
    return Task(train, evaluation)


def client_partitions(labels: list[int], data: DictConfig, *, clients: int, seed: int) -> list[list[int]]:
    """The indices of each client's records: a seeded IID or Dirichlet label-skew split (``data.partition``)."""
    if data.partition == "dirichlet" and len(set(labels)) == 1:
        # One class (instruction data): a Dirichlet draw over it skews only the clients' sizes, and with them
        # their sampling rates and noise, which is not the label skew the setting asks for.
        raise ConfigError(
            "data.partition=dirichlet splits by label, but every record has the same one (instruction data has no "
            "classes): set data.partition=iid"
        )
    try:
        return partition(labels, clients, scheme=data.partition, alpha=data.alpha, seed=seed,
                         min_size=data.min_client_examples)
    except DataError as error:
        raise ConfigError(
            f"cannot split the data over the clients: {error} (settings: federation.clients={clients}, "
            f"data.min_client_examples={data.min_client_examples}, data.partition={data.partition}, "
            f"data.alpha={data.alpha})"
        ) from None


def is_causal_lm(data: DictConfig) -> bool:
    return data.get("task", "classification") == "causal_lm"


def encode(tokenizer, examples: TextExamples | Conversations, max_length: int) -> tuple[Tokenized, torch.Tensor]:
    """Token ids and labels: a class per record, or (causal LM) the response tokens per position. A conversation
    longer than ``max_length`` tokens is left out, and the count logged."""
    if isinstance(examples, Conversations):
        from .prompts import encode_conversations

        encoded = encode_conversations(tokenizer, examples, max_length)
        if encoded.skipped:
            log.warning("left out %d of %d records longer than model.max_length=%d tokens (raise model.max_length "
                        "to keep them)", encoded.skipped, len(examples), max_length)
        return encoded.inputs, encoded.labels
    return tokenize(tokenizer, list(examples.texts), max_length), torch.tensor(examples.labels, dtype=torch.long)


# --- model and adapter -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterSettings:
    """The ``adapter`` section, as :func:`fedspec.adapters.adapt` and the calibration read it."""

    method: str
    rank: int
    targets: tuple[str, ...] | None  # None: the backbone's default targets
    alpha: float | None
    dropout: float
    train_head: bool
    calibration_examples: int
    initializer: dict[str, Any]  # the SVD engine's settings and the method's own options

    @classmethod
    def of(cls, adapter: DictConfig) -> AdapterSettings:
        options = OmegaConf.to_container(adapter.options, resolve=True) if adapter.options else {}
        return cls(
            method=adapter.method,
            rank=int(adapter.rank),
            targets=tuple(adapter.targets) if adapter.targets else None,
            alpha=adapter.alpha,
            dropout=float(adapter.dropout),
            train_head=bool(adapter.train_head),
            calibration_examples=int(adapter.calibration_examples),
            initializer={"svd_method": adapter.svd_method, "niter": adapter.niter, "oversample": adapter.oversample,
                         "pass_precision": adapter.svd_pass_precision, **options},
        )

    @property
    def calibration_kinds(self) -> tuple[str, ...]:
        """The statistics the method initializes from; empty for methods that need only weights."""
        return get_method(self.method).calibration


@dataclass(frozen=True)
class ModelSettings:
    """Everything that decides the built model: the ``model`` section (backbone, tokenizer, length, dtype), the
    task kind, the adapter and the run seed (the head's and the adapter's initialization)."""

    model: DictConfig
    adapter: AdapterSettings
    causal_lm: bool
    seed: int

    @classmethod
    def of(cls, cfg: DictConfig) -> ModelSettings:
        return cls(cfg.model, AdapterSettings.of(cfg.adapter), is_causal_lm(cfg.data), int(cfg.run.seed))


def build_model(
    settings: ModelSettings,
    num_classes: int,
    *,
    train_A: bool,
    initialize: bool = True,
    calibration: Calibration | None = None,
    rank_pattern: dict[str, int] | None = None,
    federated: bool = False,
):
    """The pretrained backbone + head with the configured adapter; returns (model, tokenizer).

    ``initialize=False`` leaves the adapter factors at zero and the base untouched, for a model whose adapter
    state (and residual init factors) will be loaded from elsewhere — a client, or a resumed server.
    ``calibration`` feeds the data-driven initializers (see :func:`calibrate`); ``rank_pattern`` fixes per-layer
    ranks (EVA's, read back from a global state). ``federated=True`` applies the method's federated trainable mask
    (the server and every client use it).
    """
    model, tokenizer = build_backbone(settings, num_classes)
    apply_adapter(settings, model, train_A=train_A, initialize=initialize, calibration=calibration,
                  rank_pattern=rank_pattern, federated=federated)
    return model, tokenizer


def build_backbone(settings: ModelSettings, num_classes: int):
    """The un-adapted model and its tokenizer: a causal LM for ``data.task=causal_lm`` (``num_classes`` unused),
    else the backbone + a classification head initialized from the run seed (server and clients agree)."""
    model_cfg = settings.model
    if not settings.causal_lm:
        return build_classifier(model_cfg, num_classes, seed=settings.seed)
    from .causal_lm import load_causal_lm

    tokenizer = load_tokenizer(model_cfg.name, model_cfg.get("path"))
    model = load_causal_lm(model_cfg.name, model_cfg.get("path"), vocab_size=len(tokenizer), seed=settings.seed,
                           dtype=model_cfg.get("dtype", "float32"))
    return model, tokenizer


def apply_adapter(
    settings: ModelSettings,
    model: nn.Module,
    *,
    train_A: bool,
    initialize: bool = True,
    calibration: Calibration | None = None,
    rank_pattern: dict[str, int] | None = None,
    federated: bool = False,
) -> nn.Module:
    """Put the configured adapter on a model from :func:`build_backbone`, in place."""
    adapter = settings.adapter
    adapt(
        model,
        adapter.method,
        adapter.rank,
        list(adapter.targets) if adapter.targets else None,
        alpha=adapter.alpha,
        dropout=adapter.dropout,
        train_A=train_A,
        initialize=initialize,
        seed=settings.seed,
        calibration=calibration,
        rank_pattern=rank_pattern,
        federated=federated,
        **adapter.initializer,
    )
    head: nn.Module | None = getattr(model, "head", None)  # a causal LM's embeddings and LM head stay frozen
    if head is not None:
        head.requires_grad_(adapter.train_head)
    return model


@lru_cache(maxsize=1)
def torch_threads(threads: int) -> int:
    """Set torch's intra-op threads once per process (simulated clients share the machine's cores)."""
    torch.set_num_threads(max(1, threads))
    return threads


# --- calibration for the data-driven initializers (CorDA, EVA, LoRA-GA, FWSVD) -------------------------------


@dataclass(frozen=True)
class InitStatistics:
    """A data-driven initializer's round-0 statistic and, with ``privacy.private_init_stats`` (and DP on), its
    Gaussian mechanism."""

    method: str
    kinds: tuple[str, ...]  # empty: the method initializes from weights only
    examples_per_party: int  # adapter.calibration_examples
    private: bool
    noise_multiplier: float | None  # None unless private
    max_norm: float | None  # the root of the sum of squares of the kinds' clipping norms; None unless private

    @classmethod
    def of(cls, cfg: DictConfig) -> InitStatistics:
        adapter, privacy = AdapterSettings.of(cfg.adapter), cfg.privacy
        kinds = adapter.calibration_kinds
        private = bool(privacy.enabled and privacy.private_init_stats)
        return cls(
            method=adapter.method,
            kinds=kinds,
            examples_per_party=adapter.calibration_examples,
            private=private,
            noise_multiplier=float(privacy.init_noise_multiplier) if private else None,
            max_norm=math.sqrt(sum(float(privacy.init_max_norm[kind]) ** 2 for kind in kinds)) if private else None,
        )

    def mechanism(self, seed: int | None = None) -> StatisticsPrivacy | None:
        """The Gaussian mechanism on the statistic (None when it is not privatized); ``seed=None``: fresh noise."""
        if not self.private:
            return None
        generator = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
        return StatisticsPrivacy.subset_of(self.noise_multiplier, self.max_norm, generator)

    def report(self, calibration: Calibration | None) -> dict:
        """What the privacy report says about the statistic (empty for methods without one)."""
        if not self.kinds:
            return {}
        section = {
            "method": self.method,
            "statistics": list(self.kinds),
            "examples_per_party": self.examples_per_party,
            "privatized": self.private,
            "noise_multiplier": self.noise_multiplier,
            "max_norm": self.max_norm,
            "accounted_as": "ledger round 0: (noise_multiplier, sample_rate=1, steps=1)" if self.private else None,
        }
        if calibration is not None:
            section["examples_total"] = calibration.count
        return {"init_statistics": section}


def calibration_layers(adapter: AdapterSettings, model: nn.Module) -> list[str]:
    """The layers of the (un-adapted) model whose statistics the method needs: the adapter's targets."""
    return match_targets(model, list(adapter.targets or default_targets(model)))


def calibrate(
    adapter: AdapterSettings,
    model: nn.Module,
    inputs: Tokenized,
    labels: torch.Tensor,
    *,
    privacy: StatisticsPrivacy | None = None,
    seed: int = 0,
) -> Calibration:
    """The method's statistics over up to ``adapter.calibration_examples`` of these records, on the (un-adapted)
    model: those whose seeded hash of their content is smallest (:func:`calibration_subset`)."""
    layers = calibration_layers(adapter, model)
    chosen = calibration_subset(inputs, labels, adapter.calibration_examples, seed)
    batch = (inputs.input_ids[chosen], inputs.attention_mask[chosen], labels[chosen])
    return collect_calibration(model, [batch], layers, adapter.calibration_kinds, privacy=privacy,
                               response_only=get_method(adapter.method).calibration_response_only)


def calibration_subset(inputs: Tokenized, labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Indices of the ``size`` records with the smallest seeded hash of their tokens and label (all of them when
    there are fewer).

    Chosen by content, not by position: adding or removing one record then changes the subset by at most one
    record in and one out, so a privatized sum moves by at most 2C (``StatisticsPrivacy.subset_of``). A seeded
    permutation of positions would not do: it depends on the number of records, and one record more reshuffles
    the whole subset."""
    key = seed.to_bytes(8, "little", signed=True)
    hashes = []
    for ids, mask, label in zip(inputs.input_ids, inputs.attention_mask, labels):
        content = ids[mask.bool()].numpy().tobytes() + label.numpy().tobytes()
        hashes.append(int.from_bytes(hashlib.blake2b(content, key=key, digest_size=8).digest(), "little"))
    order = sorted(range(len(hashes)), key=hashes.__getitem__)
    return torch.tensor(order[:size], dtype=torch.long)


# --- what a finished run writes and says -----------------------------------------------------------------------

def write_peft_export(model: nn.Module, directory, settings: ModelSettings) -> str | None:
    """Write the PEFT LoRA export of a finished run's adapter; returns why not when the method does not allow it."""
    reason = peft_exportable(model)
    if reason is None:
        from .causal_lm import resolve_causal_lm
        from .models import model_source

        model_cfg = settings.model
        if settings.causal_lm:  # the PEFT adapter of the plain AutoModelForCausalLM inside fedspec's CausalLM
            export_peft(model, directory, backbone="lm", base_model_name_or_path=resolve_causal_lm(
                model_cfg.name, model_cfg.get("path")))
        else:  # the folder AutoModel loaded the backbone from (a packaged model's too: model=smollm2 as a classifier)
            export_peft(model, directory, base_model_name_or_path=model_source(model_cfg.name, model_cfg.get("path")))
    return reason


def peft_export_line(reason: str | None) -> str:
    """The run summary's line about the PEFT export: what was written, or why the method has none."""
    if reason is not None:
        return f"- no `adapter-peft/`: {reason}"
    return ("- `adapter-peft/`: the adapter as a PEFT LoRA adapter of the original backbone "
            "(`PeftModel.from_pretrained`)")


def answer_score(data: DictConfig, model: nn.Module, tokenizer, held_out, batch_size: int) -> float | None:
    """A causal LM's greedy answers to the first ``data.generation_examples`` held-out records, scored by
    ``data.answer`` (:mod:`fedspec.generation`); None for classifiers or when the setting is 0."""
    count = int(data.get("generation_examples", 0))
    if not is_causal_lm(data) or count == 0:
        return None
    from .generation import answer_accuracy

    records = held_out.subset(range(min(count, len(held_out))))
    return answer_accuracy(model, tokenizer, records, kind=data.answer, max_new_tokens=data.max_new_tokens,
                           batch_size=batch_size)["answer_accuracy"]


def causal_lm_summary_lines(data: DictConfig, losses: tuple[float, float], answers: tuple[float | None, float | None],
                           unit: str, last: int) -> list[str]:
    """The run summary's lines on a causal LM: held-out response loss and perplexity, and the answer accuracy
    measured before and after training (empty for a classifier)."""
    if not is_causal_lm(data):
        return []
    first_loss, last_loss = losses
    lines = [f"- held-out response loss: {first_loss:.4f} → {last_loss:.4f} (perplexity "
             f"{math.exp(min(first_loss, 700)):.2f} → {math.exp(min(last_loss, 700)):.2f}; {unit} 0 → {last})"]
    shown = [f"{value:.4f} ({unit} {at})" for value, at in zip(answers, (0, last)) if value is not None]
    if shown:
        lines.append(f"- answer accuracy (`data.answer={data.answer}`, greedy, first {data.generation_examples} "
                     f"held-out records): {' → '.join(shown)}")
    return lines

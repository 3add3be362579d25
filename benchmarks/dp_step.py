"""(c) One DP-SGD step against one non-private step of the same model, batch and sequence length, and
against HF PEFT LoRA + Opacus with the same settings.

Model: the default MiniLM with a 4-class head, rank-8 adapters on query/value (the config's targets), batch
32 of 128 tokens (random ids, no padding, so every variant sees the same work). Steps use a fixed batch
(no Poisson sampling) so that only the per-step cost is compared; clipping norm 1, σ = 1, Adam.

- fedspec, FedSVD client mode: PiSSA factors, A frozen, B and the head train (what every client runs);
- fedspec, A and B train: the LoRA-like setting, like for like with PEFT;
- PEFT LoRA (r = 8, query/value, head trainable) made private by the same Opacus call
  (`make_private(wrap_model=False)`, hooks) on MiniLM as transformers loads it (`AutoModel.from_pretrained`:
  SDPA attention, `nn.Dropout`), with the same weights and head — i.e. what a PEFT user would run;
- the same PEFT + Opacus on fedspec's encoder (fast CPU dropout, `fedspec.dropout`), to show where the
  difference comes from: the DP machinery itself costs the same, the frozen model's dropout does not.
All variants run round-robin in one process; each row reports the median step time and the ratio of medians.
"""

from __future__ import annotations

import copy
import warnings

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fedspec
from fedspec.privacy.grad_samplers import check_exact_rules

from common import FASTER_MARGIN, Row, interleaved, median, seconds, yes_no

BATCH, LENGTH, RANK, CLASSES = 32, 128, 8, 4
TARGETS = ["query", "value"]


def _classifier():
    from fedspec.errors import ConfigError
    from fedspec.models import TextClassifier, load_encoder

    torch.manual_seed(0)
    try:
        encoder = load_encoder("minilm")
    except ConfigError:  # only MiniLM's config and tokenizer travel to a lent GPU machine (_minilm_without_weights)
        from fedspec.dropout import use_fast_dropout

        encoder = use_fast_dropout(_minilm_without_weights()).train()
    return TextClassifier(encoder, CLASSES)


def _minilm_without_weights() -> nn.Module:
    """MiniLM's architecture with random weights, for where its 90 MB of weights are absent (benchmarks/device/:
    more than a GPU run may carry). A step's time does not depend on the weights' values."""
    from transformers import AutoConfig, AutoModel

    from fedspec.models import packaged_minilm_path

    return AutoModel.from_config(AutoConfig.from_pretrained(str(packaged_minilm_path())), add_pooling_layer=False)


def _stock_classifier(like: nn.Module):
    """MiniLM as a PEFT user loads it (transformers' defaults), with the weights and head of ``like``."""
    from transformers import AutoModel

    from fedspec.models import TextClassifier, packaged_minilm_path

    # no pooler: TextClassifier pools the hidden states itself, and fedspec's encoder drops BERT's unused pooler too
    try:
        encoder = AutoModel.from_pretrained(str(packaged_minilm_path()), dtype=torch.float32, add_pooling_layer=False)
    except OSError:  # no weights here; `like`'s are loaded below anyway
        encoder = _minilm_without_weights()
    model = TextClassifier(encoder, CLASSES)
    model.load_state_dict(like.state_dict())
    return model.train()


def _batch(length: int = LENGTH, size: int = BATCH):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (size, length), generator=g)
    return ids, torch.ones(size, length, dtype=torch.long), torch.randint(0, CLASSES, (size,), generator=g)


def _fedspec_model(base, train_A: bool):
    model = copy.deepcopy(base)
    fedspec.adapt(model, "pissa", RANK, TARGETS, train_A=train_A)
    model.head.requires_grad_(True)
    return model.train()


def _peft_model(base):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS))
    model.base_model.model.head.requires_grad_(True)
    return model.train()


def _stepper(model, batch, *, private: bool, mode: str = "hooks"):
    """A closure running one optimizer step (forward, backward, clip and noise if private, update)."""
    ids, mask, y = batch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    loss_fn: nn.Module = nn.CrossEntropyLoss()
    if private:
        check_exact_rules(model)
        loader = DataLoader(TensorDataset(ids, mask, y), batch_size=len(ids))
        _, optimizer, *ghost, _ = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=False, wrap_model=False, grad_sample_mode=mode, criterion=loss_fn,
        )
        loss_fn = ghost[0] if ghost else loss_fn

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(ids, mask), y).backward()
        optimizer.step()

    return step


def run(quick: bool) -> list[Row]:
    repeats = 5 if quick else 9
    length = 64 if quick else LENGTH  # --quick: shorter sequences keep the whole table within 5 minutes
    base, batch = _classifier(), _batch(length)
    stock = _stock_classifier(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steps = {
            "plain": _stepper(_fedspec_model(base, False), batch, private=False),
            "dp": _stepper(_fedspec_model(base, False), batch, private=True),
            "dp-ghost": _stepper(_fedspec_model(base, False), batch, private=True, mode="ghost"),
            "dp-AB": _stepper(_fedspec_model(base, True), batch, private=True),
            "peft-dp": _stepper(_peft_model(stock), batch, private=True),
            "peft-dp-fast": _stepper(_peft_model(base), batch, private=True),
        }
        if not quick:
            steps["peft-plain"] = _stepper(_peft_model(stock), batch, private=False)
        times = interleaved(steps, repeats=repeats)
    t = {name: median(values) for name, values in times.items()}
    setting = f"MiniLM, r={RANK} on {'/'.join(TARGETS)} + head, batch {BATCH} × {length} tokens, σ=1, C=1, Adam; median of {repeats}"
    overhead = t["dp"] / t["plain"]
    return [
        Row("(c) DP-SGD step", f"{setting}; FedSVD client (B + head train), Opacus hooks",
            f"DP {seconds(t['dp'])}", f"non-DP {seconds(t['plain'])}", f"{overhead:.2f}× the non-DP step",
            "exact per-sample gradients (no functorch fallback)", "DP ≤ 1.3× non-DP", yes_no(overhead <= 1.3)),
        Row("(c) DP-SGD step", f"{setting}; A and B train (like PEFT LoRA)",
            f"DP {seconds(t['dp-AB'])}", f"PEFT LoRA + Opacus {seconds(t['peft-dp'])}",
            f"{t['peft-dp'] / t['dp-AB']:.2f}× faster",
            f"non-DP: fedspec {seconds(t['plain'])}" + (f", PEFT {seconds(t['peft-plain'])}" if "peft-plain" in t else ""),
            f"faster than PEFT + Opacus (by ≥ {FASTER_MARGIN - 1:.0%})", yes_no(t["peft-dp"] >= FASTER_MARGIN * t["dp-AB"])),
        Row("(c) DP-SGD step", f"{setting}; FedSVD client vs PEFT LoRA + Opacus",
            f"DP {seconds(t['dp'])}", f"PEFT LoRA + Opacus {seconds(t['peft-dp'])}",
            f"{t['peft-dp'] / t['dp']:.2f}× faster", "fedspec trains r·d_out per layer, PEFT 2·r·d",
            f"faster than PEFT + Opacus (by ≥ {FASTER_MARGIN - 1:.0%})", yes_no(t["peft-dp"] >= FASTER_MARGIN * t["dp"])),
        Row("(c) DP-SGD step", f"{setting}; A and B train vs PEFT LoRA + Opacus, both on fedspec's encoder (fast dropout)",
            f"DP {seconds(t['dp-AB'])}", f"PEFT LoRA + Opacus {seconds(t['peft-dp-fast'])}",
            f"{t['peft-dp-fast'] / t['dp-AB']:.2f}× faster",
            f"PEFT on transformers' own MiniLM: {seconds(t['peft-dp'])}; the gain is the frozen model's dropout",
            "—", "—"),
        Row("(c) DP-SGD step", f"{setting}; ghost clipping (privacy.grad_sample_mode=ghost) vs hooks",
            f"ghost {seconds(t['dp-ghost'])}", f"hooks {seconds(t['dp'])}", f"{t['dp-ghost'] / t['dp']:.2f}× the hooks step",
            "same clipped step (tested); two backward passes", "—", "—"),
    ]

"""(e) A causal LM's DP-SGD step: SmolLM2-135M-Instruct, the packaged default decoder, against its non-private
step and against HF PEFT LoRA + Opacus on the same model.

Rank-8 adapters on q_proj/v_proj (the default targets), batch 8 of 128 tokens (random ids, no padding), the last
16 tokens of each record its response (an instruction record: prompt, then answer), next-token loss averaged
per record (fedspec's ``ResponseLoss``), fixed batches (no Poisson sampling), clipping norm 1, σ = 1, SGD.
fedspec computes the LM head only where a response token is predicted; PEFT's model computes logits at every
position, as transformers' causal LMs do.

- fedspec, FedSVD client mode: PiSSA factors, A frozen, B trains (what every client runs);
- fedspec, A and B train: like for like with PEFT;
- PEFT LoRA (r = 8, q_proj/v_proj) on the same decoder weights made private by the same Opacus call (hooks).
All variants run round-robin in one process; medians and ratios of medians.
"""

from __future__ import annotations

import copy
import warnings

import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

import fedspec
from fedspec.causal_lm import CausalLM, ResponseLoss
from fedspec.privacy.grad_samplers import check_exact_rules

from common import FASTER_MARGIN, Row, interleaved, median, seconds, yes_no

BATCH, LENGTH, RANK, RESPONSE = 8, 128, 8, 16
TARGETS = ["q_proj", "v_proj"]


def _batch(vocab: int, length: int):
    from fedspec.causal_lm import IGNORE

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab, (BATCH, length), generator=g)
    labels = ids.clone()
    labels[:, : length - RESPONSE] = IGNORE  # the prompt is not trained
    return ids, torch.ones_like(ids), labels


def _fedspec_model(base: CausalLM, train_A: bool) -> CausalLM:
    model = copy.deepcopy(base)
    fedspec.adapt(model, "pissa", RANK, TARGETS, train_A=train_A)
    return model.train()


class _PeftLM(torch.nn.Module):
    """PEFT LoRA on the plain decoder, behind the same (input_ids, attention_mask) → logits call."""

    def __init__(self, base: CausalLM) -> None:
        from peft import LoraConfig, get_peft_model

        super().__init__()
        self.peft = get_peft_model(copy.deepcopy(base.lm), LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS))

    def forward(self, input_ids, attention_mask, labels=None):  # logits at every position, as transformers computes
        return self.peft(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _stepper(model, batch, *, private: bool):
    ids, mask, labels = batch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    loss_fn = ResponseLoss()
    if private:
        check_exact_rules(model)
        loader = DataLoader(TensorDataset(ids, mask, labels), batch_size=len(ids))
        _, optimizer, _ = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=False, wrap_model=False,
        )

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(ids, mask, labels), labels).backward()
        optimizer.step()

    return step


def run(quick: bool) -> list[Row]:
    from fedspec.causal_lm import load_causal_lm

    repeats = 3 if quick else 7
    length = 64 if quick else LENGTH
    try:
        base = load_causal_lm("smollm2")
    except Exception as error:  # the package is installed by the README's command; say so instead of failing
        return [Row("(e) causal-LM DP step", f"SmolLM2-135M not available ({error})", "—", "—", "—", "—", "—", "—")]
    batch = _batch(base.config.vocab_size, length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steps = {
            "plain": _stepper(_fedspec_model(base, False), batch, private=False),
            "dp": _stepper(_fedspec_model(base, False), batch, private=True),
            "dp-AB": _stepper(_fedspec_model(base, True), batch, private=True),
            "peft-dp": _stepper(_PeftLM(base).train(), batch, private=True),
        }
        times = interleaved(steps, repeats=repeats)
    t = {name: median(values) for name, values in times.items()}
    setting = (f"SmolLM2-135M-Instruct, r={RANK} on {'/'.join(TARGETS)}, batch {BATCH} × {length} tokens "
               f"({RESPONSE}-token responses), response loss, σ=1, C=1, SGD; median of {repeats}")
    overhead = t["dp"] / t["plain"]
    return [
        Row("(e) causal-LM DP step", f"{setting}; FedSVD client (B trains), Opacus hooks",
            f"DP {seconds(t['dp'])}", f"non-DP {seconds(t['plain'])}", f"{overhead:.2f}× the non-DP step",
            "exact per-sample gradients (tests/test_causal_lm.py)", "DP ≤ 1.3× non-DP", yes_no(overhead <= 1.3)),
        Row("(e) causal-LM DP step", f"{setting}; A and B train vs PEFT LoRA + Opacus",
            f"DP {seconds(t['dp-AB'])}", f"PEFT LoRA + Opacus {seconds(t['peft-dp'])}",
            f"{t['peft-dp'] / t['dp-AB']:.2f}× faster", f"FedSVD client: {seconds(t['dp'])}",
            f"faster than PEFT + Opacus (by ≥ {FASTER_MARGIN - 1:.0%})", yes_no(t["peft-dp"] >= FASTER_MARGIN * t["dp-AB"])),
    ]

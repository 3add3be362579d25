"""Export a low-rank additive adapter as a Hugging Face PEFT LoRA adapter for the ORIGINAL base model.

``export_peft(model, out_dir)`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's layout
(keys ``base_model.model.<module>.lora_A.weight``), which ``peft.PeftModel.from_pretrained(backbone, out_dir)``
loads on the plain pretrained backbone (``transformers.AutoModel``) with the same outputs. PEFT is not needed to
write it.

- Methods that keep W (LoRA, EVA): the factors as they are; EVA's per-layer ranks go to ``rank_pattern`` (and
  ``alpha_pattern``, so every layer keeps the scaling s = α/r).
- Residual methods (PiSSA, MiLoRA, OLoRA, CorDA, LoRA-GA, SoMA): the base holds W − s·B₀A₀, so relative to the
  original W the update is s·(B·A − B₀·A₀) = s·[B | −B₀]·[A ; A₀], a rank-2r LoRA with α doubled (the same
  scaling) — what PEFT's ``path_initial_model_for_weight_conversion`` does for PiSSA.
- Compression (FWSVD) replaces W and is no LoRA of it: refused with an AdapterError.

fedspec's ``TextClassifier`` wraps the backbone as ``model.encoder`` and adds a pooled linear ``head``; the head
(trainable, not part of any LoRA) is written beside as ``classifier_head.safetensors`` with ``fedspec_head.json``
(pooling mode). Apply it as ``head(pool(peft_model(input_ids=..., attention_mask=...).last_hidden_state))``, pool
being the attention-mask-weighted mean ("mean") or the last real token ("last").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import AdapterError
from .inject import adapter_config, adapter_layers
from .lowrank import LowRankLinear

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
HEAD_WEIGHTS = "classifier_head.safetensors"
HEAD_CONFIG = "fedspec_head.json"


def peft_exportable(model: nn.Module) -> str | None:
    """None when :func:`export_peft` can export this model's adapter, else the reason it cannot."""
    config = adapter_config(model)
    for name, layer in adapter_layers(model).items():
        if not isinstance(layer, LowRankLinear):
            return (f"adapter.method={config.method} replaces the weight of {name!r} ({type(layer).__name__}); "
                    "it is not a LoRA of the original base model")
    return None


def export_peft(
    model: nn.Module,
    out_dir: str | Path,
    *,
    backbone: str = "encoder",
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the adapter of ``model`` as a PEFT LoRA adapter of the submodule ``backbone`` ("" for the model
    itself) into ``out_dir``; returns ``out_dir``."""
    reason = peft_exportable(model)
    if reason is not None:
        raise AdapterError(f"cannot export a PEFT LoRA adapter: {reason}")
    config = adapter_config(model)
    prefix = f"{backbone}." if backbone else ""
    residual = config.base_policy == "residual"
    scaling = config.alpha / config.rank
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, layer in adapter_layers(model).items():
        if not name.startswith(prefix):
            raise AdapterError(f"layer {name!r} is outside the backbone {backbone!r}; PEFT loads adapters of it only")
        path = name[len(prefix):]
        A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
        if residual:  # s·(B·A − B₀·A₀) on the original weight
            A = torch.cat([A, layer.init_lora_A.detach()], dim=0)
            B = torch.cat([B, -layer.init_lora_B.detach()], dim=1)
        tensors[f"base_model.model.{path}.lora_A.weight"] = A.cpu().float().contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = B.cpu().float().contiguous()
        ranks[path] = A.shape[0]
    factor = 2 if residual else 1
    r, alpha = factor * config.rank, factor * config.alpha
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {path: rank for path, rank in ranks.items() if rank != r},
        # Per-layer α keeps every layer's scaling at s = α/r whatever its rank (EVA's adjust_scaling_factors).
        "alpha_pattern": {path: scaling * rank for path, rank in ranks.items() if rank != r},
        "lora_dropout": config.dropout,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    (out / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        save_file({k: v.detach().cpu().float().contiguous() for k, v in head.state_dict().items()},
                  str(out / HEAD_WEIGHTS))
        (out / HEAD_CONFIG).write_text(json.dumps({
            "pooling": getattr(model, "pooling", "mean"),
            "num_classes": head.out_features,
            "how": "logits = head(pool(backbone(input_ids, attention_mask).last_hidden_state)); pool: mask-weighted "
                   "mean of the tokens ('mean') or the last real token ('last')",
            "fedspec_method": config.method,
        }, indent=2) + "\n")
    return out

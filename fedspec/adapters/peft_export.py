"""Export a low-rank additive adapter as a Hugging Face PEFT LoRA adapter for the ORIGINAL base model.

``export_peft(model, out_dir)`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's layout
(keys ``base_model.model.<module>.lora_A.weight``), which ``peft.PeftModel.from_pretrained(backbone, out_dir)``
loads on the plain pretrained backbone (``transformers.AutoModel``) with the same outputs. PEFT is not needed to
write it.

Every layer says what it is relative to the original weight W (``AdapterLayer.lora_factors``: W′ − W = B·A, the
method's scaling folded into B, so PEFT's α/r is 1 in every layer):

- Methods that keep W (LoRA, EVA, AdaLoRA, SoRA, LoRA-XS): s·B·A, or s·(B·C)·A with the core folded in; EVA's
  per-layer ranks go to ``rank_pattern`` and ``alpha_pattern``.
- Residual methods (PiSSA, MiLoRA, OLoRA, CorDA, LoRA-GA, SoMA, SORSA, Effort, and KaSA's truncated base): the
  base holds W − R, so the update is s·B·A − R = [s·B | −B_R]·[A ; A_R], a rank-2r LoRA — what PEFT's
  ``path_initial_model_for_weight_conversion`` does for PiSSA. SVFit and LoLDU: L·(g − g₀)·R, rank r.
- No LoRA of W, refused with an AdapterError: compression (FWSVD replaces W), DoRA (row normalization), and the
  methods whose spectrum carries all of W (CLIP-SVD, SALT, SST: a full-rank update).

fedspec's ``TextClassifier`` wraps the backbone as ``model.encoder`` and adds a pooled linear ``head``; the head
(trainable, not part of any LoRA) is written beside as ``classifier_head.safetensors`` with ``fedspec_head.json``
(pooling mode). Apply it as ``head(pool(peft_model(input_ids=..., attention_mask=...).last_hidden_state))``, pool
being the attention-mask-weighted mean ("mean") or the last real token ("last").
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import AdapterError
from .inject import adapter_config, adapter_layers

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
HEAD_WEIGHTS = "classifier_head.safetensors"
HEAD_CONFIG = "fedspec_head.json"


def peft_exportable(model: nn.Module) -> str | None:
    """None when :func:`export_peft` can export this model's adapter, else the reason it cannot."""
    config = adapter_config(model)
    for name, layer in adapter_layers(model).items():
        if layer.lora_factors() is None:
            return (f"adapter.method={config.method} is no low-rank update of the original weights ({name!r} is a "
                    f"{type(layer).__name__} with base policy {layer.base_policy!r}); it is not a LoRA of the "
                    "original base model")
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
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, layer in adapter_layers(model).items():
        if not name.startswith(prefix):
            raise AdapterError(f"layer {name!r} is outside the backbone {backbone!r}; PEFT loads adapters of it only")
        path = name[len(prefix):]
        B, A = layer.lora_factors()  # the scaling is folded into B: every layer gets lora_alpha = its rank
        tensors[f"base_model.model.{path}.lora_A.weight"] = A.cpu().float().contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = B.cpu().float().contiguous()
        ranks[path] = A.shape[0]
    r = Counter(ranks.values()).most_common(1)[0][0]
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": r,
        "target_modules": sorted(ranks),
        "rank_pattern": {path: rank for path, rank in ranks.items() if rank != r},
        # α = rank in every layer: PEFT's scaling α/r is 1, the method's own scaling is already in B.
        "alpha_pattern": {path: rank for path, rank in ranks.items() if rank != r},
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

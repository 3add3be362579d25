"""Which layers of a model get adapters: name patterns, as PEFT's ``target_modules``."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from ..errors import AdapterError

# Attention query/value projections: the layers LoRA, PiSSA and FedSVD adapt by default.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "llama": ("q_proj", "v_proj"),
}


def pattern_matches(pattern: str, name: str) -> bool:
    """A pattern matches a module name if it equals a dotted suffix of it ("query" matches
    "encoder.layer.0.attention.self.query") or, failing that, is a regular expression matching the whole name."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def default_targets(model: nn.Module) -> tuple[str, ...]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for module in model.modules():
        model_type = model_type or getattr(getattr(module, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    raise AdapterError(
        f"no default adapter targets for model type {model_type!r}; "
        "set adapter.targets to a list of layer-name patterns, e.g. adapter.targets=[q_proj,v_proj]"
    )


def output_layers(model: nn.Module) -> set[int]:
    """ids of the modules a ``transformers`` model names as its output embeddings (a causal LM's ``lm_head``)."""
    found = set()
    for module in model.modules():
        get = getattr(module, "get_output_embeddings", None)
        head = get() if callable(get) else None
        if isinstance(head, nn.Module):
            found.add(id(head))
    return found


def match_targets(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the ``nn.Linear`` layers matched by any pattern; a pattern matching nothing is an error.

    A language model's output layer (``lm_head``) is never a target, as under PEFT's ``all-linear``: it often
    shares its weight with the input embeddings (an adapter's residual would rewrite them), and fedspec applies it
    to each response token separately, so DP-SGD would clip per token instead of per record. A pattern that
    matches other layers too (``.*``) leaves it out; one that matches only the output layer is an error. The same
    holds for a classifier's head (``head``), which trains in full instead.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    heads = output_layers(model)
    # A classifier's own head (fedspec's TextClassifier.head) trains in full or stays frozen (adapter.train_head):
    # an adapter there breaks its forward pass and is no layer of the backbone a PEFT export could address.
    head = getattr(model, "head", None)
    classifier_head = id(head) if isinstance(head, nn.Linear) else None
    modules = [(name, module) for name, module in model.named_modules() if type(module) is nn.Linear]
    linear_names = [name for name, module in modules if id(module) not in heads and id(module) != classifier_head]
    head_names = [name for name, module in modules if id(module) in heads]
    matched: list[str] = []
    for pattern in patterns:
        hits = [name for name in linear_names if pattern_matches(pattern, name)]
        if not hits and classifier_head is not None and pattern_matches(pattern, "head"):
            raise AdapterError(
                f"adapter.targets pattern {pattern!r} matches only the classification head, which takes no adapter: "
                "it trains in full (adapter.train_head=true) or stays frozen; target the backbone's layers"
            )
        if not hits and any(pattern_matches(pattern, name) for name in head_names):
            raise AdapterError(
                f"adapter.targets pattern {pattern!r} matches only the model's output layer "
                f"({', '.join(head_names)}), which stays frozen: it is applied to each response token separately, "
                "so DP-SGD would clip per token, not per record, and it is often tied to the input embeddings"
            )
        if not hits:
            examples = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linear_names})[:12])
            raise AdapterError(
                f"adapter.targets pattern {pattern!r} matches no nn.Linear layer of this model; "
                f"linear layer names end in: {examples}"
            )
        matched.extend(h for h in hits if h not in matched)
    return matched

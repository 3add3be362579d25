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


def match_targets(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the ``nn.Linear`` layers matched by any pattern; a pattern matching nothing is an error."""
    if isinstance(patterns, str):
        patterns = [patterns]
    linear_names = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    matched: list[str] = []
    for pattern in patterns:
        hits = [name for name in linear_names if pattern_matches(pattern, name)]
        if not hits:
            examples = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linear_names})[:12])
            raise AdapterError(
                f"adapter.targets pattern {pattern!r} matches no nn.Linear layer of this model; "
                f"linear layer names end in: {examples}"
            )
        matched.extend(h for h in hits if h not in matched)
    return matched

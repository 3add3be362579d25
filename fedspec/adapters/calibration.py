"""Calibration statistics: what the data-driven initializers (CorDA, EVA, LoRA-GA, FWSVD) need from data.

One API for all of them. :func:`collect_calibration` runs a few batches through the *base* model (before
:func:`fedspec.adapt`) with hooks on the layers that will be adapted and returns a :class:`Calibration`: for each
layer and statistic, the SUM over examples of a per-example contribution, plus the number of examples. Sums add:
the calibration of several clients' data is the sum of their calibrations (``a + b``), so a federated server
needs only a (securely aggregatable) sum, never a client's raw statistic on its own.

Statistics (``KINDS``), per adapted ``nn.Linear`` with weight W (out × in), for one example with real tokens
x_1..x_T at the layer's input and output gradients δ_1..δ_T of that example's loss:

- ``"inputs"``: ``xx`` = (1/T)·Σ_t x_t x_tᵀ (in × in) and ``x`` = (1/T)·Σ_t x_t (in). Each example weighs the
  same whatever its length (PEFT's CorDA also weighs each calibration sample the same; its EVA weighs tokens —
  equal when examples have equal length). CorDA uses the uncentered covariance, EVA the centered one.
- ``"gradients"``: ``grad`` = ∇_W ℓ = Σ_t δ_t x_tᵀ (out × in), the example's loss gradient (LoRA-GA).
- ``"fisher"``: ``fisher`` = row sums of (∇_W ℓ)², i.e. Σ_j (∇_W ℓ)_{ij}² (out): the empirical Fisher with equal
  importance within a row (FWSVD).

The loss is the classifier's cross-entropy on the example's label; padding tokens never enter ``inputs``. For a
causal LM, ``response_only`` (EVA's setting, as PEFT's ``use_label_mask``) keeps the prompt's tokens out of
``inputs`` too: T counts the response tokens.

Privatized release (:class:`StatisticsPrivacy`): each example's contribution to EVERY statistic of EVERY layer,
seen as one vector, is clipped to L2 norm ``max_norm`` = C, the clipped contributions are summed, and Gaussian
noise N(0, σ²Δ²) is added to every released coordinate (for the symmetric ``xx`` the upper triangle is noised and
mirrored, which is post-processing). Δ is the sensitivity: adding or removing one record moves the clipped sum by at
most C when every record is summed, and by at most 2C when the sum covers a fixed-size subset (one record in, one
out; ``StatisticsPrivacy.sensitivity``). Noise σ·Δ makes it the Gaussian mechanism whose Rényi DP is
ε(α) = α/(2σ²), exactly that of one DP-SGD step with sample rate q = 1. A privacy ledger records it as the entry
(σ, q = 1, steps = 1), which composes with the client's DP-SGD steps by the same accountant. The number of
examples a sum covers is not private: a client releases it only where it releases its number of records anyway
(weighting by examples in the clear; see ``client/statistics.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..causal_lm import IGNORE
from ..errors import AdapterError

KINDS: dict[str, tuple[str, ...]] = {
    "inputs": ("xx", "x"),
    "gradients": ("grad",),
    "fisher": ("fisher",),
}
COUNT_KEY = "__count__"
_SEP = "::"  # between a layer name and a statistic key in flat tensor dicts (layer names hold dots)
CALIBRATION_BATCH = 16  # examples per forward/backward pass while collecting; the sums do not depend on it


@dataclass(frozen=True)
class StatisticsPrivacy:
    """Gaussian mechanism on the calibration sums: per-example clipping to ``max_norm``, noise σ·max_norm."""

    noise_multiplier: float
    max_norm: float
    # Seeded noise is reproducible and therefore not private against anyone who knows the seed: tests only.
    generator: torch.Generator | None = None
    # How far one record more or less moves the clipped sum (L2): C when every record of the batches is summed;
    # 2C for a fixed-size subset of the records (one record in, one out): the noise is σ times this.
    sensitivity: float | None = None

    @classmethod
    def subset_of(cls, noise_multiplier: float, max_norm: float, generator: torch.Generator | None = None):
        """The mechanism on a fixed-size subset chosen by content (``fedspec.builders.calibration_subset``)."""
        return cls(noise_multiplier, max_norm, generator, sensitivity=2.0 * max_norm)

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * (self.sensitivity if self.sensitivity is not None else self.max_norm)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise AdapterError(f"privacy.init_noise_multiplier={self.noise_multiplier!r} must be a number > 0")
        if not (math.isfinite(self.max_norm) and self.max_norm > 0):
            raise AdapterError(f"privacy.init_max_norm={self.max_norm!r} must be a number > 0")


@dataclass
class Calibration:
    """Per-layer sums of per-example statistics over ``count`` examples (float64).

    ``noise_multiplier`` / ``max_norm`` are set when the sums were released privatized (see the module docstring).
    """

    sums: dict[str, dict[str, torch.Tensor]]
    count: int
    noise_multiplier: float | None = None
    max_norm: float | None = None
    kinds: tuple[str, ...] = field(default=())

    @property
    def layers(self) -> list[str]:
        return list(self.sums)

    @property
    def privatized(self) -> bool:
        return self.noise_multiplier is not None

    def mean(self, layer: str, key: str) -> torch.Tensor:
        """The per-example average of one statistic of one layer (sum / count)."""
        if layer not in self.sums:
            raise AdapterError(
                f"the calibration statistics hold no layer {layer!r}; collect them for the adapted layers"
            )
        if key not in self.sums[layer]:
            raise AdapterError(f"the calibration statistics of layer {layer!r} hold no {key!r} (kinds: {self.kinds})")
        if self.count <= 0:
            raise AdapterError("the calibration statistics cover no example")
        return self.sums[layer][key] / self.count

    def require(self, kinds: Sequence[str], layers: Sequence[str], method: str) -> None:
        """Fail with one line when a method's statistics are missing."""
        missing = [k for k in kinds if k not in self.kinds]
        if missing:
            raise AdapterError(
                f"adapter.method={method} needs calibration statistics of kind {missing[0]!r}, but these hold "
                f"{list(self.kinds)}; collect them with collect_calibration(..., kinds={list(kinds)})"
            )
        absent = [name for name in layers if name not in self.sums]
        if absent:
            raise AdapterError(
                f"adapter.method={method}: the calibration statistics hold no layer {absent[0]!r}; "
                "collect them for the same adapter.targets"
            )

    def __add__(self, other: Calibration) -> Calibration:
        if set(self.sums) != set(other.sums) or self.kinds != other.kinds:
            raise AdapterError("cannot add calibration statistics of different layers or kinds")
        if (self.noise_multiplier, self.max_norm) != (other.noise_multiplier, other.max_norm):
            raise AdapterError("cannot add calibration statistics released with different privacy settings")
        sums = {
            layer: {key: value + other.sums[layer][key] for key, value in stats.items()}
            for layer, stats in self.sums.items()
        }
        return Calibration(sums, self.count + other.count, self.noise_multiplier, self.max_norm, self.kinds)

    # --- flat form: for safetensors files and Flower ArrayRecords --------------------------------------------

    def to_tensors(self) -> dict[str, torch.Tensor]:
        flat = {f"{layer}{_SEP}{key}": value for layer, stats in self.sums.items() for key, value in stats.items()}
        flat[COUNT_KEY] = torch.tensor(self.count, dtype=torch.int64)
        return flat

    @classmethod
    def from_tensors(
        cls,
        flat: Mapping[str, torch.Tensor],
        *,
        kinds: Sequence[str],
        noise_multiplier: float | None = None,
        max_norm: float | None = None,
    ) -> Calibration:
        if COUNT_KEY not in flat:
            raise AdapterError("calibration tensors lack their example count")
        sums: dict[str, dict[str, torch.Tensor]] = {}
        for name, value in flat.items():
            if name == COUNT_KEY:
                continue
            layer, _, key = name.rpartition(_SEP)
            sums.setdefault(layer, {})[key] = value.to(torch.float64)
        return cls(sums, int(flat[COUNT_KEY]), noise_multiplier, max_norm, tuple(kinds))


def calibration_layout(model: nn.Module, layers: Sequence[str], kinds: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor of a :class:`Calibration` of these layers of the base model, in its
    flat form (:meth:`Calibration.to_tensors`): what a server expects of a client's round-0 reply."""
    shapes = {"xx": lambda w: (w.in_features, w.in_features), "x": lambda w: (w.in_features,),
              "grad": lambda w: (w.out_features, w.in_features), "fisher": lambda w: (w.out_features,)}
    layout = {f"{name}{_SEP}{key}": shapes[key](_linear(model, name))
              for name in layers for kind in kinds for key in KINDS[kind]}
    return {**layout, COUNT_KEY: ()}


def sum_calibrations(parts: Sequence[Calibration]) -> Calibration:
    if not parts:
        raise AdapterError("no calibration statistics to sum: no client answered round 0")
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def _linear(model: nn.Module, name: str) -> nn.Linear:
    module = model.get_submodule(name)
    if type(module) is not nn.Linear:
        raise AdapterError(
            f"calibration needs the base model: layer {name!r} is a {type(module).__name__}, not an nn.Linear "
            "(collect the statistics before fedspec.adapt)"
        )
    return module


class _Capture:
    """Forward hooks keep each layer's input; tensor hooks on its output keep the output gradient."""

    def __init__(self, layers: Mapping[str, nn.Linear], backward: bool) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.handles = []
        for name, layer in layers.items():
            self.handles.append(layer.register_forward_hook(self._hook(name, backward)))

    def _hook(self, name: str, backward: bool):
        def hook(module, args, output):
            self.inputs[name] = args[0].detach()
            if backward:
                output.register_hook(lambda grad: self.grads.__setitem__(name, grad.detach()))

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _as_tokens(t: torch.Tensor, name: str, batch: int) -> torch.Tensor:
    if t.ndim != 3 or t.shape[0] != batch:
        raise AdapterError(
            f"calibration of layer {name!r} needs (batch, tokens, features) inputs, got shape {tuple(t.shape)}"
        )
    return t.to(torch.float64)


def _symmetric(matrix: torch.Tensor) -> torch.Tensor:
    return (matrix + matrix.mT) / 2


def _per_example(
    kinds: Sequence[str], X: torch.Tensor, mask: torch.Tensor, D: torch.Tensor | None
) -> dict[str, tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]:
    """For one layer: {key: (per-example squared norms (b,), weighted-sum function w ↦ Σ_i w_i c_i)}.

    Contributions are never materialized per example (b × out × in); norms come from token Gram matrices.
    """
    out: dict[str, tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]] = {}
    gram_x = X @ X.mT  # (b, T, T)
    if "inputs" in kinds:
        tokens = mask.sum(1).clamp(min=1.0)  # (b,)
        Xm = X * mask.unsqueeze(-1)
        gram_m = gram_x * mask.unsqueeze(-1) * mask.unsqueeze(-2)
        xx_sq = (gram_m**2).sum((1, 2)) / tokens**2  # ‖XᵀX/T‖_F² = ‖XXᵀ‖_F²/T²
        mean_x = Xm.sum(1) / tokens.unsqueeze(-1)
        out["xx"] = (xx_sq, lambda w: _symmetric(torch.einsum("bti,btj->ij", Xm * (w / tokens)[:, None, None], Xm)))
        out["x"] = ((mean_x**2).sum(1), lambda w: (w.unsqueeze(-1) * mean_x).sum(0))
    if D is not None:
        gram_d = D @ D.mT
        if "gradients" in kinds:
            grad_sq = (gram_d * gram_x).sum((1, 2))  # ‖Σ_t δ_t x_tᵀ‖_F²
            out["grad"] = (grad_sq, lambda w: torch.einsum("bto,bti->oi", D * w[:, None, None], X))
        if "fisher" in kinds:
            rows = torch.einsum("bto,bso,bts->bo", D, D, gram_x)  # Σ_j (∇_W ℓ)_{oj}² per example
            out["fisher"] = ((rows**2).sum(1), lambda w: (w.unsqueeze(-1) * rows).sum(0))
    return out


def _summed_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The sum of the records' losses: the model's own criterion (a causal LM's response loss), else
    cross-entropy on the class."""
    own = getattr(model, "criterion", None)
    if not callable(own):
        return nn.functional.cross_entropy(logits, labels, reduction="sum")
    criterion = own()
    criterion.reduction = "sum"
    return criterion(logits, labels)


def _noised(key: str, value: torch.Tensor, std: float, generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.randn(value.shape, generator=generator, dtype=torch.float64)
    if key == "xx":  # symmetric: noise the upper triangle once and mirror it
        upper = torch.triu(noise)
        noise = upper + torch.triu(noise, 1).mT
    return value + std * noise


def collect_calibration(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    layers: Sequence[str],
    kinds: Sequence[str],
    *,
    privacy: StatisticsPrivacy | None = None,
    response_only: bool = False,
) -> Calibration:
    """Sum the statistics ``kinds`` of ``layers`` (names of ``nn.Linear`` modules of the base model) over
    ``batches`` of ``(input_ids, attention_mask, labels)``; the model is called as ``model(input_ids,
    attention_mask)`` and returns logits. With ``privacy`` the sums are released clipped and noised.

    The model is left as it was: no parameter changes, no gradient left behind, its train/eval mode restored.
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise AdapterError(f"calibration kinds {list(kinds)} are not allowed; choose from {list(KINDS)}")
    modules = {name: _linear(model, name) for name in layers}
    backward = any(k in ("gradients", "fisher") for k in kinds)
    keys = [key for kind in kinds for key in KINDS[kind]]
    sums: dict[str, dict[str, torch.Tensor]] = {name: {} for name in modules}
    count = 0
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    model.eval()  # no dropout: the statistic of the function the adapter starts from
    if backward:  # gradients must reach the targeted layers' outputs; only their weights require them
        model.requires_grad_(False)
        for module in modules.values():
            module.weight.requires_grad_(True)
    capture = _Capture(modules, backward)
    try:
        for input_ids, attention_mask, labels in batches:
            for start in range(0, len(labels), CALIBRATION_BATCH):
                mask = attention_mask[start:start + CALIBRATION_BATCH]
                # Drop trailing padding columns no example of the chunk uses (they never enter a statistic).
                used = torch.nonzero(mask.any(0)).flatten()
                length = int(used[-1]) + 1 if len(used) else 1
                ids, mask = input_ids[start:start + CALIBRATION_BATCH, :length], mask[:, :length]
                y = labels[start:start + CALIBRATION_BATCH]
                y = y[:, :length] if y.dim() == 2 else y  # a causal LM's per-token labels
                capture.inputs.clear()
                capture.grads.clear()
                with torch.set_grad_enabled(backward):
                    logits = model(ids, mask)
                    if backward:
                        _summed_loss(model, logits, y).backward()
                contributions = {}
                for name in modules:
                    X = _as_tokens(capture.inputs[name], name, len(y))
                    D = _as_tokens(capture.grads[name], name, len(y)) if backward else None
                    m = mask[:, : X.shape[1]].to(torch.float64)
                    if response_only and y.dim() == 2:  # a causal LM's prompt tokens carry the label IGNORE
                        m = m * (y[:, : X.shape[1]] != IGNORE)
                    contributions[name] = _per_example(kinds, X, m, D)
                weights = torch.ones(len(y), dtype=torch.float64)
                if privacy is not None:
                    norms = sum(sq for parts in contributions.values() for sq, _ in parts.values()).sqrt()
                    weights = (privacy.max_norm / norms.clamp(min=1e-300)).clamp(max=1.0)
                for name, parts in contributions.items():
                    for key, (_, weighted_sum) in parts.items():
                        value = weighted_sum(weights)
                        sums[name][key] = sums[name][key] + value if key in sums[name] else value
                count += len(y)
                if backward:
                    for module in modules.values():
                        module.weight.grad = None
    finally:
        capture.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    if count == 0:
        raise AdapterError("calibration got no examples; give it at least one batch")
    if privacy is not None:
        std = privacy.noise_std
        sums = {
            name: {key: _noised(key, stats[key], std, privacy.generator) for key in keys}
            for name, stats in sums.items()
        }
        return Calibration(sums, count, privacy.noise_multiplier, privacy.max_norm, tuple(kinds))
    return Calibration(sums, count, None, None, tuple(kinds))

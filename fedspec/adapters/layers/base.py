"""What every adapter layer (every shape) shares: a frozen base ``nn.Linear``, tensors by role, base rebuild,
merge / unmerge / to_linear.

The adapted weight is always ``W′ = base.weight + delta_weight()`` (DoRA overrides :meth:`adapted_weight`). What
``base.weight`` holds is the method's *base policy*:

- ``keep``: the original W;
- ``residual``: W − R, where R is rebuilt from the layer's *fixed* tensors (PiSSA, SORSA, SVFit, LoLDU, Effort);
- ``truncated``: the same arithmetic, but R is a part of W the adapter does not re-learn at its start (KaSA's minor
  components) — fedspec keeps R, so unlike PEFT the truncation can be undone and rebuilt on the original weights;
- ``owned``: zero — the adapter's factors carry all of W (CLIP-SVD, SALT, SST); the frozen base only adds its bias;
- ``replace``: W is dropped altogether and the layer is its factors (compression: FWSVD's FactorizedLinear).

Tensor roles (:meth:`fixed_tensor_names`, :meth:`server_tensor_names`), which the federated code reads:

- *fixed*: frozen, set once at initialization, identical on every client; sent once per node. Loading new values
  rebuilds the base from the original weights (W = base + R_old, base ← W − R_new).
- *server*: frozen on clients but changed by the server (SST's resampled singular vectors); broadcast every round.
- every other adapter tensor is trainable unless the method's mask freezes it (then the server owns it, like
  FedSVD's A).
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import AdapterError

BASE_POLICIES = ("keep", "residual", "truncated", "owned", "replace")


def check_dropout(dropout: float, base_policy: str) -> None:
    """Dropout acts on the adapter's input. Where the adapter carries the layer's whole weight ("owned",
    "replace") it would drop the pretrained path itself, unlike LoRA's update, which starts at zero."""
    if dropout > 0 and base_policy in ("owned", "replace"):
        raise AdapterError(f"adapter.dropout={dropout}: this method's adapter carries the layer's whole weight, so "
                           "dropout on its input would drop the pretrained path too; use adapter.dropout=0")


def adapter_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype an adapter tensor computes in next to `t`: float32 at least (adapters stay float32 on a
    low-precision base)."""
    return torch.promote_types(t.dtype, torch.float32)


def zero_factor(in_features: int, out_features: int, factory: dict) -> nn.Linear:
    """A bias-free ``nn.Linear`` (exactly that type, so Opacus' Linear rule applies) whose weight starts at zero,
    for factors an initializer always sets.

    ``nn.Linear.__init__`` minus its Kaiming draw, which the initializer would overwrite anyway: the draw took ~24 ms
    of the PiSSA init of a two-block Llama-7B-shaped model, and the documented ways around it cost more on small
    layers (``torch.nn.utils.skip_init`` 3.4×, building on the meta device 1.1× a plain ``nn.Linear``, against
    0.3× here; tests/test_adapters.py checks the result is an ordinary Linear). ``fedspec.adapt(...,
    initialize=False)`` therefore starts from B = A = 0, as it documents."""
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.in_features, linear.out_features = in_features, out_features
    linear.weight = nn.Parameter(torch.zeros(out_features, in_features, **factory))
    linear.register_parameter("bias", None)
    return linear


class AdapterLayer(nn.Module):
    """Base class of the adapter layers. Subclasses set ``base``, ``scaling``, ``base_policy``, ``merged`` and
    ``dropout`` and implement :meth:`adapter_forward` and :meth:`delta_weight`."""

    base: nn.Linear
    base_policy: str
    merged: bool

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    # --- what subclasses define ---------------------------------------------------------------------------------

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution to the output for input x (after dropout)."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """W′ − base.weight as a dense (out, in) matrix, in float32 at least; differentiable."""
        raise NotImplementedError

    def fixed_tensor_names(self) -> tuple[str, ...]:
        """Frozen tensors set once at initialization (sent once per client); they define :meth:`removed_weight`."""
        return ()

    def server_tensor_names(self) -> tuple[str, ...]:
        """Frozen tensors the server changes between rounds (broadcast every round)."""
        return ()

    def removed_weight(self) -> torch.Tensor | None:
        """R, the part of W the base does not hold (``residual``/``truncated``), from the fixed tensors."""
        return None

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, A) with W′ − W = B·A relative to the ORIGINAL weight W — the layer as a plain LoRA of W, scaling
        folded into B — or None when the layer is no low-rank update of W (a normalization, a full-rank
        spectrum, a replaced weight). What :func:`fedspec.adapters.export_peft` writes."""
        return None

    # --- shared machinery ---------------------------------------------------------------------------------------

    def _setup(self, base: nn.Linear, scaling: float, dropout: float, base_policy: str) -> dict:
        if base_policy not in BASE_POLICIES:
            raise ValueError(f"base_policy must be one of {BASE_POLICIES}, got {base_policy!r}")
        check_dropout(dropout, base_policy)
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.scaling = scaling
        self.base_policy = base_policy
        self.merged = False
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Adapter tensors are float32 at least: on a bfloat16/float16 base (model.dtype) the factors, their
        # per-sample gradients, the clipping, the noise and the optimizer all stay in float32.
        return {"device": base.weight.device, "dtype": adapter_dtype(base.weight)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        update = self.adapter_forward(self.dropout(x).to(adapter_dtype(x))).to(x.dtype)  # no-ops in float32
        if self.base_policy == "owned":  # the base weight is zero: skip its matmul, keep its bias
            return update if self.base.bias is None else update + self.base.bias
        return self.base(x) + update

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        """Every tensor of the adapter (trainable, fixed, server-owned), by local name; the base is not one."""
        return {name: p for name, p in self.named_parameters() if not name.startswith("base.")}

    def _frozen_factor(self, *shape: int, factory: dict) -> nn.Parameter:
        return nn.Parameter(torch.zeros(*shape, **factory), requires_grad=False)

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy adapter tensors in by local name. New fixed tensors rebuild the base from the original weight."""
        params = self.adapter_tensors()
        fixed = {k: v for k, v in tensors.items() if k in self.fixed_tensor_names()}
        changed = any(not torch.equal(v.to(params[k]), params[k]) for k, v in fixed.items())
        if changed or (self.base_policy == "owned" and tensors):
            self._rebuild_base(fixed)
        for key, value in tensors.items():
            if key not in fixed:
                target = params[key]
                if target.shape != value.shape:
                    raise ValueError(f"{key!r} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
                target.copy_(value.to(target))

    def set_initial(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the initializer's output (adapter tensors by local name) and derive the base."""
        self.load_tensors(tensors)

    @torch.no_grad()
    def _rebuild_base(self, fixed: dict[str, torch.Tensor]) -> None:
        params = self.adapter_tensors()
        weight = self.base.weight
        if self.merged:
            raise RuntimeError("unmerge the adapter before loading new fixed tensors")
        if self.base_policy == "owned":
            for key, value in fixed.items():
                params[key].copy_(value.to(params[key]))
            weight.zero_()
            return
        compute = adapter_dtype(weight)
        original = weight.to(compute)
        removed = self.removed_weight()
        if removed is not None:
            original = original + removed.to(compute)
        for key, value in fixed.items():
            params[key].copy_(value.to(params[key]))
        removed = self.removed_weight()
        if removed is not None:
            original = original - removed.to(compute)
        weight.copy_(original.to(weight.dtype))

    def adapted_weight(self) -> torch.Tensor:
        """W′ in float32 at least."""
        return self.base.weight.to(adapter_dtype(self.base.weight)) + self.delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the adapted weight, for inference."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                           device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            weight = self.base.weight if self.merged else self.adapted_weight()
            linear.weight.copy_(weight)
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        linear.requires_grad_(False)
        return linear

    def extra_repr(self) -> str:
        return f"scaling={self.scaling:g}, base_policy={self.base_policy!r}, merged={self.merged}"

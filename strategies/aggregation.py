"""Aggregation math as pure functions on tensors (no Flower): FedSVD, FFA-LoRA and FedIT.

A global state is a dict of tensors as produced by ``fedspec.adapter_state`` (``<layer>.lora_A.weight``,
``<layer>.lora_B.weight``, and other trainable tensors such as a head). A client update is a dict of
*differences* (trained - received) for the tensors the rule lets clients train. Every rule only needs the
weighted sum of client updates, so secure aggregation can sit underneath.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from fedspec.svd import refactor_lowrank_grouped

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"


@dataclass(frozen=True)
class AggregationRule:
    """The federated rule of the low-rank additive shape under one strategy."""

    name: str
    clients_train_A: bool  # False: A is frozen on clients (FedSVD, FFA-LoRA)
    refactor: bool  # True: re-factorize B·A by SVD after aggregation (FedSVD)
    summary: str


RULES: dict[str, AggregationRule] = {
    "fedsvd": AggregationRule(
        "fedsvd", clients_train_A=False, refactor=True,
        summary="clients train B; server sums B updates, then SVD of B·A: A orthonormal rows, B = UΣ",
    ),
    "ffa": AggregationRule(
        "ffa", clients_train_A=False, refactor=False,
        summary="clients train B; A frozen at its initial value; server averages B (exact)",
    ),
    "fedit": AggregationRule(
        "fedit", clients_train_A=True, refactor=False,
        summary="clients train A and B; server averages each (inexact: mean(B)·mean(A) != mean(B·A))",
    ),
    "fedavg": AggregationRule(
        "fedavg", clients_train_A=True, refactor=False,
        summary="clients train every trainable tensor; server averages them (exact for linear methods)",
    ),
}


def get_rule(name: str) -> AggregationRule:
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"strategy.name={name!r} is not a strategy; choose one of: {', '.join(RULES)}") from None


def trained_keys(
    state: dict[str, torch.Tensor], rule: AggregationRule, client_trained: Collection[str] | None = None
) -> list[str]:
    """The keys clients train and send under ``rule``.

    ``client_trained`` is the method's explicit answer (the keys whose role is "trained", see
    ``fedspec.adapters.adapter_roles``); without it, everything in the state except frozen A factors.
    """
    if client_trained is not None:
        return [k for k in state if k in client_trained]
    return [k for k in state if rule.clients_train_A or not k.endswith(A_SUFFIX)]


def weighted_mean(updates: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Σ w_k·Δ_k / Σ w_k, accumulated in float64 so the result does not depend on the order of the clients
    beyond float64 rounding."""
    if not updates:
        raise ValueError("no client updates to aggregate")
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"aggregation weights must be non-negative with a positive sum, got {list(weights)}")
    keys = updates[0].keys()
    for update in updates[1:]:
        if update.keys() != keys:
            raise ValueError(f"client updates carry different tensors: {sorted(update.keys() ^ keys)[:3]}")
    total = float(sum(weights))
    mean = {}
    for key in keys:
        acc = torch.zeros_like(updates[0][key], dtype=torch.float64)
        for update, weight in zip(updates, weights):
            acc += update[key].to(torch.float64) * (weight / total)
        mean[key] = acc
    return mean


def aggregate(
    rule: AggregationRule,
    global_state: dict[str, torch.Tensor],
    updates: Sequence[dict[str, torch.Tensor]],
    weights: Sequence[float],
    *,
    a_orthonormal: bool = False,
    client_trained: Collection[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The new global state: apply the weighted mean update, then (FedSVD) re-factorize every B·A.

    ``a_orthonormal=True`` tells the re-factorization that every A already has orthonormal rows — true in
    every FedSVD round after the first, since clients never train A — so it only rotates (r×r) instead of
    decomposing A. No updates (every client dropped or declined) leaves the state, and so B·A, unchanged.
    ``client_trained``: see :func:`trained_keys`.
    """
    if not updates:
        return {k: v.clone() for k, v in global_state.items()}
    allowed = set(trained_keys(global_state, rule, client_trained))
    for update in updates:
        extra = set(update) - allowed
        if extra:
            raise ValueError(f"client update carries tensors the {rule.name} rule does not train: {sorted(extra)[:3]}")
    return apply_mean_update(rule, global_state, weighted_mean(updates, weights), a_orthonormal=a_orthonormal,
                             client_trained=client_trained)


def apply_mean_update(
    rule: AggregationRule,
    global_state: dict[str, torch.Tensor],
    mean: dict[str, torch.Tensor],
    *,
    a_orthonormal: bool = False,
    client_trained: Collection[str] | None = None,
) -> dict[str, torch.Tensor]:
    """global + mean update for the tensors in ``mean``, then (FedSVD) re-factorize every B·A.

    ``mean`` may be a noised aggregate (client-level DP): the refactor only sees the result, so it is
    post-processing. ``a_orthonormal``, ``client_trained``: see :func:`aggregate`."""
    extra = set(mean) - set(trained_keys(global_state, rule, client_trained))
    if extra:
        raise ValueError(f"the mean update carries tensors the {rule.name} rule does not train: {sorted(extra)[:3]}")
    new_state = {}
    for key, value in global_state.items():
        if key in mean:
            new_state[key] = (value.to(torch.float64) + mean[key]).to(value.dtype)
        else:
            new_state[key] = value.clone()
    if rule.refactor:
        new_state.update(refactor_all(new_state, a_orthonormal=a_orthonormal))
    return new_state


def refactor_all(state: dict[str, torch.Tensor], *, a_orthonormal: bool = False) -> dict[str, torch.Tensor]:
    """SVD re-factorization of every layer's B·A, batched per group of same-shape layers."""
    layers = [k[: -len(B_SUFFIX)] for k in state if k.endswith(B_SUFFIX)]
    pairs = {name: (state[name + B_SUFFIX], state[name + A_SUFFIX]) for name in layers}
    refactored = refactor_lowrank_grouped(pairs, assume_orthonormal_rows=a_orthonormal)
    out = {}
    for name, (B_new, A_new) in refactored.items():
        out[name + B_SUFFIX] = B_new
        out[name + A_SUFFIX] = A_new
    return out


def client_update(
    trained: dict[str, torch.Tensor],
    received: dict[str, torch.Tensor],
    rule: AggregationRule,
    *,
    client_trained: Collection[str] | None = None,
) -> dict[str, torch.Tensor]:
    """What a client sends: trained - received, for the tensors ``rule`` lets it train."""
    keys = trained_keys(received, rule, client_trained)
    return {k: (trained[k].detach().cpu() - received[k].detach().cpu()) for k in keys}

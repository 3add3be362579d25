"""Group named tensors that can be stacked into one batch.

Batched torch.linalg calls amortize kernel-launch and Python overhead across all layers of one
shape (e.g. the q/v projections of every transformer block), which is what the server needs when
it decomposes or re-factorizes a whole model per round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["BATCH_BYTES", "TensorSignature", "batch_bytes", "batch_chunks", "group_by_shape", "signature"]

# Largest stack one batched call builds. Stacking copies every matrix, and batching amortizes only call
# overhead, which matters for small matrices; on a CPU large ones are compute-bound one by one anyway.
BATCH_BYTES = 32 * 2**20
# On a GPU every SVD call is launch-bound whatever the layer's size (docs/gpu.md: a 7B layer's randomized SVD keeps
# an H100 busy for 3.9 of its 6 ms), so same-shape layers stack up to this much (capped at 1/32 of the GPU's memory).
# Worth it only where the batch's small steps are batched too: CholeskyQR2 and the Jacobi eigensolver, one launch
# for the stack where cuSOLVER loops over its matrices.
GPU_BATCH_BYTES = 2**30

# (shape, dtype, device) of each tensor in an entry; entries with equal signatures stack.
TensorSignature = tuple[tuple[tuple[int, ...], torch.dtype, torch.device], ...]


def signature(value: torch.Tensor | Sequence[torch.Tensor]) -> TensorSignature:
    """The stacking key of one entry: a single tensor or a tuple of tensors (e.g. a (B, A) pair)."""
    tensors = (value,) if isinstance(value, torch.Tensor) else tuple(value)
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)


def group_by_shape(
    tensors: Mapping[str, torch.Tensor | Sequence[torch.Tensor]],
) -> dict[TensorSignature, list[str]]:
    """Map each stacking signature to the names that share it.

    Values may be single tensors or tuples of tensors; an entry's key covers every tensor in it,
    so a group can be `torch.stack`-ed position by position. dtype and device are part of the key
    because stacking must not silently cast or move. Groups and the names inside them keep the
    mapping's insertion order, so results are deterministic.
    """
    groups: dict[TensorSignature, list[str]] = {}
    for name, value in tensors.items():
        groups.setdefault(signature(value), []).append(name)
    return groups


def batch_bytes(device: torch.device) -> int:
    """Largest stack (bytes) one batched decomposition builds on `device`."""
    if device.type == "cuda":
        return min(GPU_BATCH_BYTES, torch.cuda.get_device_properties(device).total_memory // 32)
    return BATCH_BYTES


def batch_chunks(names: Sequence[str], item_bytes: int, limit: int = BATCH_BYTES) -> list[list[str]]:
    """Split a same-shape group into consecutive chunks whose stacked size stays within `limit` bytes
    (at least one item per chunk), so a batched call never doubles the memory of a large model."""
    per_chunk = max(1, limit // max(1, item_bytes))
    return [list(names[i:i + per_chunk]) for i in range(0, len(names), per_chunk)]

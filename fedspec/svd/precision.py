"""Which floating-point dtype a decomposition runs in, and in which precision its passes over W may run.

SVD, QR and power iterations lose orthogonality and small singular values in bf16/fp16, and
LAPACK/cuSOLVER do not support half precision anyway, so every decomposition in fedspec runs in
float32 or float64 whatever the model dtype (PEFT does the same for its SVD inits).

The one exception is opt-in: the *passes* of a randomized SVD (the products W·P and Wᵀ·Y that dominate its
cost on large weights) may read W in bfloat16, accumulating in float32, while every orthonormalization and the
final small SVD stay in float32/float64. On hardware that multiplies bf16 natively (CPUs with AMX or
AVX512-BF16, GPUs with bf16 tensor cores) a pass costs a fraction of a float32 one. The price is a noise floor:
W is rounded to 8 significant bits, so the captured subspace is accurate to ~1e-3 relative. That is invisible
next to a randomized SVD's own error on real weights (~1e-1 relative to the exact truncation), but it shows on
matrices that are (nearly) exactly low-rank, where float32 passes recover the exact SVD.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["PASS_PRECISIONS", "PassBuffer", "compute_dtype", "native_bf16_matmul", "pass_dtype"]

# "full": passes in the compute dtype; "bfloat16": passes in bf16; "auto": bf16 for all but small weights on
# hardware with native bf16 matrix multiplication, full precision otherwise.
PASS_PRECISIONS: tuple[str, ...] = ("full", "bfloat16", "auto")

# "auto" switches to bf16 passes from this many elements per matrix (256 × 256). On MiniLM's layers (384 × 384 and
# 1536 × 384) a bf16 product W·P took about half the time of a float32 one; the conversion pays for itself once it
# replaces the float32 stack `fedspec.adapt` builds anyway (5–6% of the whole PiSSA init in interleaved A/Bs).
# Smaller matrices keep full precision: their passes are too cheap to trade precision for.
AUTO_BF16_MIN_ELEMENTS = 256 * 256


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any input is float64, else float32.

    Integer, bool and half-precision inputs are upcast to float32; complex input is rejected
    because the adapter math (and its orthonormality invariants) is real-valued.
    """
    for dtype in dtypes:
        if dtype.is_complex:
            raise TypeError(f"fedspec.svd works on real tensors only, got dtype {dtype}")
    return torch.float64 if torch.float64 in dtypes else torch.float32


def native_bf16_matmul(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices natively (not by emulation, which is slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private: absent in some builds
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def pass_dtype(precision: str, W: torch.Tensor) -> torch.dtype:
    """The dtype the passes of a randomized SVD of W (..., m, n) read W in, for a `pass_precision` setting."""
    if precision not in PASS_PRECISIONS:
        raise ValueError(f"unknown pass_precision {precision!r}; allowed values: {', '.join(PASS_PRECISIONS)}")
    full = compute_dtype(W.dtype)
    if precision == "full":
        return full
    if precision == "bfloat16":
        return torch.bfloat16
    large = W.shape[-2] * W.shape[-1] >= AUTO_BF16_MIN_ELEMENTS
    return torch.bfloat16 if large and full == torch.float32 and native_bf16_matmul(W.device) else full


class PassBuffer:
    """Scratch memory for the reduced-precision copy of W (or stack of weights), reused by consecutive randomized
    SVDs.

    Pass one to every `truncated_svd` call of a loop over layers (as `fedspec.adapt` does): a fresh multi-MB
    allocation per layer is page-faulted in by the OS on first touch, which cost more than the conversion itself
    (a 11008×4096 copy: ~50 ms fresh, ~18 ms into reused memory on 2 CPU cores). The buffer grows to the largest
    matrix seen and is freed with the object.
    """

    def __init__(self) -> None:
        self._memory: torch.Tensor | None = None

    def copy(self, W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """W converted to `dtype`, in this buffer's memory (valid until the next call)."""
        return self._view(W.shape, dtype, W.device).copy_(W)

    def stack(self, tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Same-shape tensors stacked and converted to `dtype` in one copy each, in this buffer's memory (valid
        until the next call): a batch in the pass dtype without a full-precision stack first."""
        shapes = sorted({tuple(t.shape) for t in tensors})
        if len(shapes) != 1:  # copy_ would broadcast a smaller tensor into its slot without a word
            raise ValueError(f"PassBuffer.stack needs one or more tensors of one shape, got shapes {shapes}")
        first = tensors[0]
        batch = self._view((len(tensors), *first.shape), dtype, first.device)
        for slot, tensor in zip(batch, tensors):
            slot.copy_(tensor)
        return batch

    def _view(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        memory = self._memory
        if memory is None or memory.numel() < numel or memory.dtype != dtype or memory.device != device:
            memory = self._memory = torch.empty(numel, dtype=dtype, device=device)
        return memory[:numel].view(shape)

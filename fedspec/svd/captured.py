"""A fixed-shape GPU computation captured once in a CUDA graph and replayed with new inputs.

A step made of hundreds of small kernels (FedSVD's rotation of a 7B adapter set: a Gram matrix, an eigensolver and
two products per layer group) is bound by launch overhead on a GPU, not by arithmetic. Captured in a CUDA graph it
runs as one launch: measured on an H200, 1.4 ms replayed against 3.4 ms eager (docs/gpu.md). Capture needs a step
with no host synchronization in it (no `.item()`, no error-code reads: the reason the engine's small eigenproblems
go to the Jacobi kernel on a GPU) and fixed shapes, so a graph is keyed by its inputs' shapes, dtypes and devices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["CapturedStep", "TensorTuples"]

TensorTuples = Sequence[tuple[torch.Tensor, ...]]

# Warm-up runs before capture, on a side stream (PyTorch's recipe for CUDA graphs): they load kernels, compile Triton
# and settle the allocator, none of which may happen inside the capture.
_WARMUP_RUNS = 2


class CapturedStep:
    """`fn(inputs)` for inputs shaped like `example`, captured once and replayed on each call.

    `fn` takes and returns a sequence of tensor tuples (e.g. one (B, A) stack per layer group). A call copies its
    inputs into the graph's own input tensors, replays the graph and returns copies of its outputs, so results
    never alias memory the next replay overwrites. Construction runs `fn` a few times and raises whatever capture
    raises (e.g. a host synchronization inside `fn`).
    """

    def __init__(self, fn: Callable[[TensorTuples], TensorTuples], example: TensorTuples) -> None:
        self.key = self.key_of(example)
        self._inputs = [tuple(t.clone() for t in group) for group in example]
        side = torch.cuda.Stream(device=example[0][0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_RUNS):
                fn(self._inputs)
        torch.cuda.current_stream().wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._outputs = [tuple(group) for group in fn(self._inputs)]

    @staticmethod
    def key_of(inputs: TensorTuples) -> tuple:
        """What a graph is valid for: the shape, dtype and device of every input tensor, in order."""
        return tuple(tuple((tuple(t.shape), t.dtype, t.device) for t in group) for group in inputs)

    def __call__(self, inputs: TensorTuples) -> list[tuple[torch.Tensor, ...]]:
        if self.key_of(inputs) != self.key:
            raise ValueError("CapturedStep called with inputs of other shapes, dtypes or devices than it captured")
        for static, group in zip(self._inputs, inputs):
            for target, source in zip(static, group):
                target.copy_(source)
        self._graph.replay()
        return [tuple(t.clone() for t in group) for group in self._outputs]

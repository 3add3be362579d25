"""Shared pieces of the benchmarks: interleaved timing, one result row type, the table, the machine.

The benchmark machine is shared and noisy, so every comparison runs its candidates round-robin in one
process, in alternating order (baseline, candidate, candidate, baseline, ...), after a warm-up, and reports
medians and the ratio of medians — never a single timing.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Row:
    benchmark: str
    setting: str
    fedspec: str
    baseline: str
    ratio: str  # speed-up (baseline / fedspec) or overhead (fedspec / baseline), as labelled
    accuracy: str
    target: str
    met: str  # "yes", "no" or "—"


def interleaved(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each candidate per repeat, run round-robin (alternating the order) so machine noise hits all of
    them alike.

    A candidate may return a float: then that float is its timing (for calls whose timed part is only a
    piece of what they do, e.g. building a fresh model first).
    """
    times: dict[str, list[float]] = {name: [] for name in candidates}
    order = list(candidates.items())
    for round_ in range(warmup + repeats):
        # Every other round in reverse (ABBA), so no candidate always runs right after the same other one and
        # inherits its allocator and cache state.
        for name, call in order if round_ % 2 == 0 else order[::-1]:
            gc.collect()
            started = time.perf_counter()
            result = call()
            elapsed = result if isinstance(result, float) else time.perf_counter() - started
            if round_ >= warmup:
                times[name].append(elapsed)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def seconds(value: float) -> str:
    if value >= 100:
        return f"{value:.0f} s"
    if value >= 1:
        return f"{value:.2f} s"
    return f"{value * 1000:.0f} ms" if value >= 0.01 else f"{value * 1000:.1f} ms"


def timed(call: Callable[[], object]) -> float:
    """For `interleaved`: time only `call`, after whatever set-up the caller did."""
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


# "Faster" counts only beyond this ratio: medians of a few repeats on the shared machine moved by a few percent
# from run to run (e.g. 0.98× and 1.00× for the same comparison), so a smaller lead is a tie, not a win.
FASTER_MARGIN = 1.05


def yes_no(condition: bool) -> str:
    return "yes" if condition else "**no**"


def render(rows: list[Row]) -> str:
    header = ["benchmark", "setting", "fedspec", "baseline", "ratio", "accuracy", "target", "met"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [row.benchmark, row.setting, row.fedspec, row.baseline, row.ratio, row.accuracy, row.target, row.met]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    cpu = platform.processor() or platform.machine()
    from fedspec.svd.precision import native_bf16_matmul

    bf16 = "native bf16 matrix products" if native_bf16_matmul(torch.device("cpu")) else "no native bf16 (float32 passes)"
    return (f"{os.cpu_count()} CPU cores ({cpu}, {bf16}), torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)")

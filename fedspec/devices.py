"""The device a client or `fedspec train` computes on (`train.device`), and what it used there.

`auto` takes the first CUDA device when torch sees one and the CPU otherwise, so one config serves a fleet of nodes
with and without GPUs; `cpu`, `cuda` and `cuda:N` insist (a node asked for a GPU it lacks stops with a ConfigError
that says so, rather than training on its CPU for hours). Data stays on the CPU and each batch moves to the model's
device as it is used; the DP noise is drawn there too (`fedspec.training`). Replies and checkpoints hold CPU
tensors whatever the device. The server's own device is `federation.server_device`, resolved the same way.
"""

from __future__ import annotations

import resource
import sys

import torch

from .config import DEVICE_PATTERN
from .errors import ConfigError

__all__ = ["device_name", "peak_memory_mib", "reset_peak_memory", "resolve_device"]


def resolve_device(setting: str, key: str = "train.device") -> torch.device:
    """The torch device for a device setting (auto | cpu | cuda | cuda:N); ``key`` names it in errors."""
    if not DEVICE_PATTERN.fullmatch(str(setting)):
        raise ConfigError(f"{key}={setting!r} is not a device; choose auto, cpu, cuda or cuda:N")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={setting} but torch sees no CUDA device here (torch "
                              f"{torch.__version__}); use {key}=auto or {key}=cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"{key}={setting} but this machine has {torch.cuda.device_count()} CUDA "
                              "device(s)")
    return device


def device_name(device: torch.device) -> str:
    """`cuda:0` (NVIDIA H200), or `cpu`: for summaries."""
    if device.type == "cuda":
        return f"`{device}` ({torch.cuda.get_device_name(device)})"
    return f"`{device}`"


def reset_peak_memory(device: torch.device) -> None:
    """Start counting peak memory afresh (CUDA; a CPU process's peak cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    """On CUDA, the most memory torch allocated since `reset_peak_memory`; on a CPU, the process's peak resident set
    so far (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10

"""The update a client released in its latest DP round, kept beside its ledger, so a round asked for again is
answered with the same update.

When the server crashes mid-round and resumes from its last checkpoint, it sends the round again: the same global
adapter, the same round number. A client that had already trained that round would otherwise train it a second
time, a second DP release that its ledger must count; with the budget planned to end exactly at the target ε, that
second attempt does not fit, the client declines, and the resumed round aggregates only the clients that had not
answered before the crash (a 20-client run resumed in its last round aggregated 3 and fell from 0.806 to 0.655).
Sending the identical update again releases nothing new (it is the same output of the same mechanism), costs no ε,
and makes the resumed run the one that would have run without the crash.

The update is replayed only for the same round *and* the same received state (a SHA-256 fingerprint of every
received tensor): a server resumed from an older checkpoint, whose global adapter differs, gets a fresh (and
counted) attempt instead, and so does a client whose settings changed (a new run that reuses the run name under a
node's state-dir: the same seed sends the same first global adapter, but its lr or data may differ). One slot per
client: each DP round overwrites the last. It is written after the ledger,
so a kept update always has its round in the ledger; a crash between the two loses the update, never the ε.

Round 0's privatized calibration statistic (data-driven initializations) is kept the same way, in a slot of its own
(``STATISTICS_FILE``): a server killed during round 0 asks for it again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save

from fedspec.privacy.atomic import write_atomic

__all__ = ["STATISTICS_FILE", "load_released", "received_fingerprint", "settings_fingerprint", "store_released"]

FILE_NAME = "released.safetensors"
STATISTICS_FILE = "released-statistics.safetensors"  # round 0's statistic: not overwritten by the training rounds


def received_fingerprint(round_: int, received: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the round number and every received tensor (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256(f"round {round_}".encode())
    for name in sorted(received):
        tensor = received[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def settings_fingerprint(cfg: DictConfig) -> str:
    """SHA-256 of the run's config without where and how it runs (``run.*`` but ``run.seed``: a resume changes
    those, not what trains; the seed chooses a client's records, batches and noise)."""
    settings = OmegaConf.to_container(cfg, resolve=True)
    settings["run"] = {"seed": settings.get("run", {}).get("seed")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def store_released(folder: Path, round_: int, fingerprint: str, update: dict[str, torch.Tensor],
                   metrics: dict, settings: str, *, name: str = FILE_NAME) -> None:
    """Keep this round's released update and reply metrics in `folder` (atomically, replacing the last round's);
    ``settings``: :func:`settings_fingerprint` of the run; ``name``: the slot's file."""
    header = {"round": str(round_), "fingerprint": fingerprint, "metrics": json.dumps(metrics), "settings": settings}
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in update.items()}
    write_atomic(folder / name, save(tensors, metadata=header))


def load_released(folder: Path, round_: int, fingerprint: str, settings: str, *, name: str = FILE_NAME,
                  ) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The (update, metrics) released for this round from this received state under these settings, or None if
    there is none. (A file kept before the settings were recorded matches on the round and the state alone.)"""
    path = folder / name
    if not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:  # the header first: the tensors only if they match
            header = handle.metadata() or {}
            if header.get("round") != str(round_) or header.get("fingerprint") != fingerprint:
                return None
            if header.get("settings", settings) != settings:
                return None
            return {name: handle.get_tensor(name) for name in handle.keys()}, json.loads(header["metrics"])
    except (SafetensorError, ValueError, KeyError):  # an unreadable file: trained anew (and counted), never stuck
        return None

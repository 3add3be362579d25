"""Per-round checkpoints of the server: safetensors + JSON, written atomically, never pickle.

A checkpoint holds the global adapter state (with the residual init factors), the last finished round,
the strategy name and seed (client sampling is a pure function of seed and round, so no RNG state is
needed), the mirrored privacy ledgers and the evaluation history. ``fedspec simulate run.resume=true``
continues from it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.safetensors"
META_FILE = "meta.json"


@dataclass
class Checkpoint:
    round: int
    state: dict[str, torch.Tensor]
    meta: dict


def save_checkpoint(directory: Path, round_: int, state: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``directory/last`` atomically: a crash mid-write leaves the previous checkpoint intact."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "last.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / STATE_FILE))
    (tmp / META_FILE).write_text(json.dumps({"round": round_, **meta}, indent=2) + "\n")
    final, old = directory / "last", directory / "last.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """The last checkpoint, or None when the run has none (a fresh run)."""
    for candidate in (directory / "last", directory / "last.old"):
        if (candidate / META_FILE).is_file() and (candidate / STATE_FILE).is_file():
            meta = json.loads((candidate / META_FILE).read_text())
            return Checkpoint(meta.pop("round"), load_file(str(candidate / STATE_FILE)), meta)
    return None

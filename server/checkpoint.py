"""Per-round checkpoints of the server: safetensors + JSON, written atomically, never pickle.

``checkpoints/round-NNNN/`` holds the global adapter state (with the residual init factors), the strategy
name and seed (client sampling is a pure function of seed and round, so no RNG state is needed) and the
evaluation history; ``round-0000/`` is the initialized adapter, before any training round and its first
evaluation (a data-driven initialization's round 0 never runs twice). The mirrored privacy ledgers live beside
them in ``privacy/ledgers/``. ``fedspec simulate --resume`` continues from the newest complete checkpoint; every
round's checkpoint is kept (an adapter is small), so any round's global model can be loaded later.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from fedspec.privacy.atomic import fsync_dir, write_atomic

STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
_ROUND_DIR = re.compile(r"round-(\d{4,})")


@dataclass
class Checkpoint:
    round: int
    state: dict[str, torch.Tensor]
    meta: dict


def round_dir(directory: Path, round_: int) -> Path:
    return directory / f"round-{round_:04d}"


def save_checkpoint(directory: Path, round_: int, state: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``round-NNNN/`` through a temporary folder and a rename: a crash mid-write leaves no partial
    checkpoint behind, only the previous rounds."""
    directory.mkdir(parents=True, exist_ok=True)
    final = round_dir(directory, round_)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # fsynced, then renamed, then the rename fsynced: a power loss leaves the previous rounds or this one, whole
    write_atomic(tmp / STATE_FILE, save({k: v.detach().cpu().contiguous() for k, v in state.items()}))
    write_atomic(tmp / META_FILE, (json.dumps({"round": round_, **meta}, indent=2) + "\n").encode())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(directory)
    return final


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """The newest complete checkpoint, or None when the run has none (a fresh run)."""
    if not directory.is_dir():
        return None
    rounds = sorted(
        (int(m.group(1)), path) for path in directory.iterdir() if (m := _ROUND_DIR.fullmatch(path.name))
    )
    for _, path in reversed(rounds):
        if (path / META_FILE).is_file() and (path / STATE_FILE).is_file():
            meta = json.loads((path / META_FILE).read_text())
            return Checkpoint(meta.pop("round"), load_file(str(path / STATE_FILE)), meta)
    return None

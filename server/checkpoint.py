"""Per-round checkpoints of the server: safetensors + JSON, written atomically, never pickle.

``checkpoints/round-NNNN/`` holds the global adapter state (with the residual init factors), the strategy
name and seed (client sampling is a pure function of seed and round, so no RNG state is needed) and the
evaluation history; ``round-0000/`` is the initialized adapter, before any training round and its first
evaluation (a data-driven initialization's round 0 never runs twice). The mirrored privacy ledgers live beside
them in ``privacy/ledgers/``. ``fedspec simulate --resume`` continues from the newest checkpoint; every
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from fedspec.errors import FedspecError
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
    """The newest checkpoint, or None when the run has none (a fresh run). One that cannot be read is an error that
    names it: checkpoints are written whole, so it was damaged afterwards, and going back to an older round
    without a word would run rounds again and write over it."""
    if not directory.is_dir():
        return None
    rounds = sorted(
        (int(m.group(1)), path) for path in directory.iterdir() if (m := _ROUND_DIR.fullmatch(path.name))
    )
    if not rounds:
        return None
    (round_, path), previous = rounds[-1], rounds[-2][0] if len(rounds) > 1 else None
    try:
        meta = json.loads((path / META_FILE).read_text())
        if not isinstance(meta, dict) or meta.pop("round", None) != round_:
            raise ValueError(f"{META_FILE} does not hold round {round_}")
        state = load_file(str(path / STATE_FILE))
    except (OSError, ValueError, SafetensorError) as error:  # json.JSONDecodeError is a ValueError
        back = f"resume from round {previous}" if previous is not None else "start the run anew"
        reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise FedspecError(f"checkpoint {path} cannot be read ({reason}); it was damaged "
                           f"after it was written: move it out of {directory} to {back} (the rounds after it run "
                           "again), or start a new run under another --name") from None
    return Checkpoint(round_, state, meta)

"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one.

Privacy ledgers are rewritten after every round; a torn ledger would lose rounds and under-report ε.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["fsync_dir", "write_atomic"]


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder, fsync, then os.replace.

    The folder is created if needed and fsynced after the rename (where the OS allows), so the
    new name survives a power loss. Temporary names start with a dot and end in `.tmp`, so they
    never match the `client-*.json` pattern ledgers are loaded by.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (where the OS allows opening a folder)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms that cannot open a folder (Windows): the rename is all we get
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

"""The layout of ``runs/<name>/`` and its append-only metrics log."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from omegaconf import DictConfig

from .errors import ConfigError, DataError

log = logging.getLogger("fedspec")


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def adapter_peft(self) -> Path:
        """The final adapter as a PEFT LoRA adapter of the original backbone (methods that allow it)."""
        return self.root / "adapter-peft"

    @property
    def privacy(self) -> Path:
        return self.root / "privacy"

    @property
    def ledgers(self) -> Path:
        """The server's mirror of every client's privacy history (what the clients reported)."""
        return self.privacy / "ledgers"

    @property
    def clients(self) -> Path:
        """Client-side state of simulated clients (each real client keeps its own, see ``state-dir``)."""
        return self.root / "clients"

    @property
    def summary(self) -> Path:
        return self.root / "summary.md"


def default_run_name(command: str) -> str:
    return f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_paths(cfg: DictConfig) -> RunPaths:
    name = cfg.run.name
    if not name:
        raise ConfigError("run.name is not set")
    if Path(name).name != name or name in (".", ".."):
        raise ConfigError(f"run.name={name!r} must be a plain folder name (no '/' or '..'): a run lives in "
                          "run.output_dir/<name>; choose the folder with run.output_dir")
    return RunPaths(Path(cfg.run.output_dir).expanduser() / name)


def check_run_dir(cfg: DictConfig) -> RunPaths:
    """The run folder's paths; refuses to reuse a started run unless resuming it (nothing is created yet, so
    a run that fails its checks leaves nothing behind)."""
    paths = run_paths(cfg)
    if paths.root.exists() and any(paths.root.iterdir()) and not cfg.run.resume:
        raise ConfigError(
            f"run folder {paths.root} already exists; choose another --name, or continue it with --resume"
        )
    if cfg.run.resume and not paths.config.is_file():
        raise ConfigError(f"cannot resume: {paths.config} does not exist; check --name and --output-dir")
    _check_writable(paths.root, cfg.run.output_dir)
    return paths


def _check_writable(root: Path, output_dir: str) -> None:
    """The run folder, or the nearest folder above it that exists, must be writable: a run that could train for
    hours and then fail to write its first checkpoint is refused before it starts."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return
    why = "is not a folder" if existing.exists() and not existing.is_dir() else "is not writable"
    raise ConfigError(f"{existing} {why}, so the run folder {root} cannot be written; choose another "
                      f"run.output_dir (now {output_dir!r}) or --output-dir")


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line (a round, a client's fit), appended as they happen.

    A run that died mid-write (disk full, power loss) can leave a partial last line. The next write (a resumed
    run's first) cuts it off before it appends, else its own line would be glued onto it and both lost, and notes
    what it cut (a ``log-repaired`` line, and a warning); :meth:`read` skips such a line until then."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, kind: str, **fields) -> None:
        line = _line(kind, fields)
        with self.path.open("ab+") as f:  # appends at the end, wherever the cut leaves it
            cut = _cut_partial_last_line(f)
            if cut:
                fragment = cut[:200].decode("utf-8", errors="replace")
                log.warning("%s ended in a partial line, left by a run that stopped mid-write: cut its %d bytes %r",
                            self.path, len(cut), fragment)
                f.write(_line("log-repaired", {"cut_bytes": len(cut), "cut": fragment}))
            f.write(line)

    def read(self) -> list[dict]:
        """Every line's object, in order. A malformed last line is what a run that died mid-write leaves: it is
        skipped, with a warning. A malformed line before it is damage no crash explains: an error naming it."""
        if not self.path.is_file():
            return []
        lines = [(number, line) for number, line in enumerate(self.path.read_bytes().split(b"\n"), start=1)
                 if line.strip()]
        records = []
        for number, line in lines:
            record = _json_object(line)
            if record is not None:
                records.append(record)
            elif number == lines[-1][0]:
                log.warning("%s line %d is not whole, as a run that stopped mid-write leaves it: skipped",
                            self.path, number)
            else:
                raise DataError(f"{self.path} line {number} is not a JSON object, and more lines follow it: the "
                                "file was damaged (only its last line can be cut short by a crash)")
        return records


def _json_object(line: bytes) -> dict | None:
    """The line's JSON object, or None when it is not one (cut short, not UTF-8, not JSON, not an object)."""
    try:
        record = json.loads(line)
    except ValueError:  # json.JSONDecodeError and UnicodeDecodeError both are
        return None
    return record if isinstance(record, dict) else None


def _line(kind: str, fields: dict) -> bytes:
    return (json.dumps({"kind": kind, "time": round(time.time(), 3), **fields}) + "\n").encode()


def _cut_partial_last_line(f: BinaryIO) -> bytes:
    """Cut the open file back to just past its last newline; the bytes cut (none when it ends in one)."""
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return b""
    f.seek(size - 1)
    if f.read(1) == b"\n":  # the usual case: one byte read
        return b""
    keep = _end_of_last_line(f, size)
    f.seek(keep)
    cut = f.read()
    f.truncate(keep)
    return cut


def _end_of_last_line(f: BinaryIO, size: int) -> int:
    """The offset just past the last newline of the open file ``f`` of ``size`` bytes (0 if it has none): all of
    it when it ends in one. Read backwards in blocks: a long run's log need not fit in memory."""
    end = size
    while end > 0:
        start = max(0, end - 65536)
        f.seek(start)
        newline = f.read(end - start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0

"""The layout of ``runs/<name>/`` and its append-only metrics log."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from .errors import ConfigError


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
    """``metrics.jsonl``: one JSON object per line (a round, a client's fit), appended as they happen."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, kind: str, **fields) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"kind": kind, "time": round(time.time(), 3), **fields}) + "\n")

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

"""`fedspec simulate`: a whole federation on one machine, on Flower's simulation runtime (Ray backend).

Before any worker starts, the driver checks what can be checked from the config and the data — client
dataset sizes against δ, a noise level for every client's whole schedule — so bad input fails in seconds
with one line, not minutes later inside a Ray actor.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from fedspec.builders import ModelSettings, Task, build_model, build_task, client_partitions, is_causal_lm
from fedspec.config import check_federated, config_differences, config_to_json, load_config_file, save_config
from fedspec.devices import resolve_device
from fedspec.errors import ConfigError
from fedspec.models import load_tokenizer
from fedspec.privacy.audit import canary_assignment
from fedspec.privacy.planning import ClientPlan, PlanSettings, PrivacyPlan, client_level_lines, plan_run
from fedspec.prompts import trained_records
from fedspec.render import plan_table
from fedspec.rundir import MetricsLog, RunPaths, check_run_dir
from fedspec.strategies import get_rule

FLOWER_OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # never let Flower `uv sync` a CUDA torch
    "RAY_DEDUP_LOGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


@dataclass
class SimulationResult:
    paths: RunPaths
    plans: list[ClientPlan]
    seconds: float
    privacy_plan: PrivacyPlan | None = None


def _resume_config(cfg: DictConfig, paths: RunPaths, overrides: Sequence[str] = ()) -> DictConfig:
    """A resumed run continues with the config it started with (its σ was planned for that schedule), in the
    folder being resumed: a run folder that was moved or copied resumes where it is now, never where it started.
    ``overrides``: what the command line set; a setting there that the saved config does not have is refused,
    never silently dropped (``--resume --rounds 10`` cannot extend a run whose noise was planned for 5)."""
    if any(line["kind"] == "epoch" for line in MetricsLog(paths.metrics).read()):  # epochs: `fedspec train` wrote it
        raise ConfigError(f"cannot resume {paths.root}: it is a `fedspec train` run (centralized), and a federation "
                          "resumed there would overwrite its adapter and reports; start one under another --name")
    saved = load_config_file(paths.config)
    set_keys = [override.split("=", 1)[0].lstrip("+~") for override in overrides]  # a group (data=agnews): its keys
    conflicts = config_differences(cfg, saved, only=set_keys)
    if conflicts:
        raise ConfigError(f"--resume continues {paths.root} with the settings it started with, but the command sets "
                          f"{'; '.join(conflicts[:5])}; drop them, or start a new run under another --name")
    saved.run.output_dir, saved.run.name = cfg.run.output_dir, cfg.run.name
    saved.run.resume = True
    saved.run.progress = cfg.run.progress
    return saved


def client_sizes(cfg: DictConfig, task: Task | None = None) -> list[int]:
    """Every client's number of training records, as the clients will build them: the partition of the
    configured data, plus the included canaries of an audited run. Fails on missing files or too many clients."""
    task = task or build_task(cfg.data, cfg.run.seed)
    parts = client_partitions(task.train.labels, cfg.data, clients=cfg.federation.clients, seed=cfg.run.seed)
    if is_causal_lm(cfg.data):
        # A client leaves out the records longer than model.max_length (encode): it trains, and is accounted, at
        # the sample rate of the records it keeps, so that is the count its noise and ε are planned for.
        fits = trained_records(load_tokenizer(cfg.model.name, cfg.model.get("path")), task.train,
                               int(cfg.model.max_length))
        parts = [[index for index in part if fits[index]] for part in parts]
        empty = [client for client, part in enumerate(parts) if not part]
        if empty:
            raise ConfigError(f"none of client {empty[0]}'s records fits in model.max_length={cfg.model.max_length} "
                              "tokens (prompt and response together); raise model.max_length")
    sizes = [len(p) for p in parts]
    if cfg.audit.canaries:
        extra = canary_assignment(cfg.audit.canaries, len(sizes), task.num_classes, cfg.audit.seed)
        sizes = [n + k for n, k in zip(sizes, extra.included_per_client(len(sizes)))]
    return sizes


def preflight(cfg: DictConfig) -> PrivacyPlan:
    """Everything that can fail on bad input, before any worker starts: place the adapter on the model (no
    SVD yet: unknown targets, a rank too large), partition the data as the clients will (missing files, too
    many clients), and plan every client's noise and the client-level noise (δ too large, an unreachable ε,
    a budget that lets too few clients train), and the devices: in a simulation the server and every client run on
    this machine."""
    check_federated(cfg)
    for key in ("train.device", "federation.server_device"):
        resolve_device(OmegaConf.select(cfg, key), key)
    task = build_task(cfg.data, cfg.run.seed)
    build_model(ModelSettings.of(cfg), task.num_classes, train_A=get_rule(cfg.strategy.name).clients_train_A,
                initialize=False, federated=True)
    return plan_run(PlanSettings.of(cfg), client_sizes(cfg, task))


class _HideInternalNotices(logging.Filter):
    """Flower notices about fedspec's own choices, which the user cannot act on: the deprecation of
    ``run_simulation`` (fedspec's driver), and skipped federated evaluation (the server evaluates itself)."""

    NOTICES = ("run_simulation` function is deprecated", "deprecated feature", "Federated evaluation will be skipped")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in self.NOTICES)


def _quiet_flower() -> None:
    logger = logging.getLogger("flwr")
    logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _HideInternalNotices) for f in logger.filters):
        logger.addFilter(_HideInternalNotices())


def simulate(cfg: DictConfig, console: Console | None = None, *, overrides: Sequence[str] = ()) -> SimulationResult:
    """Run the federation ``cfg`` describes (or resume it: ``run.resume``); ``overrides``: the command line's
    key=value settings, which a resumed run checks against the config it started with."""
    console = console or Console(stderr=True)
    for key, value in FLOWER_OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    paths = check_run_dir(cfg)
    if cfg.run.resume:
        cfg = _resume_config(cfg, paths, overrides)
    plan = preflight(cfg)
    paths.root.mkdir(parents=True, exist_ok=True)
    if not cfg.run.resume:
        save_config(cfg, paths.config)
    if cfg.run.progress:
        console.print(f"fedspec simulate → {paths.root}")
        if plan.clients:
            console.print(plan_table(cfg, plan.clients, per_client=False))
        if plan.client_level:
            console.print("\n".join(client_level_lines(plan.client_level)))

    from flwr.simulation import run_simulation

    from fedspec.client.app import build_client_app
    from fedspec.server.app import build_server_app

    _quiet_flower()
    config_json = config_to_json(cfg)
    started = time.monotonic()
    with _restored_environment():
        run_simulation(
            server_app=build_server_app(config_json),
            client_app=build_client_app(config_json),
            num_supernodes=cfg.federation.clients,
            backend_config={
                "client_resources": {
                    "num_cpus": float(cfg.federation.client_cpus),
                    "num_gpus": 0.0,
                    # Flower passes these to Ray's actor options. Without restarts, a worker the out-of-memory
                    # killer took stays in Flower's pool and fails every later message routed to it; with them,
                    # Ray starts a fresh worker and runs the message that was lost (and those sent while it
                    # restarted) there, once more at most. A lost run released nothing: it spent no privacy.
                    "max_restarts": -1,
                    "max_task_retries": 1,
                },
                "init_args": {
                    "num_cpus": os.cpu_count() or 1,
                    "include_dashboard": False,
                    "logging_level": logging.ERROR,
                    "log_to_driver": False,
                },
            },
        )
    return SimulationResult(paths, plan.clients, time.monotonic() - started, plan)


@contextmanager
def _restored_environment():
    """Ray writes PYTHONPATH, PYTHONBREAKPOINT and more into os.environ and leaves them there; later subprocesses
    of the same process (a second run, a test) would inherit them. Put the environment back as it was."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)

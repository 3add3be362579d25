"""`fedspec train`: the centralized baseline — same model, data, adapter and DP settings, no federation.

All training records are pooled; the adapter trains as its method defines (A and B for the low-rank
methods); DP-SGD noise is planned for the whole run (``train.epochs`` passes over the data, or
``train.max_steps`` steps: the last epoch then ends early) and the privacy ledger composes the epochs exactly as a
federated client composes its rounds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .adapters import adapter_layers, save_adapter
from .builders import (
    InitStatistics,
    ModelSettings,
    answer_score,
    apply_adapter,
    build_backbone,
    build_task,
    calibrate,
    causal_lm_summary_lines,
    encode,
    peft_export_line,
    write_peft_export,
)
from .config import save_config
from .devices import device_name, peak_memory_mib, reset_peak_memory, resolve_device
from .errors import ConfigError
from .privacy import PrivacyLedger, ledger_filename, plan_noise, write_privacy_report
from .privacy.accounting import epsilon_text, sample_rate
from .privacy.disclosures import server_sees
from .privacy.planning import check_delta, init_statistics_entries
from .render import markdown_table, number, results_table
from .rundir import MetricsLog, RunPaths, check_run_dir
from .trained import labels_metadata
from .training import DPSettings, evaluate, make_optimizer, train_steps

CENTRAL_CLIENT = "centralized"


@dataclass
class EpochRow:
    epoch: int
    train_loss: float | None
    eval_accuracy: float
    eval_loss: float
    epsilon: float | None
    seconds: float
    answer_accuracy: float | None = None  # causal LMs: greedy answers scored, before training and after the last epoch


@dataclass
class CentralResult:
    paths: RunPaths
    rows: list[EpochRow]
    noise_multiplier: float | None


def epoch_steps(train: DictConfig, n: int) -> list[int]:
    """The DP-SGD steps of each epoch over ``n`` pooled records: ``train.epochs`` whole passes, or ``train.max_steps``
    steps in all (whole passes, then what is left)."""
    per_epoch = math.ceil(n / train.batch_size)
    if train.max_steps is None:
        return [per_epoch] * train.epochs
    whole, rest = divmod(train.max_steps, per_epoch)
    return [per_epoch] * whole + ([rest] if rest else [])


def _noise(cfg: DictConfig, n: int, steps: int) -> float:
    """σ for ``steps`` DP-SGD steps over the pooled dataset (after a privatized initialization statistic, if any)."""
    if cfg.privacy.noise_multiplier is not None:
        return float(cfg.privacy.noise_multiplier)
    return plan_noise(
        float(cfg.privacy.target_epsilon), float(cfg.privacy.delta), sample_rate(n, cfg.train.batch_size), steps,
        accountant=cfg.privacy.accountant, prior=init_statistics_entries(cfg.privacy, cfg.adapter.method),
    )


def centralized_lr(train: DictConfig) -> float:
    """The rate of `fedspec train`: ``train.centralized_lr`` where a recipe sets one, else the clients' ``train.lr``."""
    return float(train.lr if train.centralized_lr is None else train.centralized_lr)


def trainable_counts(model) -> dict[str, int]:
    """Trainable parameters inside the adapter layers and elsewhere (a classification head)."""
    inside = tuple(f"{name}." for name in adapter_layers(model))
    counts = {"trainable_adapter": 0, "trainable_other": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            counts["trainable_adapter" if name.startswith(inside) else "trainable_other"] += p.numel()
    return counts


def train_centralized(cfg: DictConfig, console: Console | None = None) -> CentralResult:
    console = console or Console(stderr=True)
    if cfg.run.resume:
        raise ConfigError("fedspec train does not resume runs; start a new one (drop --resume / run.resume)")
    if cfg.privacy.enabled and cfg.privacy.get("sample_rate") is not None:
        raise ConfigError(f"privacy.sample_rate={cfg.privacy.sample_rate:g} fixes federated clients' sample rate (it "
                          "hides their record counts from the server); fedspec train has no clients: drop it")
    paths = check_run_dir(cfg)
    task = build_task(cfg.data, cfg.run.seed)
    settings, statistics = ModelSettings.of(cfg), InitStatistics.of(cfg)
    model, tokenizer = build_backbone(settings, task.num_classes)
    train_inputs, train_labels = encode(tokenizer, task.train, cfg.model.max_length)
    eval_inputs, eval_labels = encode(tokenizer, task.eval, cfg.model.max_length)
    n = len(train_labels)
    init_started = time.monotonic()
    calibration = None
    if statistics.kinds:  # data-driven init: statistics of (a seeded subset of) the training records first
        if cfg.privacy.enabled:
            check_delta(float(cfg.privacy.delta), [n])
        privacy = statistics.mechanism(seed=cfg.run.seed if cfg.privacy.seed_noise else None)
        calibration = calibrate(settings.adapter, model, train_inputs, train_labels, privacy=privacy,
                                seed=cfg.run.seed)
    # The statistics of a data-driven init are gathered on the CPU; the initialization itself (its SVDs) and the
    # training run on train.device.
    device = resolve_device(cfg.train.device)
    model.to(device)
    reset_peak_memory(device)
    apply_adapter(settings, model, train_A=True, calibration=calibration)
    init_seconds = time.monotonic() - init_started

    dp, ledger = None, None
    plan = epoch_steps(cfg.train, n)
    if cfg.privacy.enabled:
        check_delta(float(cfg.privacy.delta), [n])
        dp = DPSettings(_noise(cfg, n, sum(plan)), cfg.privacy.max_grad_norm, cfg.privacy.accountant,
                        grad_sample_mode=cfg.privacy.grad_sample_mode,
                        head_clip_share=cfg.privacy.get("head_clip_share"),
                        seed=cfg.run.seed if cfg.privacy.seed_noise else None)
        ledger = PrivacyLedger(client_id=CENTRAL_CLIENT, delta=cfg.privacy.delta, accountant=cfg.privacy.accountant)
        for sigma0, q0, steps0 in init_statistics_entries(cfg.privacy, cfg.adapter.method):  # the privatized init statistic: "epoch 0"
            ledger.record(0, sigma0, q0, steps0)
    paths.root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, paths.config)
    log = MetricsLog(paths.metrics)
    log.write("init", method=cfg.adapter.method, seconds=init_seconds, device=str(device),
              calibration_examples=calibration.count if calibration else 0,
              statistics_privatized=bool(calibration and calibration.privatized), **trainable_counts(model))

    def evaluation_row(epoch: int, loss: float | None, started: float) -> EpochRow:
        metrics = evaluate(model, eval_inputs, eval_labels, cfg.train.eval_batch_size)
        eps = ledger.epsilon() if ledger is not None and ledger.entries else None
        answers = (answer_score(cfg.data, model, tokenizer, task.eval, cfg.train.eval_batch_size)
                   if epoch in (0, len(plan)) else None)
        return EpochRow(epoch, loss, metrics["accuracy"], metrics["loss"], eps, time.monotonic() - started, answers)

    rows = [evaluation_row(0, None, time.monotonic())]
    log.write("epoch", **vars(rows[-1]))
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True, disable=not cfg.run.progress)
    # One optimizer for the whole run: a new one each epoch would reset Adam's moments and bias correction at every
    # epoch boundary, which no centralized baseline does.
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg.train.optimizer,
                               centralized_lr(cfg.train))
    with progress:
        for epoch, steps in enumerate(plan, start=1):
            started = time.monotonic()
            bar = progress.add_task(f"epoch {epoch}/{len(plan)}", total=steps)
            result = train_steps(
                model, train_inputs, train_labels, steps=steps, batch_size=cfg.train.batch_size,
                optimizer=optimizer, lr=centralized_lr(cfg.train), dp=_for_epoch(dp, epoch),
                seed=cfg.run.seed + epoch,
                on_step=lambda *_: progress.advance(bar),
                first_step=sum(plan[:epoch - 1]), total_steps=sum(plan),
                physical_batch_size=cfg.train.physical_batch_size, drop_last=False,  # without DP: an epoch is one pass
            )
            if ledger is not None:
                ledger.record(epoch, result.noise_multiplier, result.sample_rate, result.steps)
                ledger.save(paths.ledgers / ledger_filename(CENTRAL_CLIENT))
            rows.append(evaluation_row(epoch, result.mean_loss, started))
            log.write("epoch", **vars(rows[-1]))
            progress.remove_task(bar)
            if cfg.run.progress:
                console.print(f"epoch {epoch}: train loss {result.mean_loss:.4f}  eval acc {rows[-1].eval_accuracy:.4f}")

    save_adapter(model, paths.adapter, metadata={"run": cfg.run.name, "mode": "centralized",
                                                 **labels_metadata(settings, task.eval.label_names)})
    peft_export = write_peft_export(model, paths.adapter_peft, settings)
    write_central_privacy_report(cfg, paths, {CENTRAL_CLIENT: ledger} if ledger else {},
                                 statistics.report(calibration))
    paths.summary.write_text(_summary(cfg, rows, peft_export, sum(plan), _device_line(device)))
    return CentralResult(paths, rows, dp.noise_multiplier if dp else None)


def _for_epoch(dp: DPSettings | None, epoch: int) -> DPSettings | None:
    """Seeded noise (privacy.seed_noise, tests only) seeded anew each epoch, as clients seed each round: one seed
    for every epoch would draw the same batches and the same noise in each, adding up instead of averaging out."""
    if dp is None or dp.seed is None:
        return dp
    return replace(dp, seed=dp.seed * 1_000_003 + epoch)


def write_central_privacy_report(
    cfg: DictConfig, paths: RunPaths, ledgers: dict[str, PrivacyLedger], init_statistics: dict | None = None
) -> dict:
    """privacy/report.{json,md} and epsilon.png of a centralized run (one "client": the pooled data);
    ``init_statistics`` describes the statistics a data-driven initialization computed first."""
    return write_privacy_report(
        paths.privacy, ledgers, delta=cfg.privacy.delta, accountant=cfg.privacy.accountant,
        max_grad_norm=cfg.privacy.max_grad_norm if cfg.privacy.enabled else None,
        extra={"record_level_dp": bool(cfg.privacy.enabled),
               "target_epsilon": cfg.privacy.target_epsilon if cfg.privacy.enabled else None,
               **(init_statistics or {})},
        record_level=bool(cfg.privacy.enabled),
        server_sees=server_sees(cfg.privacy, None, method=cfg.adapter.method, batch_size=cfg.train.batch_size),
    )


EPOCH_HEADERS = ["epoch", "train loss", "eval accuracy", "eval loss", "ε", "seconds"]


def _cells(row: EpochRow) -> list[str]:
    return [str(row.epoch), number(row.train_loss, ".4f"), f"{row.eval_accuracy:.4f}", f"{row.eval_loss:.4f}",
            epsilon_text(row.epsilon), f"{row.seconds:.1f}"]


def epochs_table(rows: list[EpochRow]) -> Table:
    return results_table("fedspec train (centralized)", EPOCH_HEADERS, [_cells(r) for r in rows])


def _device_line(device: torch.device) -> str:
    peak = f"{peak_memory_mib(device) / 1024:.2f} GiB"
    if device.type == "cuda":
        return f"- device: {device_name(device)}, peak GPU memory {peak}"
    return f"- device: {device_name(device)}, peak resident memory of the process {peak}"


def _summary(cfg: DictConfig, rows: list[EpochRow], peft_export: str | None, steps: int, device_line: str) -> str:
    lines = [
        f"# fedspec run `{cfg.run.name}` (centralized baseline)",
        "",
        f"- model: `{cfg.model.name}`, adapter: `{cfg.adapter.method}` rank {cfg.adapter.rank}",
        f"- training: {cfg.train.optimizer} lr {centralized_lr(cfg.train):g}, batch {cfg.train.batch_size}, "
        f"{steps} step(s) in {len(rows) - 1} epoch(s)",
        f"- privacy: {'record-level DP-SGD' if cfg.privacy.enabled else '**no differential privacy**'}",
        device_line,
        *causal_lm_summary_lines(cfg.data, (rows[0].eval_loss, rows[-1].eval_loss),
                                 (rows[0].answer_accuracy, rows[-1].answer_accuracy), "epoch", rows[-1].epoch),
        "",
        markdown_table(EPOCH_HEADERS, [_cells(r) for r in rows]),
    ]
    lines += ["", "Files: `config.yaml`, `metrics.jsonl`, `adapter/`, `privacy/report.md`.",
              peft_export_line(peft_export)]
    return "\n".join(lines) + "\n"

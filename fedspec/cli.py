"""The `fedspec` command.

Familiar flags for the common settings; any other config key as a Hydra-style ``key=value`` override
(``fedspec simulate --clients 20 adapter.rank=16 privacy.target_epsilon=3``). Bad input ends with one
line naming the key and the allowed values, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console

from .errors import FedspecError

EPILOG = """\
config overrides:
  Any key of the config tree as key=value, e.g. adapter.method=lora adapter.rank=16 strategy.name=ffa
  privacy.target_epsilon=3 data=sst2 model=tiny-bert. Groups: model, data, adapter, strategy, privacy,
  federation; see configs/ in the fedspec package for every key and its default.
"""

console = Console(stderr=True)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (Hydra syntax)")
    parser.add_argument("--name", help="run name: results go to runs/<name>/ (default: <command>-<timestamp>)")
    parser.add_argument("--output-dir", help="parent folder of run folders (default: runs)")
    parser.add_argument("--seed", type=int, help="seed of partitioning, sampling and initialization (default: 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress output, only the final table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedspec",
        description="Federated, privacy-preserving fine-tuning of SVD adapters (FedSVD, PiSSA, DP-SGD) "
        "on Flower and Opacus.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    simulate = sub.add_parser(
        "simulate",
        help="run a whole federation on this machine (Flower simulation runtime)",
        description="Run a federation of N virtual clients on this machine: each client fine-tunes the adapter "
        "on its own partition under DP-SGD, the server aggregates (FedSVD by default) and evaluates every round. "
        "Writes runs/<name>/ with config.yaml, metrics.jsonl, the final adapter, checkpoints, the privacy report "
        "and summary.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    simulate.add_argument("--clients", type=int, help="number of clients (federation.clients, default 20)")
    simulate.add_argument("--rounds", type=int, help="number of rounds (federation.rounds, default 5)")
    simulate.add_argument("--fraction", type=float, help="share of clients sampled per round (default 0.5)")
    simulate.add_argument("--resume", action="store_true", help="continue runs/<name>/ from its last checkpoint")
    _add_common(simulate)

    train = sub.add_parser(
        "train",
        help="centralized baseline: same model, data, adapter and DP, no federation",
        description="Train the adapter on all training records pooled, with the same config groups and the same "
        "training loop the clients use; DP-SGD noise is planned for all epochs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    train.add_argument("--epochs", type=int, help="passes over the training data (train.epochs, default 1)")
    _add_common(train)

    report = sub.add_parser(
        "privacy-report",
        help="(re)write the privacy report of a run folder",
        description="Read the privacy ledgers of RUN_DIR and write privacy/report.json, report.md and epsilon.png: "
        "every client's epsilon after each round it took part in, composed over the whole run.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run folder, e.g. runs/simulate-20261127-101500")

    export = sub.add_parser(
        "export-peft",
        help="write a run's adapter as a Hugging Face PEFT LoRA adapter of the original backbone",
        description="Load ADAPTER_DIR (e.g. runs/NAME/adapter; the run's config.yaml beside it names the model) on "
        "the original base model and write OUT_DIR/adapter_config.json + adapter_model.safetensors in PEFT's "
        "format, which peft.PeftModel.from_pretrained(AutoModel.from_pretrained(base), OUT_DIR) loads with the "
        "same outputs; residual methods (PiSSA, CorDA, ...) become a rank-2r LoRA. The classification head is "
        "written beside (classifier_head.safetensors, fedspec_head.json).",
    )
    export.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="a saved fedspec adapter, e.g. runs/NAME/adapter")
    export.add_argument("out_dir", metavar="OUT_DIR", help="where to write the PEFT adapter")

    plan = sub.add_parser(
        "privacy-plan",
        help="plan each client's noise for a target epsilon before running",
        description="Partition the data as `fedspec simulate` would and print the noise multiplier each client "
        "needs to stay within privacy.target_epsilon over the whole run, and the epsilon it would reach.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    plan.add_argument("--clients", type=int, help="number of clients (federation.clients)")
    plan.add_argument("--rounds", type=int, help="number of rounds (federation.rounds)")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (Hydra syntax)")
    return parser


def _overrides(args: argparse.Namespace) -> list[str]:
    flags = {
        "clients": "federation.clients",
        "rounds": "federation.rounds",
        "fraction": "federation.fraction",
        "epochs": "train.epochs",
        "name": "run.name",
        "output_dir": "run.output_dir",
        "seed": "run.seed",
    }
    overrides = list(args.overrides)
    for bad in (o for o in overrides if "=" not in o):
        raise FedspecError(f"{bad!r} is not an override; write key=value (e.g. adapter.rank=16)")
    for flag, key in flags.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    if getattr(args, "resume", False):
        overrides.append("run.resume=true")
    if getattr(args, "quiet", False):
        overrides.append("run.progress=false")
    return overrides


def _compose(args: argparse.Namespace):
    from .config import compose_config
    from .rundir import default_run_name

    cfg = compose_config(_overrides(args))
    if not cfg.run.name:
        cfg.run.name = default_run_name(args.command)
    return cfg


def cmd_simulate(args: argparse.Namespace) -> int:
    from .rundir import MetricsLog
    from .simulations.driver import simulate
    from .server.progress import RoundRow, rounds_table

    started = time.monotonic()
    result = simulate(_compose(args), console)
    rows = [RoundRow(**{k: v for k, v in r.items() if k not in ("kind", "time")})
            for r in MetricsLog(result.paths.metrics).read() if r["kind"] == "round"]
    Console().print(rounds_table(rows, title=f"fedspec simulate — {result.paths.root}"))
    console.print(f"done in {time.monotonic() - started:.1f}s; summary: {result.paths.summary}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .centralized import epochs_table, train_centralized

    started = time.monotonic()
    result = train_centralized(_compose(args), console)
    Console().print(epochs_table(result.rows))
    console.print(f"done in {time.monotonic() - started:.1f}s; summary: {result.paths.summary}")
    return 0


def cmd_privacy_report(args: argparse.Namespace) -> int:
    from .config import load_config_file
    from .privacy import load_ledgers, write_privacy_report
    from .rundir import RunPaths

    paths = RunPaths(Path(args.run_dir))
    if not paths.config.is_file():
        raise FedspecError(f"{args.run_dir} is not a fedspec run folder (no config.yaml)")
    cfg = load_config_file(paths.config)
    ledgers = load_ledgers(paths.ledgers) if paths.ledgers.is_dir() else {}
    if not ledgers and (paths.privacy / "report.json").is_file():
        console.print(f"{paths.ledgers} holds no ledgers; keeping the existing report")
        return 0
    from .builders import init_statistics_report

    write_privacy_report(paths.privacy, ledgers, delta=cfg.privacy.delta, accountant=cfg.privacy.accountant,
                         max_grad_norm=cfg.privacy.max_grad_norm,
                         extra={"record_level_dp": bool(cfg.privacy.enabled),
                                "target_epsilon": cfg.privacy.target_epsilon, **init_statistics_report(cfg, None)})
    Console().print((paths.privacy / "report.md").read_text())
    return 0


def cmd_export_peft(args: argparse.Namespace) -> int:
    from safetensors import safe_open

    from .adapters import load_adapter, read_adapter_config
    from .builders import write_peft_export
    from .config import load_config_file
    from .models import build_classifier

    adapter_dir = Path(args.adapter_dir)
    read_adapter_config(adapter_dir)  # a clear error when it is not a fedspec adapter
    run_config = adapter_dir.parent / "config.yaml"
    if not run_config.is_file():
        raise FedspecError(f"{run_config} does not exist: ADAPTER_DIR must sit in a run folder (runs/NAME/adapter)")
    cfg = load_config_file(run_config)
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as weights:
        if "head.weight" not in weights.keys():
            raise FedspecError(f"{adapter_dir} holds no classification head (adapter.train_head=false?)")
        num_classes = weights.get_slice("head.weight").get_shape()[0]
    model, _ = build_classifier(cfg.model, num_classes, seed=cfg.run.seed)
    load_adapter(model, adapter_dir)
    reason = write_peft_export(model, Path(args.out_dir), cfg)
    if reason is not None:
        raise FedspecError(f"cannot export a PEFT LoRA adapter: {reason}")
    console.print(f"PEFT LoRA adapter written to {args.out_dir}")
    return 0


def cmd_privacy_plan(args: argparse.Namespace) -> int:
    from .simulations.driver import preflight
    from .privacy.planning import plan_table

    cfg = _compose(args)
    if not cfg.privacy.enabled:
        raise FedspecError("privacy.enabled=false: there is nothing to plan")
    Console().print(plan_table(cfg, preflight(cfg)))
    return 0


COMMANDS = {
    "simulate": cmd_simulate,
    "train": cmd_train,
    "privacy-report": cmd_privacy_report,
    "privacy-plan": cmd_privacy_plan,
    "export-peft": cmd_export_peft,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Overrides may come before, between or after the flags (argparse alone only takes them in one place)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    stray = [token for token in unknown if token.startswith("-") or "=" not in token]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if unknown and not hasattr(args, "overrides"):
        parser.error(f"{args.command} takes no key=value overrides: {' '.join(unknown)}")
    if unknown:
        args.overrides = [*args.overrides, *unknown]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except FedspecError as error:
        console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted; continue the run with --resume --name <name>")
        return 130


if __name__ == "__main__":
    sys.exit(main())

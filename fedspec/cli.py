"""The `fedspec` command.

Familiar flags for the common settings; any other config key as a Hydra-style ``key=value`` override
(``fedspec simulate --clients 20 adapter.rank=16 privacy.target_epsilon=3``). Bad input ends with one
line naming the key and the allowed values, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from .errors import FedspecError
from .launch import DEFAULT_IDLE_POLL

CONFIG_GROUPS = ("model", "data", "adapter", "strategy", "privacy", "federation", "train")


def _epilog() -> str:
    """The override syntax and every config group's choices, read from the packaged configs/."""
    import fedspec.configs

    root = Path(fedspec.configs.__file__).parent
    lines = [
        "config overrides:",
        "  Any key of the config tree as key=value, e.g. adapter=lora adapter.rank=16 strategy=ffa",
        "  privacy.target_epsilon=3 data=sst2 model=tiny-bert; see configs/ in the fedspec package for every key",
        "  and its default. A group=choice override picks one of:",
    ]
    for group in CONFIG_GROUPS:
        choices = ", ".join(sorted(p.stem for p in (root / group).glob("*.yaml") if not p.stem.startswith("_")))
        lines.append(textwrap.fill(choices, width=104, initial_indent=f"    {group}: ",
                                   subsequent_indent=" " * (len(group) + 6)))
    return "\n".join(lines) + "\n"


EPILOG = _epilog()

# What the user gave, paths and model answers are printed verbatim: escape() keeps rich from reading [words] as
# markup (dropped from the line), and emoji=False keeps :x: from becoming an emoji.
console = Console(stderr=True, emoji=False)


def _table_console() -> Console:
    """Standard output for a results table: piped or captured (a log file), rich would cut it at 80 columns and
    clip the headers ("accur…"); 120 fit every table fedspec prints."""
    out = Console(emoji=False)
    return out if out.is_terminal else Console(emoji=False, width=120)


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
    simulate.add_argument("--fraction", type=float, help="share of clients sampled per round (federation.fraction: "
                          "default 0.5; data=sst2 and data=agnews carry 1, every client in every round)")
    simulate.add_argument("--resume", action="store_true", help="continue runs/<name>/ from its last checkpoint")
    _add_common(simulate)

    train = sub.add_parser(
        "train",
        help="centralized baseline: same model, data, adapter and DP, no federation",
        description="Train the adapter on all training records pooled, with the same config groups and the same "
        "training loop the clients use; DP-SGD noise is planned for all its steps. It steps at train.centralized_lr "
        "where the recipe sets one (data=sst2's does: its clients' rate is too large for one pooled model) and the "
        "command line sets no train.lr, else at train.lr.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    train.add_argument("--epochs", type=int, help="passes over the training data (train.epochs, default 1)")
    train.add_argument("--max-steps", type=int, help="this many DP-SGD steps instead of whole passes (overrides "
                       "--epochs, as transformers' max_steps does), e.g. a federation's clients × rounds × local "
                       "steps to compare at equal steps (train.max_steps)")
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
        "same outputs (AutoModelForCausalLM for a causal-LM run); residual methods (PiSSA, CorDA, ...) become a "
        "rank-2r LoRA. A classifier's head is written beside (classifier_head.safetensors, fedspec_head.json).",
    )
    export.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="a saved fedspec adapter, e.g. runs/NAME/adapter "
                        "(a run folder stands for its final adapter/)")
    export.add_argument("out_dir", metavar="OUT_DIR", help="where to write the PEFT adapter")

    generate = sub.add_parser(
        "generate",
        help="answer prompts with a trained causal-LM run (greedy decoding)",
        description="Load RUN_DIR's model with its final adapter and answer each --prompt (printed) or each record "
        "of --file (JSON lines of {\"prompt\"}, {\"question\"} or {\"messages\": [...]}; written to stdout as JSON "
        "lines with the response, and the reference when the record had one). Prompts are rendered with the "
        "tokenizer's chat template, as in training; a run that cast classification data as generation "
        "(data.prompt) wraps each --prompt, and each \"prompt\" or \"question\" of --file, in its data.prompt, as it "
        "wrapped each record's text.",
    )
    generate.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder of a causal-LM task")
    generate.add_argument("--prompt", action="append", default=[],
                          help="a prompt to answer (repeatable); with a data.prompt run, the text to put in it")
    generate.add_argument("--file", help="a JSON-lines file of prompts (with a data.prompt run, of texts to put in it)")
    generate.add_argument("--max-new-tokens", type=int, help="the longest answer (default: the run's data.max_new_tokens)")
    generate.add_argument("--base", action="store_true", help="answer with the base model, without the adapter")

    predict = sub.add_parser(
        "predict",
        help="label texts with a trained classifier run",
        description="Load RUN_DIR's model with its final adapter and head and label each --text (printed: the "
        "most probable class, its probability, the text) or each text of --file (one per line, or JSON lines; "
        "written to stdout as JSON lines with the label and every class's probability). Texts are tokenized and "
        "truncated as in training (model.max_length).",
    )
    predict.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder of a classification task")
    predict.add_argument("--text", action="append", default=[], help="a text to label (repeatable)")
    predict.add_argument("--file", help="texts to label: one per line, or JSON lines (.jsonl) with a text field")
    predict.add_argument("--field", default="text", help="the text field of a JSON-lines --file (default: text)")

    plan = sub.add_parser(
        "privacy-plan",
        help="plan each client's noise for a target epsilon before running",
        description="Print, for every client, the noise multiplier it needs to stay within the target epsilon over "
        "the whole run (planned for the worst case: sampled in every round), the epsilon it can expect (averaged "
        "over how often it is sampled) and in the worst case, and how many rounds of taking part its budget "
        "allows at that noise. Client dataset sizes come from partitioning the configured data as `fedspec "
        "simulate` would, or from --sizes. The same checks run before every `fedspec simulate`; a target no "
        "noise level reaches is an error.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    plan.add_argument("--target-epsilon", type=float, help="each client's ε over the run (privacy.target_epsilon)")
    plan.add_argument("--delta", type=float, help="δ of every client (privacy.delta)")
    plan.add_argument("--noise-multiplier", type=float,
                      help="a given σ instead of planning it (privacy.noise_multiplier): see how many rounds fit")
    plan.add_argument("--budget-epsilon", type=float, help="the ε cap clients enforce (privacy.budget_epsilon)")
    plan.add_argument("--accountant", help="rdp or prv (privacy.accountant)")
    plan.add_argument("--clients", type=int, help="number of clients (federation.clients)")
    plan.add_argument("--rounds", type=int, help="number of rounds (federation.rounds)")
    plan.add_argument("--fraction", type=float, help="share of clients sampled per round (federation.fraction)")
    plan.add_argument("--local-steps", type=int, help="DP-SGD steps per client per round (train.local_steps)")
    plan.add_argument("--batch-size", type=int, help="expected (Poisson) batch size (train.batch_size)")
    plan.add_argument("--sizes", help="comma-separated record counts, one per client, instead of the configured data "
                      "(e.g. 1200,800,450); sets --clients")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (Hydra syntax)")

    creds = sub.add_parser(
        "credentials",
        help="create TLS certificates and SuperNode keys for a real (deployed) federation",
        description="Write a self-signed CA (ca.crt, ca.key), a SuperLink certificate signed by it (server.pem, "
        "server.key; valid for localhost, 127.0.0.1, ::1 and every --host) and one ECDSA P-384 key pair per "
        "SuperNode (supernodes/node-<i>, node-<i>.pub, OpenSSH format) into OUT_DIR. Private keys are mode 0600; "
        "existing credentials are never overwritten. With --renew-server: a new SuperLink certificate and key "
        "signed by OUT_DIR's CA (the old pair kept as *.old), so no node needs new files. See docs/deployment.md.",
    )
    creds.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the credentials into")
    creds.add_argument("--nodes", type=int, help="number of SuperNode key pairs (required unless --renew-server)")
    creds.add_argument("--renew-server", action="store_true",
                       help="only renew the SuperLink certificate of OUT_DIR, signed by its ca.key")
    creds.add_argument("--host", action="append", default=[], metavar="NAME",
                       help="a host name or IP address SuperNodes use to reach the SuperLink (repeatable)")
    creds.add_argument("--days", type=int, default=365,
                       help="validity of the SuperLink certificate in days (default 365; the CA's: 3650)")

    worker = sub.add_parser(
        "worker",
        help="keep a deployed node's model and data loaded between messages (a warm client)",
        description="Serve the messages this node's fedspec ClientApp forwards over a Unix socket, in one long-lived "
        "process that keeps torch, the model and the tokenized data loaded between rounds (Flower starts a new "
        "ClientApp process for every message; each would rebuild them). Start it as the SuperNode's user before the "
        "SuperNode, and give the SuperNode the socket in its node config: --node-config 'worker=\"PATH\" ...'. "
        "The socket is created mode 0600. Without a reachable worker the ClientApp runs the message itself. "
        "See docs/deployment.md.",
    )
    worker.add_argument("--socket", required=True, metavar="PATH", help="the Unix socket to listen on")

    link = sub.add_parser(
        "superlink",
        help="start Flower's SuperLink with TLS, node authentication and fedspec's safe defaults",
        description="Run flower-superlink in the foreground with TLS (the CA, certificate and key from --credentials), "
        "SuperNode authentication, its state in STATE_DIR/superlink.db (registered node keys survive a restart), "
        "and runtime dependency installation, telemetry and update checks off. --dry-run prints the Flower "
        "command. See docs/deployment.md.",
    )
    link.add_argument("--credentials", metavar="DIR", help="the folder `fedspec credentials` wrote")
    link.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    link.add_argument("--port", type=int, default=8000, help="port of the SuperLink's API (default 8000)")
    link.add_argument("--state-dir", default="superlink-state", help="where the SuperLink keeps its state")
    _add_launch_flags(link)

    node = sub.add_parser(
        "node",
        help="start a Flower SuperNode for fedspec, with its warm worker",
        description="Run this node's warm worker (`fedspec worker`: the model and data stay loaded between rounds), "
        "its ClientApp launcher (a pre-imported flwr-clientapp, forked per message) and flower-supernode in the "
        "foreground: TLS to the SuperLink (--ca), node authentication (--key), the "
        "node config fedspec reads (partition-id, state-dir, data-path, device) and the worker's socket, runtime "
        "dependency installation, telemetry and update checks off. Register the node's public key with the "
        "SuperLink first (flwr supernode register). --dry-run prints the commands. See docs/deployment.md.",
    )
    node.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    node.add_argument("--id", type=int, required=True, dest="partition_id", help="this client's id (partition-id)")
    node.add_argument("--ca", metavar="FILE", help="the federation's CA certificate (ca.crt)")
    node.add_argument("--key", metavar="FILE", help="this node's private key (supernodes/node-<i>)")
    node.add_argument("--data-path", metavar="FILE", help="this node's own data (else: its share of the task's)")
    node.add_argument("--num-partitions", type=int, help="shares of the task's data (without --data-path): the run's "
                      "federation.clients; a node with another number fails the server's first query and is left "
                      "out of the run (a client-error line)")
    node.add_argument("--device", metavar="DEVICE", help="where this node trains: auto, cpu, cuda or cuda:N "
                      "(default: the run's train.device, itself auto: the first GPU torch sees, else the CPU)")
    node.add_argument("--state-dir", required=True, metavar="DIR", help="the node's privacy ledger and worker socket")
    node.add_argument("--port", type=int, default=9094, help="the node's local Runtime API port (default 9094)")
    node.add_argument("--cold", action="store_true", help="no warm worker: every message rebuilds the model")
    # Linux only: forking a process that has imported system frameworks is unsafe on macOS
    node.add_argument("--no-launcher", dest="launcher", action="store_false", default=sys.platform == "linux",
                      help="let Flower start a fresh flwr-clientapp process for every message (~1 s of imports "
                      "each) instead of forking fedspec's pre-imported one (the default on Linux only)")
    node.add_argument("--idle-poll", type=float, default=DEFAULT_IDLE_POLL, metavar="SECONDS",
                      help=f"how long an idle node waits before asking the SuperLink for work again (default "
                      f"{DEFAULT_IDLE_POLL:g}; Flower's flower-supernode waits 3 s, which every message of a round pays)")
    _add_launch_flags(node)

    audit = sub.add_parser(
        "audit",
        help="empirical lower bound on epsilon from one run with canaries (Steinke, Nasr & Jagielski 2023)",
        description="Run one federation with M canaries (records of rare words with random labels) spread over the "
        "clients, each included with probability 1/2; then score every canary by how much training lowered its "
        "loss, guess which were included, and convert the correct guesses into a lower bound on epsilon at the "
        "stated confidence (Theorem 3.1 of 'Privacy Auditing with One (1) Training Run'). A DP run should give "
        "a bound below its accountant's epsilon. Writes runs/<name>/audit/report.{json,md} beside the run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    audit.add_argument("--canaries", type=int, help="number of canaries M (audit.canaries, e.g. 200)")
    audit.add_argument("--confidence", type=float, help="confidence of the bound (audit.confidence, default 0.95)")
    audit.add_argument("--clients", type=int, help="number of clients (federation.clients)")
    audit.add_argument("--rounds", type=int, help="number of rounds (federation.rounds)")
    audit.add_argument("--fraction", type=float, help="share of clients sampled per round (federation.fraction)")
    _add_common(audit)
    return parser


def _add_launch_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--insecure", action="store_true", help="no TLS, no node authentication: loopback only")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and environment, start nothing")


def _overrides(args: argparse.Namespace) -> list[str]:
    flags = {
        "clients": "federation.clients",
        "rounds": "federation.rounds",
        "fraction": "federation.fraction",
        "epochs": "train.epochs",
        "max_steps": "train.max_steps",
        "name": "run.name",
        "output_dir": "run.output_dir",
        "seed": "run.seed",
        "target_epsilon": "privacy.target_epsilon",
        "delta": "privacy.delta",
        "noise_multiplier": "privacy.noise_multiplier",
        "budget_epsilon": "privacy.budget_epsilon",
        "accountant": "privacy.accountant",
        "local_steps": "train.local_steps",
        "batch_size": "train.batch_size",
        "canaries": "audit.canaries",
        "confidence": "audit.confidence",
    }
    overrides = list(args.overrides)
    for bad in (o for o in overrides if "=" not in o):
        raise FedspecError(f"{bad!r} is not an override; write key=value (e.g. adapter.rank=16)")
    given = {o.split("=", 1)[0].lstrip("+~"): o for o in overrides}
    for flag, key in flags.items():
        value = getattr(args, flag, None)
        if value is not None:
            if key in given:  # two values for one key: refuse rather than silently prefer one
                raise FedspecError(f"--{flag.replace('_', '-')} {value} and {given[key]} both set {key}; give one")
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
    from .server.progress import rounds_table
    from .simulations.driver import simulate

    started = time.monotonic()
    result = simulate(_compose(args), console, overrides=_overrides(args))
    rows = _round_rows(result.paths)
    _table_console().print(rounds_table(rows, title=f"fedspec simulate — {escape(str(result.paths.root))}"))
    console.print(f"done in {time.monotonic() - started:.1f}s; summary: {escape(str(result.paths.summary))}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .centralized import epochs_table, train_centralized

    started = time.monotonic()
    result = train_centralized(_compose(args), console)
    _table_console().print(epochs_table(result.rows))
    console.print(f"done in {time.monotonic() - started:.1f}s; summary: {escape(str(result.paths.summary))}")
    return 0


def _round_rows(paths):
    from dataclasses import fields

    from .rundir import MetricsLog
    from .server.progress import RoundRow

    names = {f.name for f in fields(RoundRow)}
    # A round the server logged but did not checkpoint before a crash ran again after --resume: its last line holds
    last = {r["round"]: r for r in MetricsLog(paths.metrics).read() if r["kind"] == "round"}
    return [RoundRow(**{k: v for k, v in last[round_].items() if k in names}) for round_ in sorted(last)]


def cmd_privacy_report(args: argparse.Namespace) -> int:
    from .config import load_config_file
    from .rundir import MetricsLog, RunPaths

    paths = RunPaths(Path(args.run_dir))
    if not paths.config.is_file():
        raise FedspecError(f"{args.run_dir} is not a fedspec run folder (no config.yaml)")
    cfg = load_config_file(paths.config)
    if any(line["kind"] == "epoch" for line in MetricsLog(paths.metrics).read()):
        from .builders import InitStatistics
        from .centralized import write_central_privacy_report
        from .privacy import load_ledgers

        ledgers = load_ledgers(paths.ledgers) if paths.ledgers.is_dir() else {}
        statistics = InitStatistics.of(cfg).report(None)
        if statistics:  # how many records the statistic summed is known only from the report the run wrote
            statistics["init_statistics"] |= _written_count(paths.privacy / "report.json")
        write_central_privacy_report(cfg, paths, ledgers, statistics)
    else:
        from .server.reports import rewrite_run_privacy_report

        rewrite_run_privacy_report(cfg, paths)
    Console(emoji=False).print((paths.privacy / "report.md").read_text(), markup=False)
    return 0


def _written_count(report: Path) -> dict:
    """{"examples_total": N} from a privacy report a centralized run wrote (empty when it is gone or unreadable)."""
    import json

    try:
        section = json.loads(report.read_text())["extra"]["init_statistics"]
        return {"examples_total": int(section["examples_total"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise FedspecError(f"--sizes={text!r} is not a comma-separated list of record counts (e.g. 1200,800,450)") from None
    if not sizes or min(sizes) < 1:
        raise FedspecError(f"--sizes={text!r}: every client needs at least 1 record")
    return sizes


def _run_and_adapter(path: str) -> tuple[Path, Path]:
    """(run folder, adapter folder) of a run folder (its final adapter/) or of an adapter folder inside one: the
    commands that load a finished run take either, as their error for a folder that is neither says."""
    given = Path(path)
    if not (given / "config.yaml").is_file() and (given.parent / "config.yaml").is_file():
        return given.parent, given
    return given, given / "adapter"


def cmd_export_peft(args: argparse.Namespace) -> int:
    from .builders import write_peft_export
    from .trained import load_trained

    run_dir, adapter_dir = _run_and_adapter(args.adapter_dir)
    run = load_trained(run_dir, adapter_dir=adapter_dir)
    reason = write_peft_export(run.model, Path(args.out_dir), run.settings)
    if reason is not None:
        raise FedspecError(f"cannot export a PEFT LoRA adapter: {reason}")
    console.print(f"PEFT LoRA adapter written to {escape(args.out_dir)}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import json

    from .data.instructions import Conversations, load_prompts
    from .generation import generate_responses
    from .trained import load_trained

    if not args.prompt and not args.file:
        raise FedspecError("give --prompt TEXT (repeatable) or --file PROMPTS.jsonl")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:  # 0 fell back to the run's length unsaid
        raise FedspecError(f"--max-new-tokens {args.max_new_tokens}: the longest answer must be at least 1 token")
    run_dir, adapter_dir = _run_and_adapter(args.run_dir)
    run = load_trained(run_dir, adapter_dir=adapter_dir, with_adapter=not args.base)
    if not run.settings.causal_lm:
        raise FedspecError(f"{args.run_dir} trained a classifier: label texts with `fedspec predict`")
    # A run that cast classification data as generation trained on data.prompt around each record's text: a
    # --prompt is such a text, wrapped the same way (else the model sees a turn unlike any it learned from).
    template = run.cfg.data.get("prompt")
    turns = [template.replace("{text}", text) if template else text for text in args.prompt]
    records = Conversations([(("user", turn), ("assistant", "")) for turn in turns], [0] * len(turns), ["-"])
    from_file = load_prompts(args.file, template=template) if args.file else None
    if from_file is not None:
        records = Conversations([*records.records, *from_file.records], [0] * (len(records) + len(from_file)), ["-"])
    max_new = args.max_new_tokens or int(run.cfg.data.max_new_tokens)
    answers = generate_responses(run.model, run.tokenizer, records, max_new_tokens=max_new)
    for index, (record, answer) in enumerate(zip(records.records, answers)):
        if index < len(args.prompt):
            console.print(f"[bold]prompt:[/] {escape(record[0][1])}\n[bold]answer:[/] {escape(answer)}\n",
                          highlight=False)
        else:
            line = {"prompt": record[-2][1], "response": answer, **({"reference": record[-1][1]} if record[-1][1] else {})}
            print(json.dumps(line, ensure_ascii=False))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    from .data.sources import load_texts
    from .trained import classify, load_trained

    if not args.text and not args.file:
        raise FedspecError("give --text TEXT (repeatable) or --file TEXTS (one per line, or JSON lines)")
    texts = load_texts(args.file, args.field) if args.file else []
    run_dir, adapter_dir = _run_and_adapter(args.run_dir)
    run = load_trained(run_dir, adapter_dir=adapter_dir)
    predictions = classify(run, [*args.text, *texts])
    for text, prediction in zip(args.text, predictions):
        probability = prediction.probabilities[prediction.label]
        console.print(f"[bold]{escape(prediction.label)}[/] ({probability:.3f})  {escape(text)}",
                      highlight=False, soft_wrap=True)
    for text, prediction in zip(texts, predictions[len(args.text):]):
        print(json.dumps({"text": text, "label": prediction.label, "probabilities": prediction.probabilities},
                         ensure_ascii=False))
    return 0


def cmd_privacy_plan(args: argparse.Namespace) -> int:
    from .privacy.planning import PlanSettings, client_level_lines, plan_run
    from .render import plan_table

    sizes = _sizes(args.sizes) if args.sizes else None
    if sizes:  # --sizes sets the number of clients: another one beside it is refused, not silently replaced
        overridden = [o for o in args.overrides if o.split("=", 1)[0].lstrip("+~") == "federation.clients"]
        given = [(f"--clients {args.clients}", args.clients)] if args.clients is not None else []
        for text, value in [*given, *((o, o.split("=", 1)[1]) for o in overridden)]:
            if str(value).strip() != str(len(sizes)):
                raise FedspecError(f"--sizes lists {len(sizes)} clients, and {text} sets another number; give one")
        if not overridden:
            args.clients = len(sizes)
    cfg = _compose(args)
    if not cfg.privacy.enabled and not cfg.privacy.client_level.enabled:
        raise FedspecError("privacy.enabled=false and privacy.client_level.enabled=false: there is nothing to plan")
    if sizes is None:
        from .simulations.driver import client_sizes

        sizes = client_sizes(cfg)
    plan = plan_run(PlanSettings.of(cfg), sizes, rounds_limit=10 * int(cfg.federation.rounds))
    out = _table_console()
    if plan.clients:
        out.print(plan_table(cfg, plan.clients))
        short = [p for p in plan.clients if p.rounds_within_budget is not None and p.rounds_within_budget < cfg.federation.rounds]
        if short:
            out.print(f"{len(short)} of {len(plan.clients)} clients run out of budget before round "
                      f"{cfg.federation.rounds} if sampled every round; they will decline the rounds beyond it.")
        never = [p.client for p in short if p.rounds_within_budget == 0]
        if never:
            who = f"client {never[0]}" if len(never) == 1 else f"clients {', '.join(map(str, never))}"
            out.print(f"{len(never)} of them ({who}) cannot take part in a single "
                      "round at this σ: raise privacy.noise_multiplier or the budget, or plan σ from "
                      "privacy.target_epsilon instead.")
    if plan.client_level:
        out.print("\n".join(client_level_lines(plan.client_level)))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from .privacy.audit import summary_lines
    from .simulations.audit import run_audit

    started = time.monotonic()
    outcome = run_audit(_compose(args), console)
    claimed = {"record-level ε claimed by the accountant (max over clients)": outcome.claimed_epsilon}
    if outcome.client_level_epsilon is not None:
        claimed["client-level ε claimed by the accountant"] = outcome.client_level_epsilon
    Console().print("\n".join(summary_lines(outcome.result, claimed)))
    report = outcome.paths.root / "audit" / "report.md"
    console.print(f"done in {time.monotonic() - started:.1f}s; audit report: {escape(str(report))}")
    return 0


def cmd_credentials(args: argparse.Namespace) -> int:
    from .deployment import create_credentials, renew_server_certificate

    if args.renew_server:
        if args.nodes is not None:  # it would be ignored: the user would expect node keys that were never written
            raise FedspecError("--nodes does not go with --renew-server, which writes only a new SuperLink "
                               "certificate and keeps every node's files; node keys come with a new credentials folder")
        creds = renew_server_certificate(args.out_dir, args.host, args.days)
        print(f"wrote {creds.server_cert} and {creds.server_key} (the old pair: *.old); restart the SuperLink "
              "with them: the nodes keep their ca.crt and keys")
        return 0
    if args.nodes is None:
        raise FedspecError("--nodes N is required: the number of SuperNode key pairs to create")
    creds = create_credentials(args.out_dir, args.nodes, args.host, args.days)
    lines = [
        f"wrote {creds.root}:",
        "  ca.crt        give to every SuperNode and flwr CLI user (--root-certificates / root-certificates)",
        "  ca.key        signs server certificates only: keep it offline",
        "  server.pem, server.key   for the SuperLink (--ssl-certfile / --ssl-keyfile)",
    ]
    if creds.nodes:
        lines.append(f"  supernodes/node-0 .. node-{creds.nodes - 1}   private keys: each goes to its SuperNode only")
        lines.append("  supernodes/node-<i>.pub   register with: flwr supernode register <file> <connection>")
    print("\n".join(lines))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from fedspec.client import local_round, runtime  # noqa: F401 — torch and the model code load once, now
    from fedspec.client.app import local_handlers
    from fedspec.client.warm import serve

    serve(args.socket, local_handlers())
    return 0


def cmd_superlink(args: argparse.Namespace) -> int:
    from .launch import run, superlink_launch

    launch = superlink_launch(args.credentials and Path(args.credentials), host=args.host, port=args.port,
                              state_dir=Path(args.state_dir), insecure=args.insecure)
    if args.dry_run:
        print(launch.describe())
        return 0
    return run(launch, Path.cwd())


def cmd_node(args: argparse.Namespace) -> int:
    from .launch import node_launch, run

    launch = node_launch(args.superlink, partition_id=args.partition_id, ca=args.ca and Path(args.ca),
                         key=args.key and Path(args.key), state_dir=Path(args.state_dir),
                         data_path=args.data_path and Path(args.data_path), port=args.port, device=args.device,
                         num_partitions=args.num_partitions, warm=not args.cold, insecure=args.insecure,
                         idle_poll=args.idle_poll, launcher=args.launcher)
    if args.dry_run:
        print(launch.describe())
        return 0
    return run(launch, Path(args.state_dir))


COMMANDS = {
    "simulate": cmd_simulate,
    "superlink": cmd_superlink,
    "node": cmd_node,
    "worker": cmd_worker,
    "train": cmd_train,
    "privacy-report": cmd_privacy_report,
    "privacy-plan": cmd_privacy_plan,
    "credentials": cmd_credentials,
    "audit": cmd_audit,
    "export-peft": cmd_export_peft,
    "generate": cmd_generate,
    "predict": cmd_predict,
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
        console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted; continue the run with --resume --name <name>")
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The adapter methods side by side: trainable parameters, init time, and centralized accuracy after the same short
DP training, on the default MiniLM and SST-2.

Every method runs `fedspec train` with the same overrides (only ``adapter.method`` changes), one after another in
this process, and the table is printed (and written with ``--out``):

    python benchmarks/methods_table.py --data /work/shared/data/sst2 --out docs/methods_table.md
    python benchmarks/methods_table.py --methods corda eva --extra privacy.private_init_stats=true

"Init" is what the adapter costs before training: the calibration statistics (data-driven methods) plus the
decompositions, measured inside the run. Accuracy is on the held-out records after ``train.epochs`` epochs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from fedspec.adapters import METHODS
from fedspec.adapters.state import INIT_KEYS, WEIGHTS_FILE
from fedspec.centralized import train_centralized
from fedspec.config import compose_config
from fedspec.rundir import MetricsLog

DEFAULT_METHODS = ["lora", "pissa", "milora", "olora", "soma", "corda", "eva", "lora_ga", "fwsvd"]
FEDERATED = {
    "lowrank": "exact under fedsvd / ffa (A frozen on clients, ΔW linear in B); fedit averages factors (inexact)",
}


def common_overrides(data: Path) -> list[str]:
    return [
        "data=sst2", f"data.path={data / 'train.tsv'}", f"data.eval_path={data / 'validation.tsv'}",
        "data.max_examples=2000", "data.eval_examples=500", "train.epochs=1", "train.batch_size=64", "train.lr=0.01",
    ]


def trainable_parameters(adapter_dir: Path) -> tuple[int, int]:
    """(adapter factors, all trainable incl. the head) from the saved adapter (init factors excluded)."""
    factors = total = 0
    with safe_open(str(adapter_dir / WEIGHTS_FILE), "pt") as f:
        for key in f.keys():
            if key.endswith(INIT_KEYS):
                continue
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= d
            total += n
            if ".lora_A." in key or ".lora_B." in key:
                factors += n
    return factors, total


def run(method: str, overrides: list[str], out_dir: Path) -> dict:
    cfg = compose_config([*overrides, f"adapter.method={method}", f"run.name={method}", f"run.output_dir={out_dir}",
                          "run.progress=false"])
    started = time.monotonic()
    result = train_centralized(cfg)
    wall = time.monotonic() - started
    log = MetricsLog(result.paths.metrics).read()
    init = next(r for r in log if r["kind"] == "init")
    factors, total = trainable_parameters(result.paths.adapter)
    final = result.rows[-1]
    spec = METHODS[method]
    return {
        "method": method,
        "factors": factors,
        "trainable": total,
        "init_s": init["seconds"],
        "calibration": init["calibration_examples"],
        "privatized": init["statistics_privatized"],
        "accuracy": final.eval_accuracy,
        "start_accuracy": result.rows[0].eval_accuracy,
        "epsilon": final.epsilon,
        "wall_s": wall,
        "federated": spec.federated,
        "init_needs": spec.init_needs,
    }


def markdown(rows: list[dict], overrides: list[str]) -> str:
    lines = [
        f"`fedspec train {' '.join(overrides)} adapter.method=<method>` (MiniLM, query/value, rank 8, DP-SGD ε ≤ 8 "
        f"at δ = 1e-5), one run each, CPU, {torch.get_num_threads()} torch thread(s):",
        "",
        "| method | trainable: factors (+ head) | init (s) | calibration records | accuracy before → after | ε | "
        "federated rule | init needs |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        eps = "—" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        calib = "—" if not r["calibration"] else f"{r['calibration']}{' (privatized)' if r['privatized'] else ''}"
        lines.append(
            f"| {r['method']} | {r['factors']:,} (+{r['trainable'] - r['factors']:,}) | {r['init_s']:.2f} | {calib} | "
            f"{r['start_accuracy']:.3f} → {r['accuracy']:.3f} | {eps} | {FEDERATED.get(r['federated'], r['federated'])} "
            f"| {r['init_needs']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2")
    parser.add_argument("--methods", nargs="*", default=DEFAULT_METHODS)
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides, the same for every method")
    parser.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared, loaded machine multi-threaded LAPACK stalls)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = [*common_overrides(args.data), *args.extra]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedspec-methods-") as tmp:
        for method in args.methods:
            rows.append(run(method, overrides, Path(tmp)))
            print(f"{method}: accuracy {rows[-1]['accuracy']:.3f}, init {rows[-1]['init_s']:.2f}s, "
                  f"wall {rows[-1]['wall_s']:.0f}s", flush=True)
    table = markdown(rows, overrides)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)


if __name__ == "__main__":
    main()

"""Every adapter method side by side: trainable parameters, init time, and centralized accuracy after the same
short DP training on SST-2, on the default MiniLM, and which methods federate exactly.

Every method runs `fedspec train` with the same overrides (only ``adapter.method`` changes, so rank 8, α = r,
targets query/value, DP-SGD with ε ≤ 8 at δ = 1e-5 and each method's default options), one after another in this
process; the table is printed and written with ``--out``:

    python benchmarks/methods_table.py --out docs/methods_table.md
    python benchmarks/methods_table.py --methods corda eva --extra privacy.private_init_stats=true

"Init" is what the adapter costs before training, measured inside the run: the calibration statistics
(data-driven methods) plus the decompositions. Accuracy is on 500 held-out records after ``train.epochs`` epochs,
one run each with fresh noise: one binomial standard deviation is about 2 points.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from fedspec.adapters import METHODS
from fedspec.centralized import train_centralized
from fedspec.config import compose_config
from fedspec.rundir import MetricsLog

# Trainable parameters of one d×d layer at rank r (SALT: r_L its residual LoRA rank; EVA: r_l the layer's rank).
PER_LAYER = {
    "lora": "2dr", "pissa": "2dr", "milora": "2dr", "olora": "2dr", "soma": "2dr", "corda": "2dr", "eva": "2d·r_l",
    "lora_ga": "2dr", "fwsvd": "2dr (replaces d²)", "sorsa": "r(2d+1)", "kasa": "r(2d+1)",
    "adalora": "r(2d+1), pruned", "sora": "r(2d+1), gated", "lora_xs": "r²", "effort": "r(2d+1)", "svfit": "r",
    "clip_svd": "d", "salt": "2r+2(d−r)r_L", "loldu": "r+1", "sst": "d+2dr", "dora": "2dr+d",
}
# Whether the server's aggregate equals the average of the clients' adapted weights (see the README).
FEDERATED_EXACT = {
    "lowrank": "**yes** with fedsvd / ffa (A frozen, ΔW linear in B)",
    "linear": "**yes** with fedavg",
    "nonlinear": "no: fedavg approximates (products of trained tensors)",
}
NOTES = {
    "loldu": "**yes** with fedavg (z; σ server-owned)",
    "salt": "α, β yes while α⊙σ+β ≥ 0; X·Y no",
    "dora": "no: fedavg approximates (row normalization)",
    "sst": "no: fedavg approximates; server resamples",
}


def common_overrides(data: Path) -> list[str]:
    return [
        "data=sst2", f"data.path={data / 'train.tsv'}", f"data.eval_path={data / 'validation.tsv'}",
        "data.max_examples=2000", "data.eval_examples=500", "train.epochs=1", "train.batch_size=64",
        "train.optimizer=adam", "train.lr=0.01",  # the recipe the table was measured with (32 centralized steps)
        "adapter.rank=8",
    ]


def run(method: str, overrides: list[str], out_dir: Path) -> dict:
    cfg = compose_config([f"adapter={method}", *overrides, f"run.name={method}", f"run.output_dir={out_dir}",
                          "run.progress=false"])
    started = time.monotonic()
    result = train_centralized(cfg)
    wall = time.monotonic() - started
    init = next(r for r in MetricsLog(result.paths.metrics).read() if r["kind"] == "init")
    spec = METHODS[method]
    return {
        "method": method,
        "adapter": init["trainable_adapter"],
        "other": init["trainable_other"],
        "init_s": init["seconds"],
        "calibration": init["calibration_examples"],
        "privatized": init["statistics_privatized"],
        "accuracy": result.rows[-1].eval_accuracy,
        "start_accuracy": result.rows[0].eval_accuracy,
        "epsilon": result.rows[-1].epsilon,
        "wall_s": wall,
        "exact": NOTES.get(method, FEDERATED_EXACT[spec.federated]),
        "init_needs": spec.init_needs,
    }


def markdown(rows: list[dict], overrides: list[str]) -> str:
    lines = [
        f"`fedspec train adapter=<method> {' '.join(overrides)}` (MiniLM, query/value, rank 8, DP-SGD ε ≤ 8 "
        f"at δ = 1e-5), one run each, CPU, {torch.get_num_threads()} torch thread(s):",
        "",
        "| method | trainable per d×d layer | trainable on MiniLM (+ head) | init (s) | calibration records "
        "| accuracy before → after | ε | federated-exact | init needs |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        eps = "—" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        calib = "—" if not r["calibration"] else f"{r['calibration']}{' (privatized)' if r['privatized'] else ''}"
        lines.append(
            f"| `{r['method']}` | {PER_LAYER.get(r['method'], '?')} | {r['adapter']:,} (+{r['other']:,}) "
            f"| {r['init_s']:.2f} | {calib} | {r['start_accuracy']:.3f} → {r['accuracy']:.3f} | {eps} "
            f"| {r['exact']} | {r['init_needs']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), help="default: every registered method")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides, the same for every method")
    parser.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared, loaded machine multi-threaded LAPACK stalls)")
    args = parser.parse_args()
    if not (args.data / "train.tsv").is_file():
        parser.error(f"{args.data}/train.tsv does not exist; pass --data DIR with SST-2's train.tsv and validation.tsv")
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

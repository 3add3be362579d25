"""Benchmark of the structured adapter methods (shapes 2–4 and DoRA) on the default MiniLM, with LoRA and PiSSA as
baselines in the same run: trainable adapter parameters (for a d×d layer and the real count on MiniLM's
query/value), initialization time, and accuracy after the same short DP training on SST-2.

    python benchmarks/structured_methods.py [--data ../shared/data/sst2] [--methods sorsa kasa ...] [--skip-train]

Every method runs the same command, `fedspec train` with these overrides (only adapter.method changes, so rank,
α, targets and DP settings are identical):

    data=sst2 data.path=<data>/train.tsv data.eval_path=<data>/validation.tsv data.max_examples=2000
    data.eval_examples=500 train.epochs=1 train.batch_size=64 train.lr=0.01 adapter.method=<m>

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_METHODS = ["lora", "pissa", "sorsa", "kasa", "adalora", "sora", "lora_xs", "effort", "svfit", "clip_svd",
                   "salt", "loldu", "sst", "dora"]
FEDERATED_EXACT = {"lora_xs": "yes (R)", "svfit": "yes (σ′)", "clip_svd": "yes (s)", "loldu": "yes (z; σ server-owned)",
                   "salt": "α, β only (while α⊙σ+β ≥ 0); X·Y: no", "lora": "with FFA/FedSVD", "pissa": "with FFA/FedSVD"}
# Trainable parameters of one d×d layer at rank r (SALT: r_L the residual LoRA rank).
PER_LAYER = {
    "lora": "2dr", "pissa": "2dr", "sorsa": "r(2d+1)", "kasa": "r(2d+1)", "adalora": "r(2d+1)", "sora": "r(2d+1)",
    "lora_xs": "r²", "effort": "r(2d+1)", "svfit": "r", "clip_svd": "d", "salt": "2r+2(d−r)r_L", "loldu": "r+1",
    "sst": "d+2dr", "dora": "2dr+d",
}


def _overrides(data: Path, method: str, out: str) -> list[str]:
    return [
        "data=sst2", f"data.path={data}/train.tsv", f"data.eval_path={data}/validation.tsv", "data.max_examples=2000",
        "data.eval_examples=500", "train.epochs=1", "train.batch_size=64", "train.lr=0.01",
        f"adapter.method={method}", f"run.output_dir={out}", f"run.name=bench-{method}", "run.progress=false",
    ]


def _init_time_and_count(cfg, repeats: int) -> tuple[float, int]:
    """Median wall time of ``fedspec.adapt`` on a freshly loaded model (the initializer's SVD/LU and the layer
    set-up, as `fedspec train` runs it), and the number of trainable adapter tensors (the head excluded)."""
    from omegaconf import OmegaConf

    from fedspec.adapters import adapt
    from fedspec.models import build_classifier

    a = cfg.adapter
    times, count = [], 0
    for _ in range(repeats):
        model, _ = build_classifier(cfg.model, 2, seed=cfg.run.seed)
        started = time.perf_counter()
        adapt(model, a.method, a.rank, list(a.targets) if a.targets else None, alpha=a.alpha, seed=cfg.run.seed,
              svd_method=a.svd_method, niter=a.niter, oversample=a.oversample,
              **OmegaConf.to_container(a.options, resolve=True))
        times.append(time.perf_counter() - started)
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return statistics.median(times), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"))
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--repeats", type=int, default=3, help="initialization timings per method (median)")
    parser.add_argument("--skip-train", action="store_true", help="only parameters and initialization time")
    args = parser.parse_args()

    from fedspec.centralized import train_centralized
    from fedspec.config import compose_config

    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for method in args.methods:
            cfg = compose_config(_overrides(Path(args.data), method, out))
            seconds, count = _init_time_and_count(cfg, args.repeats)
            accuracy = epsilon = train_seconds = None
            if not args.skip_train:
                started = time.perf_counter()
                result = train_centralized(cfg)
                train_seconds = time.perf_counter() - started
                accuracy, epsilon = result.rows[-1].eval_accuracy, result.rows[-1].epsilon
            rows.append((method, PER_LAYER.get(method, "?"), count, seconds, accuracy, epsilon, train_seconds))
            print(f"{method}: {count} params, init {seconds:.3f}s, accuracy {accuracy}", flush=True)

    print()
    print("| method | trainable per d×d layer | trainable on MiniLM q,v (r = 8) | init time (s) | SST-2 accuracy "
          "| ε | train time (s) | FedAvg exact |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for method, formula, count, seconds, accuracy, epsilon, train_seconds in rows:
        acc = "—" if accuracy is None else f"{accuracy:.3f}"
        eps = "—" if epsilon is None else f"{epsilon:.2f}"
        secs = "—" if train_seconds is None else f"{train_seconds:.0f}"
        print(f"| `{method}` | {formula} | {count:,} | {seconds:.3f} | {acc} | {eps} | {secs} | "
              f"{FEDERATED_EXACT.get(method, 'no (approximate)')} |")


if __name__ == "__main__":
    main()

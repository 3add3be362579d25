"""Run finished study cells again and compare each with its stored record.

    python benchmarks/rerun_cells.py methods:sst2-ffa-pissa-eps3-dir0.5-s0-lr2 defaults:sst2-fedsvd-pissa-eps3-dir0.5-s0-lr16

A cell's seed fixes its records, partitions, initialization and sampling, but not its DP noise, which every run
draws afresh from the operating system's entropy (noise reproducible from a seed in the config would be noise an
observer could subtract). So a rerun is a second draw of the same configuration: how far it lands from the stored
record is the run-to-run spread that DP noise alone causes, and a stored record far outside it is suspect (e.g. one
resumed before fedspec replayed the updates its clients had already released: docs/study.md). The stored records
are left as they are; the reruns' records go to benchmarks/results/accuracy/reruns/GRID/cells/ (a killed rerun
continues from its checkpoint, a finished one is not run again). The table's sweep score is what a learning-rate
sweep compares: the mean accuracy of the last 3 rounds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import study_cells
from accuracy import DEFAULT_DATA, DEFAULT_OUT, load_results, run_cell, save_result
from study_cells import with_lr


def find_cell(grid: study_cells.Grid, key: str, lr: float) -> study_cells.Cell:
    cells = [*study_cells.tuning_cells(grid), *(with_lr(cell, lr) for cell in study_cells.final_cells(grid))]
    matches = [cell for cell in cells if cell.key == key]
    if not matches:
        raise SystemExit(f"grid {grid.name} has no cell {key}")
    return matches[0]


def parse_job(text: str) -> tuple[str, str]:
    grid, _, key = text.partition(":")
    if grid not in study_cells.GRIDS or not key:
        grids = ", ".join(sorted(study_cells.GRIDS))
        raise argparse.ArgumentTypeError(f"{text!r}: give GRID:KEY with GRID one of {grids}")
    return grid, key


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jobs", nargs="+", type=parse_job, metavar="GRID:KEY", help="a finished cell of a grid")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with sst2/ and agnews/")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"the study's results folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    rows = [("| cell | final accuracy: stored | rerun | rerun − stored | sweep score: stored | rerun "
             "| whole sentences: stored | rerun | stored run resumed |"),
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for grid_name, key in args.jobs:
        grid = study_cells.GRIDS[grid_name]
        stored = load_results(args.out / grid_name).get(key)
        if stored is None:
            raise SystemExit(f"{grid_name}:{key} has not finished; a rerun compares with a finished cell")
        out = args.out / "reruns" / grid_name
        rerun = load_results(out).get(key)
        if rerun is None:
            print(f"running {key} again …", flush=True)
            rerun = run_cell(find_cell(grid, key, stored["lr"]), grid, out, args.data)
            save_result(out, rerun)
        difference = f"{rerun['accuracy'] - stored['accuracy']:+.4f}".replace("-", "−")
        rows.append(" | ".join([
            f"| {grid_name}:{key}", _fmt(stored["accuracy"]), _fmt(rerun["accuracy"]), difference,
            _fmt(stored["score"]), _fmt(rerun["score"]), _fmt(stored.get("subgroup_accuracy")),
            _fmt(rerun.get("subgroup_accuracy")), f"{'yes' if stored.get('resumed') else 'no'} |"]))
        print(json.dumps({"key": key, "stored": stored["curve"], "rerun": rerun["curve"]}), flush=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

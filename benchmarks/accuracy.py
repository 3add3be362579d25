"""The accuracy study: what federated DP fine-tuning reaches on real data, and what privacy costs.

    python benchmarks/accuracy.py                      # the headline grids in turn, then docs/results.md
    python benchmarks/accuracy.py --grid minimum       # the issue's minimum grid (days of CPU; hours on a GPU)
    python benchmarks/accuracy.py --shard 0/4          # this process's quarter of the cells (shards share --out)
    python benchmarks/accuracy.py --report             # only rewrite docs/results.md (and its grids' pages)
    python benchmarks/accuracy.py --grid quick         # the first grid: SST-2 and AG News, half the clients a round
    python benchmarks/accuracy.py --grid defaults      # the SST-2 defaults vs centralized DP: docs/results-defaults.md
    python benchmarks/accuracy.py --grid batch32       # the batch-32 recipe SST-2 had before, across ε
    python benchmarks/accuracy.py --grid methods       # every strategy and adapter at the batch-32 recipe's point
    python benchmarks/accuracy.py --grid partitions    # the batch-32 recipe under Dirichlet 0.1, 0.5 and IID clients
    python benchmarks/accuracy.py --grid records       # every SST-2 record, batches of 128: less noise per step
    python benchmarks/accuracy.py --grid rounds15      # the defaults at ε = 3 with 15 rounds: the last-rounds target

Every cell is one real run — `fedspec simulate` (Flower's simulation runtime, Opacus DP-SGD on every client)
or `fedspec train` (the centralized baseline at the same ε and a matched number of DP-SGD steps) — in its own
process, on the real SST-2 / AG News files. A cell's result is one JSON file written when it finishes, so a
killed study continues where it stopped (a half-finished federation resumes from its last checkpoint). Grids share
runs: a cell whose configuration another grid has finished (under the same --out) is adopted from it, not run again.

Learning rates are tuned per (dataset, strategy, adapter) on a validation split carved from the *training*
file (`data.validation=true`); the chosen rate then runs on the evaluation file, which no run trains or tunes on.
So a final cell can run only once every cell of its sweep has finished, whichever shard ran them.

Shards: `--shard I/N` runs every N-th sweep cell and every N-th final, a final's shard fixed by its configuration
before the rate is chosen. Shards that share one --out folder (processes on one machine) see each other's results:
a shard with nothing to run while its finals wait for sweep cells another shard runs waits for them (reading cells/
every --wait-interval seconds), and exits once its own cells are all done.
Shards on separate machines, each with its own --out, cannot see each other's sweeps: run them with --no-wait, copy
their cells/ folders together, then run every shard again (or one process without --shard) for the finals; only
then `--report` has them all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import study_cells
from study_cells import Cell, Grid, with_lr
from study_report import write_report, write_summary

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "accuracy"
DEFAULT_DATA = ROOT.parent / "shared" / "data"


def run_cell(cell: Cell, grid: Grid, out: Path, data_root: Path) -> dict:
    """Run one cell to completion (resuming a federation that was killed) and return its result record."""
    runs = out / "runs"
    run_dir = runs / cell.key
    command = [sys.executable, "-m", "fedspec.cli", *study_cells.command(cell, grid, data_root),
               f"run.output_dir={runs}", f"run.name={cell.key}", "run.progress=false"]
    resuming = cell.strategy != "centralized" and (run_dir / "checkpoints").is_dir()
    if resuming:
        command.append("run.resume=true")
    elif run_dir.exists():  # a killed centralized run (or one killed before its first checkpoint) starts over
        _remove(run_dir)
    log = out / "logs" / f"{cell.key}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    code = code_state()  # before the run starts: a commit made while it runs is not the code it ran
    started = time.monotonic()
    env = {**os.environ, "FLWR_HOME": str(out / "flwr-home")}
    with log.open("a") as handle:
        done = subprocess.run(command, check=False, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"cell {cell.key} failed (exit {done.returncode}); see {log}")
    record = study_cells.result(cell, run_dir, seconds=time.monotonic() - started, resumed=resuming)
    return {**record, **code}


def code_state() -> dict:
    """The fedspec commit a cell runs on, and whether tracked files differed from it (results of different code
    must not be pooled silently). None for both outside a git checkout."""
    commit = _git("rev-parse", "--short", "HEAD")
    changed = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit or None,
            "uncommitted_changes": None if commit is None or changed is None else bool(changed)}


def _git(*args: str) -> str | None:
    """The output of a git command in the fedspec checkout, or None where it fails."""
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def save_result(out: Path, result: dict) -> None:
    """Atomically: a result file exists only for a finished cell."""
    path = out / "cells" / f"{result['key']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)


def load_results(out: Path) -> dict[str, dict]:
    folder = out / "cells"
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def adopt_shared_results(grid: Grid, root: Path, data_root: Path) -> list[str]:
    """Copy into ``root/<grid>/cells`` each finished cell of another grid under ``root`` that ran the configuration
    this grid's command for that cell composes (the defaults grid's ε = 3 cells are the records grid's finals, the
    minimum grid's sweep holds the methods grid's), marked with the grid it came from. Returns the keys adopted.

    Same key is not enough: the steps grid's `fedspec train` cells have the records grid's keys but train longer.
    A cell adopted before that no longer runs this grid's configuration (the grid was redefined) is dropped."""
    out = root / grid.name
    have = load_results(out)
    wanted = {cell.key: cell for cell in study_cells.tuning_cells(grid)}
    for cell in study_cells.final_cells(grid):  # at every rate its sweep could choose
        wanted |= {c.key: c for c in (with_lr(cell, lr) for lr in study_cells.lrs_for(grid, cell.strategy))}
    for key, record in list(have.items()):
        source = study_cells.GRIDS.get(record.get("shared_from", ""))
        if source and (key not in wanted or not study_cells.same_run(wanted[key], grid, source, data_root)):
            (out / "cells" / f"{key}.json").unlink()
            del have[key]
    adopted = []
    for other in study_cells.GRIDS.values():
        if other.name == grid.name or not (root / other.name / "cells").is_dir():
            continue
        for key, record in load_results(root / other.name).items():
            cell = wanted.get(key)
            if cell is None or key in have or not study_cells.same_run(cell, grid, other, data_root):
                continue
            have[key] = {**record, "shared_from": record.get("shared_from", other.name)}
            save_result(out, have[key])
            adopted.append(key)
    return adopted


def pending_cells(grid: Grid, results: dict[str, dict]) -> tuple[list[Cell], list[Cell]]:
    """(cells to run now, final cells still waiting for their learning-rate sweep to finish)."""
    ready, waiting = [], []
    for cell in study_cells.tuning_cells(grid):
        if cell.key not in results:
            ready.append(cell)
    for cell in study_cells.final_cells(grid):
        lr = study_cells.chosen_lr(grid, cell, results)
        if lr is None:
            waiting.append(cell)
            continue
        cell = with_lr(cell, lr)
        if cell.key not in results:
            ready.append(cell)
    # One dataset at a time, and a group's final runs as soon as its sweep has chosen the rate: a study stopped
    # early has whole rows of results rather than scattered sweeps.
    ready.sort(key=lambda c: (grid.datasets.index(c.dataset), c.tune))
    return ready, waiting


def time_left(cells: list[Cell], results: dict[str, dict]) -> float | None:
    """Seconds the given cells will take, from the median wall time of the finished cells of the same kind (a sweep
    run or a final, federated or centralized: a final scores the whole evaluation file, `fedspec train` runs no
    federation), or of all finished cells where a kind has none yet. None before any cell ran from start to finish."""

    def kind(strategy: str, tune: bool) -> tuple[bool, bool]:
        return strategy == study_cells.CENTRALIZED, tune

    timed: dict[tuple[bool, bool], list[float]] = {}
    for record in results.values():
        if not record.get("resumed"):  # a resumed run's wall time counts only its last part
            timed.setdefault(kind(record["strategy"], record["tune"]), []).append(record["seconds"])
    everything = [seconds for times in timed.values() for seconds in times]
    if not everything:
        return None
    return sum(median(timed.get(kind(cell.strategy, cell.tune), everything)) for cell in cells)


def describe_duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def in_shard(cell: Cell, shard: tuple[int, int]) -> bool:
    """Whether ``shard`` (I, N) runs ``cell``. A final is placed by its key before the rate is chosen, so each shard
    knows its finals while their sweeps still run, whichever rate the sweep chooses."""
    placed = cell if cell.tune else with_lr(cell, None)
    return study_cells.stable_index(placed) % shard[1] == shard[0]


def describe_wait(grid: Grid, finals: list[Cell], results: dict[str, dict]) -> str:
    """What a shard with nothing to run waits for: the unfinished sweep cells of its waiting finals (all of them
    other shards' cells, or it would be running one)."""
    groups = {cell.group for cell in finals}
    sweeps = [c for c in study_cells.tuning_cells(grid) if c.group in groups and c.key not in results]
    return (f"{len(finals)} finals of this shard wait for {len(sweeps)} sweep cells other shards run "
            f"(e.g. {sweeps[0].key})")


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: give I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: I must be in 0..N-1")
    return i, n


def shard_plan(
    ready: list[Cell], waiting: list[Cell], results: dict[str, dict], shard: tuple[int, int]
) -> tuple[list[Cell], list[Cell], float | None]:
    """Of every shard's pending cells (``pending_cells``), this shard's: (cells to run now, finals waiting for their
    sweep, seconds all of them will take or None)."""
    mine, mine_waiting = ([c for c in cells if in_shard(c, shard)] for cells in (ready, waiting))
    return mine, mine_waiting, time_left(mine + mine_waiting, results)


def run_cells(grid: Grid, out: Path, args: argparse.Namespace, budget: int | None) -> int:
    """Run this shard's cells of the grid that have not finished (at most ``budget``); returns how many ran."""
    ran = 0
    said = None  # what this shard last said it waits for
    while budget is None or ran < budget:
        results = load_results(out)
        ready, waiting = pending_cells(grid, results)
        mine, mine_waiting, left = shard_plan(ready, waiting, results, args.shard)
        eta = "" if left is None else f"about {describe_duration(left)} left"
        if not mine:
            if not mine_waiting:
                break  # all of this shard's cells are done
            waits = describe_wait(grid, mine_waiting, results)
            if args.no_wait:
                print(f"{waits}: once those are in cells/ (copied from the other machines), run this shard again",
                      flush=True)
                break
            if waits != said:  # once, and again as other shards finish sweep cells
                print(f"{waits}; reading cells/ every {args.wait_interval:g} s (separate machines: --no-wait)",
                      flush=True)
                said = waits
            time.sleep(args.wait_interval)
            continue
        cell = mine[0]
        total = len(study_cells.tuning_cells(grid)) + len(study_cells.final_cells(grid))
        done = total - len(ready) - len(waiting)  # not len(results): a widened sweep leaves finals at other rates
        print(f"[{done + 1}/{total}] {cell.describe()} …" + (f" ({eta})" if eta else ""), flush=True)
        result = run_cell(cell, grid, out, args.data)
        save_result(out, result)
        ran += 1
        print(f"    {result['summary']} ({result['seconds']:.0f} s)", flush=True)
    return ran


def list_cells(grid: Grid, out: Path, shard: tuple[int, int]) -> None:
    results = load_results(out)
    mine, mine_waiting, left = shard_plan(*pending_cells(grid, results), results, shard)
    for cell in mine:
        print(cell.key)
    print(f"{len(mine)} to run in this shard; {len(mine_waiting)} wait for their learning-rate sweep"
          + ("" if left is None else f"; about {describe_duration(left)} left"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    headline = ", ".join(name for name, _ in study_cells.HEADLINE)
    parser.add_argument("--grid", choices=sorted(study_cells.GRIDS), default=None,
                        help=f"one grid (default: the grids of docs/results.md, in turn: {headline})")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), help="I/N: run every N-th cell from the I-th")
    parser.add_argument("--wait-interval", type=float, default=30.0, metavar="SECONDS",
                        help="how often a shard whose finals wait for other shards' sweeps reads cells/ (default 30)")
    parser.add_argument("--no-wait", action="store_true",
                        help="exit instead of waiting for other shards' sweeps (shards on separate machines)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with sst2/ and agnews/")
    parser.add_argument("--page", type=Path, default=None,
                        help="the page to write (default: docs/results-GRID.md with --grid, else docs/results.md, "
                             "each of its grids' own page beside it)")
    parser.add_argument("--report", action="store_true", help="only rewrite the pages from the finished cells")
    parser.add_argument("--max-cells", type=int, default=None, help="stop after this many cells (then report)")
    parser.add_argument("--list", action="store_true", help="list the cells still to run and exit")
    args = parser.parse_args(argv)
    names = [args.grid] if args.grid else [name for name, _ in study_cells.HEADLINE]
    summary = args.page or ROOT / "docs" / "results.md"  # without --grid: the headline page, its grids' beside it
    finished: dict[str, dict[str, dict]] = {}
    budget = args.max_cells
    for name in names:
        grid = study_cells.GRIDS[name]
        out = args.out / grid.name
        adopted = adopt_shared_results(grid, args.out, args.data)
        if adopted:
            print(f"{len(adopted)} cells adopted from other grids that ran the same configuration: "
                  f"{', '.join(adopted)}")
        if args.list:
            if not args.grid:
                print(f"grid {name}:")
            list_cells(grid, out, args.shard)
            continue
        if not args.report:
            missing = [d for d in grid.datasets if study_cells.needs_data_root(d) and not (args.data / d).is_dir()]
            if missing:
                parser.error(f"--data {args.data} has no {', '.join(missing)}/ folder")
            ran = run_cells(grid, out, args, budget)
            budget = None if budget is None else budget - ran
        finished[name] = load_results(out)
        page = (args.page or ROOT / "docs" / f"results-{grid.name}.md") if args.grid else summary.with_name(
            f"results-{grid.name}.md")
        write_report(grid, finished[name], page, out)
        print(f"{len(finished[name])} cells done; wrote {page}")
        if budget is not None and budget <= 0:
            break
    if not args.grid and not args.list and len(finished) == len(names):
        sections = [(study_cells.GRIDS[name], question, finished[name]) for name, question in study_cells.HEADLINE]
        write_summary(sections, summary)
        print(f"wrote {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

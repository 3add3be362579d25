"""The accuracy study's pages from its finished cells: docs/results-GRID.md for each grid (a table of mean ± 95 % CI
over seeds, the plots, bytes sent per client per round, wall time, the sweep, and the cells still missing), and
docs/results.md, the headline grids' tables on one page with the generative benchmark."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path
from statistics import mean, stdev

import generative
from study_cells import (
    CENTRALIZED,
    Cell,
    Grid,
    chosen_lr,
    final_cells,
    last_rounds_drop,
    tuning_cells,
    with_lr,
)

COMMAND = "python benchmarks/accuracy.py --grid {grid}"


def confidence_interval(values: list[float], level: float = 0.95) -> float:
    """Half-width of the Student-t interval of the mean (0 for a single value: reported as n = 1)."""
    if len(values) < 2:
        return 0.0
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, len(values) - 1) * stdev(values) / math.sqrt(len(values)))


def _model(grid: Grid) -> str:
    chosen = [o.split("=", 1)[1] for o in grid.overrides if o.startswith("model=")]
    return chosen[-1] if chosen else "minilm (all-MiniLM-L6-v2)"


def _eps(value) -> str:
    return "∞" if value in ("inf", math.inf) else f"{float(value):g}"


def _mean_ci(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f} (n=1)"
    return f"{mean(values):.3f} ± {confidence_interval(values):.3f} (n={len(values)})"


def _config_groups(grid: Grid, results: dict[str, dict]) -> dict[tuple, list[dict]]:
    """Finished final cells grouped over seeds: (dataset, strategy, adapter, ε, partition) → records."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for cell in final_cells(grid):
        lr = chosen_lr(grid, cell, results)
        if lr is None:
            continue
        record = results.get(with_lr(cell, lr).key)
        if record is not None:
            groups[(cell.dataset, cell.strategy, cell.adapter, _eps(cell.epsilon), cell.partition)].append(record)
    return groups


def _data_scoring(grid: Grid) -> str:
    """How each data set of the grid trains and is scored."""
    scored = grid.overrides + grid.final_overrides + dict(grid.dataset_final_overrides).get("sst2", ())
    rows = "every row" if "data.eval_examples=0" in scored else "a 1,000-row sample"
    sst2_overrides = dict(grid.dataset_overrides).get("sst2", ()) + grid.overrides
    records = "20,000 records" if "data.max_examples=20000" in sst2_overrides else "every record"
    parts = {
        "sst2": (f"SST-2 trains on `train.tsv` ({records}) and is scored on `validation.tsv` ({rows}) and on its "
                 "whole sentences (≥ 15 words)."),
        "agnews": "AG News is scored on a stratified 1,000-record split carved from its file, never trained on.",
    }
    return " ".join(parts[d] for d in grid.datasets if d in parts)


def _lr_source(grid: Grid) -> str:
    if not grid.tuned:
        return ("No sweep in this grid: each strategy runs at the one learning rate in the lr column, the rate an "
                "earlier grid's sweep chose.")
    fixed = "".join(f" {s} runs at the one rate an earlier grid's sweep chose for it." for s in grid.fixed)
    return (f"The learning rate of each (data, strategy, adapter) was chosen by a sweep on a validation split carved "
            f"from the training file (ε = {_eps(grid.tune_epsilon)}, {grid.tune_partition}, seed {grid.seeds[0]})."
            + fixed)


def results_table(grid: Grid, results: dict[str, dict]) -> list[str]:
    from fedspec.privacy.accounting import epsilon_text  # rounded up, as every ε fedspec shows

    # Rows no training row contains: scored by cells that finished since the study began to score them.
    unseen_column = any(r.get("unseen_accuracy") is not None for r in results.values())
    lines = [("| data | strategy | adapter | ε | partition | lr | final accuracy | whole sentences "
              + ("| rows unseen in training " if unseen_column else "")
              + "| last-5 spread | last-5 drop | max client ε | bytes / client / round | minutes / run |"),
             "|---|---|---|---|---|---|---|---|" + ("---|" if unseen_column else "") + "---|---|---|---|---|"]
    for (dataset, strategy, adapter, eps, partition), records in sorted(_config_groups(grid, results).items()):
        subgroup = [r["subgroup_accuracy"] for r in records if r.get("subgroup_accuracy") is not None]
        unseen = [r["unseen_accuracy"] for r in records if r.get("unseen_accuracy") is not None]
        epsilons = [r["max_epsilon"] for r in records if r.get("max_epsilon") is not None]
        sent = [r["bytes_per_client_round"] for r in records if r.get("bytes_per_client_round")]
        cells = [
            dataset, strategy, adapter, eps, "pooled" if strategy == CENTRALIZED else partition, f"{records[0]['lr']:g}",
            _mean_ci([r["accuracy"] for r in records]),
            _mean_ci(subgroup) if subgroup else "—",
            *([_mean_ci(unseen) if unseen else "—"] if unseen_column else []),
            "—" if strategy == CENTRALIZED else f"{max(r['last5_spread'] for r in records):.3f}",  # one epoch
            "—" if strategy == CENTRALIZED else f"{max(last_rounds_drop(r['curve']) for r in records):.3f}",
            epsilon_text(max(epsilons)) if epsilons else "—",
            f"{mean(sent) / 1024:.0f} KiB" if sent else "—",
            _minutes(records),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def stopped_section(grid: Grid, results: dict[str, dict]) -> list[str]:
    """The runs this page uses that stopped before the grid's last round (a federation whose clients ran out of
    budget: fedspec ends it there), each with the round it reached. A record stored before records said why is
    known by its curve: fewer rounds than the grid runs. Empty when every run went the whole way."""
    used = [results[cell.key] for cell in tuning_cells(grid) if cell.key in results]
    used += [record for records in _config_groups(grid, results).values() for record in records]
    lines = []
    for record in used:
        trained = len(record["curve"]) - 1
        short = record["strategy"] != CENTRALIZED and trained < grid.rounds
        if record.get("stopped") or short:
            reached = f"after {trained} of {grid.rounds} rounds" if short else f"after {trained} epochs"
            why = record.get("stopped") or "no reason recorded: the record predates it"
            lines.append(f"- `{record['key']}`: {reached} ({why})")
    if not lines:
        return []
    note = ("Runs that stopped before their last round: each scores the last round it ran, and the table above and "
            "the paired differences count it with the runs that went the whole way.")
    return [note, "", *lines]


def _signed_ci(values: list[float]) -> str:
    if not values:
        return "—"
    text = f"{mean(values):+.3f}".replace("-", "−")
    return f"{text} ± {confidence_interval(values):.3f} (n={len(values)})" if len(values) > 1 else f"{text} (n=1)"


def paired_table(grid: Grid, results: dict[str, dict]) -> list[str]:
    """Each federated configuration minus the centralized baseline at the same data, adapter and ε, paired by seed
    (a seed fixes the records both train on, so the paired interval is narrower than the two means' intervals
    side by side). Empty when the grid has no centralized cells to pair with."""
    groups = _config_groups(grid, results)
    lines = []
    for (dataset, strategy, adapter, eps, partition), records in sorted(groups.items()):
        central = {r["seed"]: r for r in groups.get((dataset, CENTRALIZED, adapter, eps, grid.partitions[0]), [])}
        pairs = [(r, central[r["seed"]]) for r in records if strategy != CENTRALIZED and r["seed"] in central]
        if not pairs:
            continue
        accuracy = [f["accuracy"] - c["accuracy"] for f, c in pairs]
        whole = [f["subgroup_accuracy"] - c["subgroup_accuracy"] for f, c in pairs
                 if f.get("subgroup_accuracy") is not None and c.get("subgroup_accuracy") is not None]
        seeds = ", ".join(str(f["seed"]) for f, _ in pairs)
        lines.append(f"| {dataset} | {strategy} | {adapter} | {eps} | {partition} | {seeds} | {_signed_ci(accuracy)} "
                     f"| {_signed_ci(whole)} |")
    if not lines:
        return []
    header = ("| data | strategy | adapter | ε | partition | seeds | accuracy: federated − centralized "
              "| whole sentences: federated − centralized |")
    return [header, "|---|---|---|---|---|---|---|---|", *lines]


def _minutes(records: list[dict]) -> str:
    """Mean wall time of the runs that ran start to finish: a resumed run timed only its last stretch, so when
    every run was resumed the longest stretch is a lower bound."""
    whole = [r["seconds"] for r in records if not r.get("resumed")]
    return f"{mean(whole) / 60:.1f}" if whole else f"≥ {max(r['seconds'] for r in records) / 60:.1f}"


def sweep_table(grid: Grid, results: dict[str, dict]) -> list[str]:
    all_lrs = sorted({cell.lr for cell in tuning_cells(grid)})
    lines = ["| data | strategy | adapter | " + " | ".join(f"lr {lr:g}" for lr in all_lrs) + " | chosen |",
             "|---|---|---|" + "---|" * (len(all_lrs) + 1)]
    groups: dict[tuple, dict[float, float]] = defaultdict(dict)
    for cell in tuning_cells(grid):
        if cell.key in results:
            groups[cell.group][cell.lr] = results[cell.key]["score"]
    for group, scores in sorted(groups.items()):
        chosen = chosen_lr(grid, Cell(*group, grid.tune_epsilon, grid.tune_partition, 0, None), results)
        cells = " | ".join(f"{scores[lr]:.3f}" if lr in scores else "—" for lr in all_lrs)
        lines.append(f"| {' | '.join(group)} | {cells} | {'—' if chosen is None else f'{chosen:g}'} |")
    return lines


def _panels(count: int):
    """One figure with ``count`` side-by-side panels (one per dataset)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, count, figsize=(5.5 * count, 4), squeeze=False)
    return fig, axes[0]


def _label(ax, x: str, y: str, title: str) -> None:
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_vs_epsilon(grid: Grid, results: dict[str, dict], path: Path) -> bool:
    """Accuracy (mean ± CI over seeds) against ε per strategy and adapter, at the sweep's partition."""
    groups = {k: v for k, v in _config_groups(grid, results).items()
              if k[4] == grid.tune_partition or k[1] == CENTRALIZED}
    datasets = sorted({key[0] for key in groups})
    if not datasets:
        return False
    fig, axes = _panels(len(datasets))
    finite = sorted({float(e) for e in grid.epsilons if not math.isinf(e)})
    positions = {**{_eps(e): i for i, e in enumerate(finite)}, "∞": len(finite)}
    for ax, dataset in zip(axes, datasets):
        series: dict[tuple, list[tuple[int, float, float]]] = defaultdict(list)
        for (d, strategy, adapter, eps, _), records in groups.items():
            if d == dataset:
                values = [r["accuracy"] for r in records]
                series[(strategy, adapter)].append((positions[eps], mean(values), confidence_interval(values)))
        for (strategy, adapter), points in sorted(series.items()):
            points.sort()
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                        capsize=3, label=f"{strategy} / {adapter}")
        ax.set_xticks(range(len(positions)), list(positions))
        _label(ax, "ε (per client, whole run)", "accuracy on held-out data",
               f"{dataset}: {grid.tune_partition} over {grid.clients} clients")
    _save(fig, path)
    return True


def plot_rounds(grid: Grid, results: dict[str, dict], path: Path) -> bool:
    """Accuracy after every round (mean over seeds) of the federated runs at the sweep's ε."""
    groups = {k: v for k, v in _config_groups(grid, results).items()
              if k[1] != CENTRALIZED and k[3] == _eps(grid.tune_epsilon)}
    datasets = sorted({key[0] for key in groups})
    if not datasets:
        return False
    fig, axes = _panels(len(datasets))
    for ax, dataset in zip(axes, datasets):
        for (d, strategy, adapter, _, partition), records in sorted(groups.items()):
            if d == dataset:
                curves = [r["curve"] for r in records]
                length = min(len(c) for c in curves)
                average = [mean(c[i] for c in curves) for i in range(length)]
                ax.plot(range(length), average, marker=".", label=f"{strategy} / {adapter} / {partition}")
        _label(ax, "round", "accuracy on held-out data (mean over seeds)", f"{dataset}, ε = {_eps(grid.tune_epsilon)}")
    _save(fig, path)
    return True


def missing_cells(grid: Grid, results: dict[str, dict]) -> list[Cell]:
    missing = [c for c in tuning_cells(grid) if c.key not in results]
    for cell in final_cells(grid):
        lr = chosen_lr(grid, cell, results)
        if lr is None:  # its learning rate waits for the sweep
            missing.append(cell)
        elif with_lr(cell, lr).key not in results:
            missing.append(with_lr(cell, lr))
    return missing


MISSING_LISTED = 60


def missing_section(grid: Grid, results: dict[str, dict]) -> list[str]:
    """The cells still to run: each by name when few, else counted by (dataset, strategy, adapter) and kind."""
    missing = missing_cells(grid, results)
    if not missing:
        return ["None: every cell of the grid ran."]
    total = len(tuning_cells(grid)) + len(final_cells(grid))
    # finals shared from another grid at a rate this grid's sweep has not chosen yet
    early = sum(1 for cell in missing if cell.lr is None
                and any(with_lr(cell, lr).key in results for lr in grid.rates(cell.strategy)))
    waiting = (f"; {early} of them ran already, at a rate this grid's unfinished sweep may choose, and count once it "
               "does") if early else ""
    lines = [f"{len(missing)} of the grid's {total} cells have not run yet{waiting}. Rerun the command to continue.", ""]
    if len(missing) <= MISSING_LISTED:
        return lines + [f"- `{cell.key}`" for cell in missing]
    counts = Counter((*cell.group, "sweep" if cell.tune else "final") for cell in missing)
    lines += ["| data | strategy | adapter | sweep cells missing | final cells missing |", "|---|---|---|---:|---:|"]
    for group in dict.fromkeys(cell.group for cell in missing):
        lines.append(f"| {' | '.join(group)} | {counts[(*group, 'sweep')]} | {counts[(*group, 'final')]} |")
    return lines


def shared_note(results: dict[str, dict]) -> list[str]:
    """Which cells another grid ran with the same configuration (accuracy.adopt_shared_results)."""
    sources = Counter(r["shared_from"] for r in results.values() if r.get("shared_from"))
    if not sources:
        return []
    listed = ", ".join(f"{grid} ({count})" for grid, count in sorted(sources.items()))
    note = (f"{sum(sources.values())} of these cells ran in other grids with the same configuration and are shared "
            f"with them: {listed}.")
    return [note, ""]


def code_version(record: dict) -> str:
    """The commit a cell ran on, marked where tracked files differed from it (cells before that was recorded are
    not marked)."""
    commit = record.get("commit") or "unrecorded"
    return f"{commit} with uncommitted changes" if record.get("uncommitted_changes") else commit


def write_report(grid: Grid, results: dict[str, dict], page: Path, out: Path) -> None:
    images = page.parent / "img"
    images.mkdir(parents=True, exist_ok=True)
    eps_plot, rounds_plot = images / f"accuracy-vs-epsilon-{grid.name}.png", images / f"accuracy-rounds-{grid.name}.png"
    has_eps, has_rounds = plot_accuracy_vs_epsilon(grid, results, eps_plot), plot_rounds(grid, results, rounds_plot)
    datasets = ", ".join(f"`{d}`" for d in grid.datasets)
    lines = [
        "# Results on real data",
        "",
        f"Generated by `{COMMAND.format(grid=grid.name)}` (grid `{grid.name}`; cells in `{out.relative_to(page.parents[1]) if out.is_relative_to(page.parents[1]) else out}`).",
        "",
        (f"Data: {datasets} (`../shared/data`). {_data_scoring(grid)} Model: `{_model(grid)}`, "
        f"{grid.clients} clients, {grid.rounds} rounds, record-level DP-SGD with δ = 1e-5; ε is each client's over "
        f"the whole run (the centralized baseline: the pooled data's, over its whole training). {_lr_source(grid)} "
        "± is the 95 % Student-t interval over seeds; only differences whose intervals do not overlap are "
        "differences. Last-5 spread: the highest minus the lowest accuracy of the last five rounds; last-5 drop: "
        "how far those rounds fell below the best round before them (0 when the curve only rises). Both are the "
        "largest over seeds. Bytes / client / round: what a client uploads (its update), the mean over its replies."
        + (f" Every cell of this grid adds `{' '.join(grid.overrides)}` to the command." if grid.overrides else "")
        + "".join(f" Its `{dataset}` cells add `{' '.join(added)}`." for dataset, added in grid.dataset_overrides)
        + (f" Its centralized cells add `{' '.join(grid.centralized_overrides)}`." if grid.centralized_overrides
           else "")),
        "",
        "## Accuracy",
        "",
        *results_table(grid, results),
        "",
    ]
    stopped = stopped_section(grid, results)
    if stopped:
        lines += [*stopped, ""]
    paired = paired_table(grid, results)
    if paired:
        lines += ["## The federation against the centralized baseline, paired by seed", "",
                  "Each seed fixes the records both runs train on; the interval is over the seeds' differences.", "",
                  *paired, ""]
    if has_eps:
        lines += [f"![accuracy vs ε](img/{eps_plot.name})", ""]
    if has_rounds:
        lines += [f"![accuracy over rounds](img/{rounds_plot.name})", ""]
    commits = sorted({code_version(r) for r in results.values()})
    code = f"Code: commit{'s' if len(commits) > 1 else ''} {', '.join(commits)} (each cell records the commit it ran on)."
    lines += [code, "", *shared_note(results)]
    if grid.tuned:
        lines += ["## Learning-rate sweep (validation split of the training file)", "", *sweep_table(grid, results),
                  ""]
    lines += ["## Missing cells", "", *missing_section(grid, results)]
    page.write_text("\n".join(lines) + "\n")


def write_summary(sections: list[tuple[Grid, str, dict[str, dict]]], page: Path) -> None:
    """docs/results.md: each headline grid's table under the question it answers, then the generative benchmark.
    ``sections``: (grid, question, its finished cells), in the page's order; each grid's own page is beside it."""
    lines = [
        "# Results on real data",
        "",
        "Generated by `python benchmarks/accuracy.py`, which runs the grids below (each resumable: a killed study "
        "continues where it stopped) and rewrites this page and each grid's own; `--report` only rewrites them from "
        "the cells that have finished. MiniLM (all-MiniLM-L6-v2), 20 clients (Dirichlet α = 0.5), 10 rounds, "
        "record-level DP-SGD with δ = 1e-5; ε is each client's over the whole run (the centralized baseline: the "
        "pooled data's). Every learning rate was tuned on a validation split carved from the training file (or "
        "taken from an earlier grid's sweep), and every score is on data no run trained or tuned on. ± is the "
        "95 % Student-t interval over seeds; paired differences are federated minus centralized at the same seed "
        "(a seed fixes the records both train on). [study.md](study.md) reads these tables against the targets and "
        "describes every other grid.",
        "",
    ]
    for grid, question, results in sections:
        lines += [f"## {question}", "",
                  f"`{COMMAND.format(grid=grid.name)}`: [results-{grid.name}.md](results-{grid.name}.md) has the "
                  f"plots, {'the learning-rate sweep, ' if tuning_cells(grid) else ''}the code versions and the cells "
                  f"still missing. {_data_scoring(grid)}", "",
                  *results_table(grid, results), ""]
        paired = paired_table(grid, results)
        if paired:
            lines += ["Paired by seed:", "", *paired, ""]
        missing = missing_cells(grid, results)
        if missing:
            total = len(tuning_cells(grid)) + len(final_cells(grid))
            lines += [f"{len(missing)} of this grid's {total} cells have not run yet.", ""]
    lines += generative.markdown(generative.load())
    page.write_text("\n".join(lines).rstrip("\n") + "\n")


__all__ = ["confidence_interval", "write_report", "write_summary"]

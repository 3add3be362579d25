"""epsilon.png: each client's cumulative ε after every round, and the histogram of final ε over clients.

Drawn on matplotlib's Agg canvas directly (no pyplot), so it never touches a global backend or
needs a display, and is safe inside a server process. The left panel also shows the client-level ε of
the aggregate when client-level DP is on (black, dashed); the right panel is the histogram of every
client's final record-level ε (the per-client values are in report.md).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["render_epsilon_png"]

_LEGEND_MAX_CLIENTS = 12
_TARGET_COLOR = "crimson"


def render_epsilon_png(report: Mapping[str, Any]) -> bytes:
    """The PNG bytes of the plot for a report built by `build_privacy_report`."""
    clients = report["clients"]
    target = report["summary"]["target_epsilon"]
    colors = dict(zip(clients, _colors(len(clients))))
    fig = Figure(figsize=(13, 5), layout="constrained")
    FigureCanvasAgg(fig)
    curves, histogram = fig.subplots(1, 2, width_ratios=[3, 2])
    _draw_curves(curves, clients, colors, target)
    _draw_client_level(curves, report.get("client_level"))
    _legend(curves, len(clients))
    _draw_histogram(histogram, clients, target)
    accountant = report["accountant"].upper()
    fig.suptitle(
        f"Per-client privacy spent over the whole run (δ = {report['delta']:g}, {accountant} accountant)"
    )
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _colors(n: int) -> list:
    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["viridis"](i / (n - 1)) for i in range(n)]


def _drawable(eps: float) -> float:
    """Infinite ε (no guarantee) cannot be drawn as a point; leave a gap (the histogram counts it)."""
    return eps if math.isfinite(eps) else math.nan


def _draw_curves(ax: Axes, clients: Mapping[str, Any], colors: Mapping[str, Any], target: float | None) -> None:
    last = max((r["round"] for s in clients.values() for r in s["rounds"]), default=0)
    for client_id, section in clients.items():
        rounds = section["rounds"]
        xs = [0] + [r["round"] for r in rounds]  # every client starts the run at ε = 0 ...
        ys = [0.0] + [_drawable(r["epsilon"]) for r in rounds]
        if xs[-1] < last:  # ... and keeps its ε through the rounds it sat out at the end
            xs, ys = [*xs, last], [*ys, ys[-1]]
        ax.plot(
            xs,
            ys,
            drawstyle="steps-post",  # ε holds still through rounds the client sat out
            marker="o",
            markevery=list(range(1, len(rounds) + 1)),  # a dot for each round it took part in
            markersize=3,
            linewidth=1.2,
            color=colors[client_id],
            label=f"client {client_id}",
        )
    if target is not None:
        ax.axhline(target, linestyle="--", color=_TARGET_COLOR, linewidth=1.5, label=f"target ε = {target:g}")
    ax.set_xlabel("round")
    ax.set_ylabel("ε after the round (cumulative)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(f"record-level ε of each of {len(clients)} clients after each round")


def _legend(ax: Axes, num_clients: int) -> None:
    """Every line in the legend for a few clients; with many, only the target and client-level lines."""
    handles = [h for h in ax.get_lines() if num_clients <= _LEGEND_MAX_CLIENTS or not h.get_label().startswith("client ")]
    if handles:
        ax.legend(handles=handles, fontsize="small", loc="upper left")


def _draw_client_level(ax: Axes, level: Mapping[str, Any] | None) -> None:
    if not level or not level["rounds"]:
        return
    rounds = level["rounds"]
    ax.plot([0] + [r["round"] for r in rounds], [0.0] + [_drawable(r["epsilon"]) for r in rounds], drawstyle="steps-post",
            color="black", linestyle="--", marker="s", markersize=3, linewidth=1.5,
            label=f"client-level ε (δ = {level['delta']:g})")


def _draw_histogram(ax: Axes, clients: Mapping[str, Any], target: float | None) -> None:
    finals = [s["final_epsilon"] for s in clients.values()]
    finite = [eps for eps in finals if math.isfinite(eps)]
    if finite:
        ax.hist(finite, bins=min(20, max(5, len(finite) // 2)), color="steelblue", edgecolor="white")
    else:
        ax.text(0.5, 0.5, "no client trained under record-level DP", ha="center", va="center",
                transform=ax.transAxes)
    infinite = len(finals) - len(finite)
    if target is not None:
        ax.axvline(target, linestyle="--", color=_TARGET_COLOR, linewidth=1.5, label=f"target ε = {target:g}")
        ax.legend(fontsize="small")
    ax.set_xlabel("final ε (record-level)")
    ax.set_ylabel("clients")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    title = f"final ε over {len(finals)} clients"
    if infinite:
        title += f" ({infinite} with ε = ∞ not shown)"
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)

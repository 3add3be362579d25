"""epsilon.png: each client's cumulative ε after every round, and every client's final ε.

Drawn on matplotlib's Agg canvas directly (no pyplot), so it never touches a global backend or
needs a display, and is safe inside a server process. With many clients a legend stops being
readable, so the right panel names every client: final ε as sorted bars in the same colours.
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
    fig = Figure(figsize=(13, min(max(4.5, 0.24 * len(clients) + 1.5), 24)), layout="constrained")
    FigureCanvasAgg(fig)
    curves, bars = fig.subplots(1, 2, width_ratios=[2, 1])
    _draw_curves(curves, clients, colors, target)
    _draw_final_bars(bars, clients, colors, target)
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
    """Infinite ε (no guarantee) cannot be drawn as a point; leave a gap and label it in the bars."""
    return eps if math.isfinite(eps) else math.nan


def _draw_curves(ax: Axes, clients: Mapping[str, Any], colors: Mapping[str, Any], target: float | None) -> None:
    for client_id, section in clients.items():
        rounds = section["rounds"]
        ax.plot(
            [r["round"] for r in rounds],
            [_drawable(r["epsilon"]) for r in rounds],
            drawstyle="steps-post",  # ε holds still through rounds the client sat out
            marker="o",
            markersize=3,
            linewidth=1.2,
            color=colors[client_id],
            label=f"client {client_id}",
        )
    target_line = []
    if target is not None:
        line = ax.axhline(target, linestyle="--", color=_TARGET_COLOR, linewidth=1.5)
        line.set_label(f"target ε = {target:g}")
        target_line.append(line)
    ax.set_xlabel("round")
    ax.set_ylabel("ε after the round (cumulative)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if len(clients) <= _LEGEND_MAX_CLIENTS:
        ax.legend(fontsize="small", loc="upper left")
        ax.set_title("ε after each round")
    else:  # too many clients for a legend: only the target line gets one
        if target_line:
            ax.legend(handles=target_line, fontsize="small", loc="upper left")
        ax.set_title("ε after each round (colours as in the right panel)")


def _draw_final_bars(ax: Axes, clients: Mapping[str, Any], colors: Mapping[str, Any], target: float | None) -> None:
    finals = sorted(((s["final_epsilon"], cid) for cid, s in clients.items()), key=lambda x: -x[0])
    positions = range(len(finals))
    ax.barh(positions, [_drawable(eps) for eps, _ in finals], color=[colors[cid] for _, cid in finals])
    for y, (eps, _) in zip(positions, finals):
        finite = math.isfinite(eps)
        label = f" {eps:.3g}" if finite else " ∞ (no guarantee)"
        ax.text(eps if finite else 0.0, y, label, va="center", fontsize="x-small")
    tick_size = "small" if len(finals) <= 30 else 6
    ax.set_yticks(list(positions), [f"client {cid}" for _, cid in finals], fontsize=tick_size)
    ax.invert_yaxis()
    if target is not None:
        ax.axvline(target, linestyle="--", color=_TARGET_COLOR, linewidth=1.5)
    ax.set_xlabel("final ε")
    ax.set_title("final ε per client")
    ax.margins(x=0.15)
    ax.grid(axis="x", alpha=0.3)

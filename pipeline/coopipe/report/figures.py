"""The paper's figures with matplotlib: accuracy vs shots (Figure 3) and gain over zero-shot CLIP (Figure 4).

Figures are drawn on the Agg canvas without pyplot's global state (safe in tests and worker processes) and saved
atomically (:func:`coopipe.atomic.atomic_write`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coopipe.atomic import atomic_write
from coopipe.report.aggregate import Cell, Gain
from coopipe.report.names import AVERAGE, dataset_label, dataset_order, method_label, method_order, several_models


def shot_position(shots: float) -> float:
    """x position of a number of shots: 0 -> 0, K -> 1 + log2(K), so 0/1/2/4/8/16 are evenly spaced."""
    return 0.0 if shots <= 0 else 1.0 + math.log2(shots)


def new_figure(width: float, height: float) -> Any:
    """A figure on the Agg canvas without touching pyplot's global state (safe in tests and workers)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


@dataclass
class Palette:
    colors: dict[str, Any] = field(default_factory=dict)

    def __call__(self, key: str) -> Any:
        from matplotlib import colormaps

        if key not in self.colors:
            self.colors[key] = colormaps["tab10"](len(self.colors) % 10)
        return self.colors[key]


def plot_accuracy_vs_shots(cells: Sequence[Cell], averages: Sequence[Cell], path: str | Path) -> Path:
    """Figure 3: accuracy against shots, one panel per dataset (+ Average), one line per method (and model) with
    std bands, whatever epochs its runs trained (the report's tables say where they depart from the paper's);
    zero-shot CLIP as a star at 0 shots; the legend inside the first panel."""
    datasets = sorted({c.dataset for c in cells}, key=dataset_order)
    panels = [*datasets, *([AVERAGE] if len(datasets) > 1 else [])]
    ncols = max(1, min(4, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = new_figure(max(3.6 * ncols, 6.4), 3.0 * nrows + 0.9)
    models = several_models(cells)
    palette = Palette()
    keys = sorted({(method_order(c.method), c.method, c.model) for c in cells})
    for _, method, model in keys:
        palette(f"{method}|{model}")
    handles: dict[str, Any] = {}
    all_cells = [*cells, *averages]
    ticks = sorted({c.shots for c in cells} | {0})
    for i, panel in enumerate(panels or ["(no results)"]):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.set_title(dataset_label(panel), fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.set_xticks([shot_position(t) for t in ticks], [str(t) for t in ticks])
        ax.set_xlim(-0.4, shot_position(max(ticks)) + 0.4)
        for _, method, model in keys:
            mine = sorted((c for c in all_cells if c.dataset == panel and c.method == method and c.model == model),
                          key=lambda c: c.shots)
            if not mine:
                continue
            color = palette(f"{method}|{model}")
            label = method_label(method, model, with_model=models)
            x = np.array([shot_position(c.shots) for c in mine])
            y = np.array([c.accuracy.mean for c in mine])
            err = np.array([0.0 if c.accuracy.single or math.isnan(c.accuracy.std) else c.accuracy.std for c in mine])
            if method.startswith("zeroshot"):
                (h,) = ax.plot(x, y, linestyle="none", marker="*", markersize=13, color=color, label=label)
            else:
                style = "--" if method == "linear_probe" else "-"
                h = ax.errorbar(x, y, yerr=err, linestyle=style, marker="o", markersize=4, capsize=3,
                                color=color, label=label)
                ax.fill_between(x, y - err, y + err, color=color, alpha=0.12, linewidth=0)
            handles.setdefault(label, h)
        if i % ncols == 0:
            ax.set_ylabel("Accuracy (%)")
        if i >= len(panels) - ncols:
            ax.set_xlabel("Shots per class")
    if handles:  # inside the first panel's axes: never clipped by the figure's edges, whatever the labels' length
        fig.axes[0].legend(list(handles.values()), list(handles), loc="best", fontsize=7, framealpha=0.85)
    else:
        fig.text(0.5, 0.5, "no few-shot results yet", ha="center", va="center")
    fig.suptitle("Accuracy vs shots per class (mean ± std over seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return save_figure(fig, path)


def plot_gains(gains: Sequence[Gain], path: str | Path, *, method: str = "coop", shots: int | None = None) -> Path:
    """Figure 4: horizontal bars of ``method`` minus zero-shot CLIP per dataset (and model), in points, sorted by
    gain; a bar of runs that trained other epochs than the paper's carries that note beside its value."""
    mine = [g for g in gains if g.method == method and (shots is None or g.shots == shots)]
    fig = new_figure(6.4, 0.5 * max(len(mine), 3) + 1.4)
    ax = fig.add_subplot(1, 1, 1)
    name = method_label(method)
    shots_text = f"{shots}-shot " if shots is not None else ""
    if mine:
        models = several_models(mine)
        ordered = sorted(mine, key=lambda g: g.points)
        values = [g.points for g in ordered]
        colors = ["#2a9d8f" if v >= 0 else "#e76f51" for v in values]
        ypos = np.arange(len(ordered))
        ax.barh(ypos, values, color=colors, height=0.5)
        ax.set_yticks(ypos, [dataset_label(g.dataset) + (f"\n{g.model}" if models else "") for g in ordered],
                     fontsize=8)
        span = max(abs(v) for v in values) or 1.0
        for y, g in zip(ypos, ordered):
            v = g.points
            text = f"{v:+.2f} ({g.shots} shots{', ' + g.note if g.note else ''})"
            ax.text(v + (0.02 * span if v >= 0 else -0.02 * span), y, text, va="center",
                    ha="left" if v >= 0 else "right", fontsize=7)
        # room for the value labels on the side the bars point to
        ax.set_xlim(min(values) - 1.1 * span if min(values) < 0 else -0.05 * span,
                    max(values) + 1.1 * span if max(values) > 0 else 0.05 * span)
        ax.axvline(0, color="black", linewidth=0.8)
    else:
        ax.set_yticks([])
        ax.text(0.5, 0.5, f"no dataset has both zero-shot CLIP and {shots_text}{name} results",
                ha="center", va="center", transform=ax.transAxes, fontsize=9)
    ax.set_xlabel("Absolute improvement over zero-shot CLIP (points)")
    ax.set_title(f"{shots_text}{name} vs zero-shot CLIP (same model)", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))

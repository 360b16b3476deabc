"""Age-estimation tables and figures: the MORPH-style MAE table, predicted-vs-true ages, and CS curves.

The table follows OrdinalCLIP's few-shot table (rows: methods; columns: shots; cells: MAE in years, mean +- std
over seeds, population std as the project's report; a single seed shows no +-), with the constant (median)
predictor's MAE beside it. Every table carries :data:`PROTOCOL_NOTE`: this project keeps CLIP's image encoder
frozen and reads cached features, whereas the paper's CoOp row fine-tunes a VGG-16 pre-trained on IMDB-WIKI, so
the two are different protocols and the paper's numbers (MORPH) are not a target for these (any dataset).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coopipe.errors import ParamsError
from coopipe.report.figures import Palette, new_figure, save_figure, shot_position
from coopipe.report.names import method_label, method_order

__all__ = [
    "PAPER_COOP_MORPH",
    "PROTOCOL_NOTE",
    "protocol_note",
    "AgeCell",
    "age_cells",
    "age_markdown",
    "plot_cs_curves",
    "plot_mae_vs_shots",
    "plot_predicted_vs_true",
]

# OrdinalCLIP's CoOp row on MORPH Album2 (MAE, years) by shots; its lowest-shot row reads 5.09.
PAPER_COOP_MORPH: dict[int, float] = {2: 4.50, 4: 3.81, 8: 3.57, 16: 3.23}
_OURS_LAST = "this project keeps the last epoch"
_OURS_SELECTED = ("runs trained with model selection keep the epoch of best accuracy on the few-shot validation "
                  "split, the others the last epoch")


def protocol_note(selected: bool = False) -> str:
    """The note under every age table; ``selected``: some of the runs kept their best validation epoch
    (``select_every``, :mod:`coopipe.selection`), so the model-selection sentence says what they kept."""
    ours = _OURS_SELECTED if selected else _OURS_LAST
    return (
        "Note: this project keeps CLIP's image encoder frozen and trains on cached features; OrdinalCLIP's CoOp row "
        "(MORPH: 4.50 / 3.81 / 3.57 / 3.23 years at 2 / 4 / 8 / 16 shots, 5.09 in its lowest-shot row) fine-tunes a "
        "VGG-16 image encoder pre-trained on IMDB-WIKI together with the prompt. The numbers are not comparable. "
        "Model selection: OrdinalCLIP keeps the epoch of best validation MAE, and on MORPH its validation list is its "
        f"test list (ET_proto_val.txt for both); {ours}, and never looks at the test split while training."
    )


PROTOCOL_NOTE = protocol_note()


@dataclass(frozen=True)
class AgeCell:
    """One method x shots over seeds: MAE (years) of a decoding."""

    method: str
    shots: int
    mean: float
    std: float
    seeds: tuple[int | None, ...]

    def text(self, digits: int = 2) -> str:
        """``3.81 ± 0.12``; one seed (or a seedless method such as zero-shot) without ±."""
        if not self.seeds or math.isnan(self.mean):
            return "–"
        body = f"{self.mean:.{digits}f}"
        return body if len(self.seeds) == 1 else f"{body} ± {self.std:.{digits}f}"


def age_cells(records: Iterable[Mapping[str, Any]], *, decoding: str = "exp") -> list[AgeCell]:
    """Cells from run records (mappings with ``method``, ``shots``, ``seed`` and ``mae_exp``/``mae_max``).

    Zero-shot records have ``shots`` 0 and ``seed`` None. Records repeating a (method, shots, seed) keep the last.
    """
    if decoding not in ("exp", "max"):
        raise ParamsError(f"decoding must be 'exp' or 'max', got {decoding!r}")
    groups: dict[tuple[str, int], dict[int | None, float]] = defaultdict(dict)
    for record in records:
        try:
            key = (str(record["method"]), int(record["shots"]))
            groups[key][record.get("seed")] = float(record[f"mae_{decoding}"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ParamsError(f"age run record {dict(record)!r:.120} lacks method/shots/mae_{decoding}") from exc
    cells = []
    for (method, shots), by_seed in groups.items():
        seeds = tuple(sorted(by_seed, key=lambda s: (s is None, s or 0)))
        values = np.array([by_seed[s] for s in seeds])
        cells.append(AgeCell(method, shots, float(values.mean()), float(values.std()), seeds))
    return sorted(cells, key=lambda c: (method_order(c.method), c.shots))


def age_markdown(cells: Sequence[AgeCell], *, constant_mae: float | Mapping[int, float] | None = None,
                 dataset: str = "", decoding: str = "exp") -> list[str]:
    """The MORPH-style table as markdown lines: MAE by method x shots, then the constant predictor and the note.

    ``constant_mae``: one value for every column, or one per shots (the median of each column's train draw)."""
    shots = sorted({c.shots for c in cells})
    methods = sorted({c.method for c in cells}, key=method_order)
    by_key = {(c.method, c.shots): c for c in cells}
    header = ["method", *[("zero-shot" if k == 0 else f"{k} shot{'s' if k > 1 else ''}") for k in shots]]
    lines = [(f"MAE (years, {'expectation' if decoding == 'exp' else 'arg-max'} decoding{', ' + dataset if dataset else ''}; "
             "mean ± std over seeds)"), "", "| " + " | ".join(header) + " |",
             "|" + "---|" + "---:|" * len(shots)]
    for method in methods:
        row = [method_label(method), *[by_key[(method, k)].text() if (method, k) in by_key else "–" for k in shots]]
        lines.append("| " + " | ".join(row) + " |")
    if constant_mae is not None:
        per_shot = constant_mae if isinstance(constant_mae, Mapping) else {k: constant_mae for k in shots}
        lines.append("| constant (train median) | "
                     + " | ".join(f"{per_shot[k]:.2f}" if k in per_shot else "–" for k in shots) + " |")
    lines += ["", PROTOCOL_NOTE]
    return lines


def plot_predicted_vs_true(true: Sequence[float] | np.ndarray, predicted: Sequence[float] | np.ndarray,
                           path: str | Path, *, title: str = "") -> Path:
    """Left: predicted against true age (with y = x); right: the mean absolute error of each true age."""
    t, p = np.asarray(true, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    if t.shape != p.shape or t.size == 0:
        raise ParamsError(f"need as many predictions as true ages (got {p.size} and {t.size})")
    fig = new_figure(10.0, 4.2)
    left, right = fig.subplots(1, 2)
    left.scatter(t, p, s=6, alpha=0.4)
    lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
    left.plot([lo, hi], [lo, hi], color="black", linewidth=0.8)
    left.set_xlabel("true age")
    left.set_ylabel("predicted age")
    left.set_title(title or "predicted vs true age")
    ages = np.unique(t)
    per_age = np.array([np.abs(p[t == a] - a).mean() for a in ages])
    right.bar(ages, per_age, width=0.8)
    right.axhline(float(np.abs(p - t).mean()), color="black", linewidth=0.8, linestyle="--", label="overall MAE")
    right.set_xlabel("true age")
    right.set_ylabel("mean absolute error (years)")
    right.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def plot_cs_curves(curves: Mapping[str, Mapping[int, float]], path: str | Path, *, title: str = "") -> Path:
    """CS(t) against t (years) for each labelled curve (e.g. method and shots), as a percentage."""
    if not curves:
        raise ParamsError("no CS curves to plot")
    fig = new_figure(5.5, 4.2)
    ax = fig.subplots()
    palette = Palette()
    for label, cs in curves.items():
        ts = sorted(int(t) for t in cs)
        ax.plot(ts, [100.0 * cs[t] for t in ts], marker="o", markersize=3, color=palette(label), label=label)
    ax.set_xlabel("error threshold t (years)")
    ax.set_ylabel("CS(t) (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or "cumulative score")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_mae_vs_shots(cells: Sequence[AgeCell], path: str | Path, *, constant_mae: float | None = None) -> Path:
    """MAE against shots (log2 spacing), one line per method with std bands; zero-shot at 0."""
    fig = new_figure(5.5, 4.2)
    ax = fig.subplots()
    palette = Palette()
    for method in sorted({c.method for c in cells}, key=method_order):
        own = sorted((c for c in cells if c.method == method), key=lambda c: c.shots)
        x = [shot_position(c.shots) for c in own]
        mean, std = np.array([c.mean for c in own]), np.array([c.std for c in own])
        ax.plot(x, mean, marker="o", color=palette(method), label=method_label(method))
        ax.fill_between(x, mean - std, mean + std, color=palette(method), alpha=0.2)
    if constant_mae is not None:
        ax.axhline(constant_mae, color="black", linestyle="--", linewidth=0.8, label="constant (median)")
    shots = sorted({c.shots for c in cells})
    ax.set_xticks([shot_position(k) for k in shots], [str(k) for k in shots])
    ax.set_xlabel("shots per age")
    ax.set_ylabel("MAE (years)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return save_figure(fig, path)

"""Stage `age report`: the MORPH-style MAE table, the CS curves and predicted-vs-true plots from every age run.

Reads every ``metrics.json`` below ``runs_dir`` that holds age metrics (``mae_exp``; written by the age branch of
the evaluation jobs, :mod:`coopipe.jobs.age_eval`); transfer evaluations and the output folder are left out,
unreadable files are skipped with a warning. Per dataset it writes into ``out_dir/<dataset>/``:

- ``age_table.md``: MAE by method x shots (mean ± population std over seeds; one seed without ±), expectation
  and arg-max decodings, the constant (train-median) predictor's MAE in each shots column, the protocol note
  (frozen CLIP on cached features vs OrdinalCLIP's fine-tuned VGG-16), a line naming every method trained for
  other epochs than its paper's (``epochs``/``paper_epochs`` of the metrics files) and, when the weights were
  random, a line saying that the numbers carry little age signal and are no result;
- ``cs_curves.png``: CS(t), t = 1..10, of each method at its largest shots (mean over seeds);
- ``mae_vs_shots.png``: MAE against shots, one line per method, the constant predictor dashed;
- ``predicted_vs_true_<method>_shots<K>.png``: predicted against true age with the per-age error, for each
  method at its largest shots (its first seed), from the run's ``predictions.csv``;
- ``age_summary.json``: the cells and constants as numbers.

``out_dir/age_report.md`` gathers the datasets' tables with links to the figures. Called by ``coopipe report``
(when the runs hold age metrics) or on its own.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from coopipe.age_report import (
    protocol_note,
    AgeCell,
    age_cells,
    age_markdown,
    plot_cs_curves,
    plot_mae_vs_shots,
    plot_predicted_vs_true,
)
from coopipe.errors import ParamsError
from coopipe.jobs.age_eval import PREDICTIONS_FILE
from coopipe.atomic import write_json, write_text
from coopipe.report.names import method_label
from coopipe.report.records import metrics_files
from coopipe.safe_names import safe_name

logger = logging.getLogger(__name__)

__all__ = ["AGE_FILES", "RANDOM_WEIGHTS_NOTE", "find_age_metrics", "run_age_report"]

AGE_FILES = {
    "markdown": "age_table.md",
    "cs": "cs_curves.png",
    "mae": "mae_vs_shots.png",
    "summary": "age_summary.json",
    "index": "age_report.md",
}
RANDOM_WEIGHTS_NOTE = (
    "Weights: RANDOM (pretrained=none). Random-weight features hold low-level image statistics and little age "
    "signal: these numbers only show that the pipeline runs and are no result (prompts land near or above the "
    "constant predictor; a probe fitted to the train ages can get somewhat below it)."
)


def find_age_metrics(runs_dir: str | Path, *, exclude: Sequence[Path] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """(path, metrics) of every age ``metrics.json`` below ``runs_dir`` (sorted by path), transfer runs left out."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise ParamsError(f"runs folder {runs_dir} not found; pass the folder holding the run folders")
    skip = [p.resolve() for p in exclude]
    found = []
    for path in metrics_files(runs_dir, "metrics.json"):
        if any(parent in skip for parent in path.resolve().parents):
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            logger.warning("skipping unreadable metrics file %s (%s)", path, exc)
            continue
        if not isinstance(data, dict) or "mae_exp" not in data or "source_dataset" in data:
            continue
        if not all(k in data for k in ("method", "dataset", "shots")):
            logger.warning("skipping age metrics %s: no method/dataset/shots recorded", path)
            continue
        found.append((path, data))
    return found


def _constants(records: Sequence[Mapping[str, Any]]) -> dict[int, float]:
    """Mean constant-predictor MAE per shots (each column's train draws)."""
    by_shots: dict[int, list[float]] = defaultdict(list)
    for r in records:
        if r.get("constant_mae") is not None:
            by_shots[int(r["shots"])].append(float(r["constant_mae"]))
    return {k: float(np.mean(v)) for k, v in sorted(by_shots.items())}


def _largest_shots(found: Sequence[tuple[Path, Mapping[str, Any]]]) -> dict[str, list[tuple[Path, Mapping[str, Any]]]]:
    """Each method's runs at its largest shots, seeds ascending."""
    top: dict[str, int] = {}
    for _, r in found:
        top[r["method"]] = max(top.get(r["method"], -1), int(r["shots"]))
    chosen: dict[str, list[tuple[Path, Mapping[str, Any]]]] = defaultdict(list)
    for path, r in found:
        if int(r["shots"]) == top[r["method"]]:
            chosen[r["method"]].append((path, r))
    for runs in chosen.values():
        runs.sort(key=lambda pr: (pr[1].get("seed") is None, pr[1].get("seed") or 0))
    return chosen


def _epochs_note(records: Sequence[Mapping[str, Any]]) -> str | None:
    """One line naming each method trained for other epochs than its paper's (e.g. a quick grid's ``--epochs 2``).

    Why: a shortened schedule changes the numbers as much as the method does; the table must not pass for the
    paper's protocol."""
    seen: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for r in records:
        epochs, paper = r.get("epochs"), r.get("paper_epochs")
        if isinstance(epochs, int) and isinstance(paper, int) and epochs != paper:
            seen[str(r["method"])].add((epochs, paper))
    if not seen:
        return None
    parts = [f"{method_label(m)} {', '.join(f'{e} (paper {p})' for e, p in sorted(v))}" for m, v in sorted(seen.items())]
    return ("**Not the paper's protocol: shortened training.** Epochs trained: " + "; ".join(parts)
            + ". The numbers are not comparable with the paper's.")


def _departures_note(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Beside each method's rows: every departure from its paper setting that its runs' metrics files list
    (:mod:`coopipe.departures`), in the order first seen."""
    seen: dict[str, dict[str, None]] = defaultdict(dict)
    for r in records:
        for d in r.get("departures") or ():
            seen[str(r["method"])][str(d)] = None
    if not seen:
        return []
    return ["**Departures from each method's paper setting** (as its metrics files list them):", "",
            *[f"- {method_label(m)}: {'; '.join(found)}" for m, found in sorted(seen.items())]]


def _label(method: str, shots: int) -> str:
    """Readable legend and caption label: ``CoOp (init "age estimation: ...") 16-shot``."""
    name = method_label(method)
    return name if shots == 0 else f"{name} {shots}-shot"


def _read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    return (np.array([float(r["true_age"]) for r in rows]), np.array([float(r["pred_exp"]) for r in rows]))


def _dataset_report(dataset: str, found: Sequence[tuple[Path, Mapping[str, Any]]], out: Path) -> dict[str, Any]:
    records = [r for _, r in found]
    cells = {d: age_cells(records, decoding=d) for d in ("exp", "max")}
    constants = _constants(records)
    random_weights = any(str(r.get("weights", "")).startswith("random-init") for r in records)
    lines = [f"# Age estimation: {dataset}", ""]
    for decoding in ("exp", "max"):
        lines += age_markdown(cells[decoding], constant_mae=constants or None, dataset=dataset, decoding=decoding)[:-1]
        lines.append("")
    selected = any((r.get("selection") or {}).get("rule") == "best validation epoch" for r in records)
    lines.append(protocol_note(selected))  # once, after both tables
    epochs_note = _epochs_note(records)
    if epochs_note:
        lines += ["", epochs_note]
    if random_weights:
        lines += ["", RANDOM_WEIGHTS_NOTE]
    departures_note = _departures_note(records)
    if departures_note:
        lines += ["", *departures_note]
    figures: dict[str, str] = {}
    chosen = _largest_shots(found)
    curves = {}
    for method, runs in chosen.items():
        shots = int(runs[0][1]["shots"])
        curves[_label(method, shots)] = {int(t): float(np.mean([float(r["cs_exp"][t]) for _, r in runs]))
                                         for t in runs[0][1]["cs_exp"]}
        pred = _read_predictions(runs[0][0].parent / PREDICTIONS_FILE)
        if pred is not None:
            name = f"predicted_vs_true_{safe_name(method)}_shots{shots}.png"
            seed = runs[0][1].get("seed")
            plot_predicted_vs_true(*pred, out / name,
                                   title=f"{dataset}: {_label(method, shots)}" + (f", seed {seed}" if seed is not None else ""))
            figures[_label(method, shots)] = name
    if curves:
        plot_cs_curves(curves, out / AGE_FILES["cs"], title=f"{dataset}: cumulative score (expectation decoding)")
    plot_mae_vs_shots(cells["exp"], out / AGE_FILES["mae"],
                      constant_mae=float(np.mean(list(constants.values()))) if constants else None)
    lines += ["", f"![CS curves]({AGE_FILES['cs']})", f"![MAE vs shots]({AGE_FILES['mae']})",
              *[f"![{label}]({name})" for label, name in figures.items()]]
    write_text(out / AGE_FILES["markdown"], "\n".join(lines) + "\n")

    def as_dict(c: AgeCell) -> dict[str, Any]:
        return {"method": c.method, "shots": c.shots, "mean": c.mean, "std": c.std, "seeds": list(c.seeds)}

    summary = {"dataset": dataset, "runs": len(records), "random_weights": random_weights,
               "constant_mae": {str(k): v for k, v in constants.items()},
               "mae_exp": [as_dict(c) for c in cells["exp"]], "mae_max": [as_dict(c) for c in cells["max"]],
               "cs_curves": {k: {str(t): v for t, v in cs.items()} for k, cs in curves.items()},
               "predicted_vs_true": figures}
    write_json(out / AGE_FILES["summary"], summary)
    return summary


def run_age_report(runs_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Write the age tables and figures of every age run below ``runs_dir`` (default out: ``runs_dir/age_report``).

    Returns ``{dataset: summary}``; raises :class:`ParamsError` when no age metrics are found.
    """
    runs_dir = Path(runs_dir)
    out = Path(out_dir) if out_dir is not None else runs_dir / "age_report"
    found = find_age_metrics(runs_dir, exclude=[out])
    if not found:
        raise ParamsError(f"no age metrics below {runs_dir}; run `coopipe eval/zeroshot/linear-probe` on an age "
                          f"dataset (utkface, morph, agemanifest) first")
    by_dataset: dict[str, list[tuple[Path, dict[str, Any]]]] = defaultdict(list)
    for path, data in found:
        by_dataset[str(data["dataset"])].append((path, data))
    summaries = {}
    index = ["# Age estimation report", ""]
    for dataset in sorted(by_dataset):
        folder = out / dataset
        folder.mkdir(parents=True, exist_ok=True)
        summaries[dataset] = _dataset_report(dataset, by_dataset[dataset], folder)
        index += [f"- [{dataset}]({dataset}/{AGE_FILES['markdown']}): {summaries[dataset]['runs']} runs", ""]
        index += (folder / AGE_FILES["markdown"]).read_text(encoding="utf-8").replace("](", f"]({dataset}/").splitlines()
        index.append("")
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / AGE_FILES["index"], "\n".join(index) + "\n")
    logger.info("age report of %d runs (%s) written to %s", len(found), ", ".join(sorted(by_dataset)), out)
    return summaries

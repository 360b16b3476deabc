"""Stage `report`: the paper's tables and figures from every finished run below a runs folder.

Reads each ``metrics*.json`` below ``RUNS_DIR`` (the report folder itself excluded; unreadable or foreign files
are skipped with a warning), aggregates with the :mod:`coopipe.report` package and writes into the output folder
(default ``RUNS_DIR/report``):

- ``report.md``: few-shot table (method x shots rows, dataset columns + Average; mean ± population std over
  seeds, as CoOp's parse_test_res.py), gain over zero-shot, base-to-new and transfer tables, figure links;
- ``report.csv``: the same numbers in long format (one row per cell);
- ``fig3_accuracy_vs_shots.png`` (the paper's Figure 3) and ``fig4_gain_over_zeroshot.png`` (Figure 4);
- ``summary.json``: everything above as JSON;
- ``scores.json``: only numbers, nested ``{dataset: {method: {shotsK: mean}}}`` plus gains and base-to-new;
- ``headline.md``: the few-shot and gain tables alone, what a finished pipeline prints (`stages/report.py --show`).

:func:`export_metrics` copies one dataset's scores and its runs' training curves into a small folder meant for git
(the DVC pipeline's ``metrics/``): what `dvc exp show`, `dvc exp diff` and `dvc plots diff` compare.

Run by DVC as ``python stages/report.py`` (reads params.yaml: ``paths.runs`` and an optional ``report`` section
with ``gain_method``/``gain_shots``) and by ``coopipe report RUNS_DIR``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coopipe.atomic import write_json, write_text
from coopipe.config import ReportConfig
from coopipe.report.aggregate import (
    average_cells,
    base2new_rows,
    cost_rows,
    fewshot_cells,
    gain_shots_for,
    gains_over_zeroshot,
    transfer_cells,
)
from coopipe.report.figures import plot_accuracy_vs_shots, plot_gains
from coopipe.report.records import ReportError, RunRecord, dedupe, record_from_metrics
from coopipe.report.names import dataset_label
from coopipe.safe_names import safe_name
from coopipe.report.tables import STD_NOTE, csv_rows, csv_text, fewshot_markdown, gains_markdown, markdown_report
from coopipe.report.records import metrics_files

logger = logging.getLogger(__name__)

FILES = {
    "markdown": "report.md",
    "csv": "report.csv",
    "fig3": "fig3_accuracy_vs_shots.png",
    "fig4": "fig4_gain_over_zeroshot.png",
    "summary": "summary.json",
    "scores": "scores.json",
    "headline": "headline.md",
}
DATASET_REPORT = "report_{dataset}.md"  # write_dataset_reports: one per dataset
DATASET_FIGURE = "accuracy_vs_shots_{dataset}.png"
CURVES = "training"  # export_metrics: one <run>.tsv per run (epoch, lr, loss, train_acc, val_acc, seconds)


def collect_records(runs_dir: Path, *, exclude: Path | None = None) -> tuple[list[RunRecord], list[str]]:
    """Every readable run result below ``runs_dir`` (paths relative to it), and the files skipped (with why)."""
    records, skipped = [], []
    excluded = exclude.resolve() if exclude is not None else None
    for path in metrics_files(runs_dir):
        if excluded is not None and excluded in path.resolve().parents:
            continue
        rel = str(path.relative_to(runs_dir))
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ReportError(f"{rel} does not hold a JSON object")
            records.append(record_from_metrics(data, rel))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ReportError) as exc:
            logger.warning("skipping %s: %s", rel, exc)
            skipped.append(f"{rel}: {exc}")
    return dedupe(records), skipped


def _method_key(method: str, model: str, several_models: bool) -> str:
    return f"{method}@{model}" if several_models and model else method


def _accuracy_map(cells: Sequence[Any]) -> dict[str, Any]:
    """{dataset: {method: {"shots<K>": mean}}} (percent): flat enough for `dvc metrics show`/`dvc exp show`.
    Methods carry ``@<model>`` only when the runs hold several models."""
    several = len({c.model for c in cells}) > 1
    out: dict[str, Any] = {}
    for c in cells:
        method = _method_key(c.method, c.model, several)
        out.setdefault(c.dataset, {}).setdefault(method, {})[f"shots{c.shots}"] = round(c.accuracy.mean, 4)
    return out


def _gain_map(gains: Sequence[Any]) -> dict[str, Any]:
    """{dataset: {method: points}} (methods with ``@<model>`` when several models)."""
    several = len({g.model for g in gains}) > 1
    out: dict[str, Any] = {}
    for g in gains:
        out.setdefault(g.dataset, {})[_method_key(g.method, g.model, several)] = round(g.points, 4)
    return out


def _base2new_map(rows: Sequence[Any]) -> dict[str, Any]:
    several = len({r.model for r in rows}) > 1
    out: dict[str, Any] = {}
    for r in rows:
        if r.base.n and r.new.n:
            out.setdefault(r.dataset, {})[_method_key(r.method, r.model, several)] = {
                "base": round(r.base.mean, 4), "new": round(r.new.mean, 4), "hm": round(r.hm, 4)}
    return out


def run_report(
    runs_dir: str | Path,
    *,
    out_dir: str | Path | None = None,
    gain_method: str = "coop",
    gain_shots: int | None = None,
) -> dict[str, Any]:
    """Aggregate the runs below ``runs_dir`` and write the report files; returns the summary (summary.json)."""
    runs_dir = Path(runs_dir)
    out = Path(out_dir) if out_dir is not None else runs_dir / "report"
    records, skipped = collect_records(runs_dir, exclude=out)
    ages = [r for r in records if r.kind == "age"]
    if ages:  # exact-age accuracy means nothing for an age task: the age report (MAE) is theirs
        logger.info("%d age result(s) left to the age report", len(ages))
        records = [r for r in records if r.kind != "age"]
    cells = fewshot_cells(records)
    averages = average_cells(cells) if len({c.dataset for c in cells}) > 1 else []
    b2n = base2new_rows(records)
    transfer = transfer_cells(records)
    costs = cost_rows(records)
    shots = gain_shots if gain_shots is not None else gain_shots_for(cells, gain_method)
    gains = gains_over_zeroshot(cells, shots=gain_shots)
    logger.info("report over %d result(s) from %s (%d skipped)", len(records), runs_dir, len(skipped))

    out.mkdir(parents=True, exist_ok=True)
    plot_accuracy_vs_shots(cells, averages, out / FILES["fig3"])
    plot_gains(gains, out / FILES["fig4"], method=gain_method, shots=shots)
    figures = {"Figure 3: accuracy vs shots": FILES["fig3"], "Figure 4: gain over zero-shot CLIP": FILES["fig4"]}
    md = markdown_report(cells, averages, b2n, transfer, gains, title=f"coopipe report: {runs_dir}", figures=figures,
                         records=records, costs=costs)
    write_text(out / FILES["markdown"], md)
    per_dataset = write_dataset_reports(records, out, runs_dir=runs_dir)
    write_text(out / FILES["csv"], csv_text(csv_rows(cells, averages, b2n, transfer)))
    summary = {
        "runs_dir": str(runs_dir),
        "std": STD_NOTE,
        "n_records": len(records),
        "skipped": skipped,
        "runs": [{"path": r.path, "method": r.method, "setting": r.model, "shots": r.shots, "seed": r.seed}
                 for r in sorted(records, key=lambda r: r.path)],
        "accuracy": _accuracy_map([*cells, *averages]),
        "fewshot": [c.to_dict() for c in [*cells, *averages]],
        "gain": {"figure_method": gain_method, "figure_shots": shots, "rows": [g.to_dict() for g in gains]},
        "base2new": [r.to_dict() for r in b2n],
        "transfer": [t.to_dict() for t in transfer],
        "cost": [c.to_dict() for c in costs],
        "files": {k: str(out / v) for k, v in FILES.items()},
        "datasets": per_dataset,
    }
    write_json(out / FILES["summary"], summary)
    scores = {
        "accuracy": summary["accuracy"],
        "gain_over_zeroshot": _gain_map(gains),
        "base2new": _base2new_map(b2n),
    }
    write_json(out / FILES["scores"], scores)
    headline = [*fewshot_markdown(cells, averages), "", *gains_markdown(gains), "",
                f"Full report: {out / FILES['markdown']}"]
    write_text(out / FILES["headline"], "\n".join(headline).lstrip("\n") + "\n")
    return summary


def write_dataset_reports(records: Sequence[RunRecord], out: Path, *, runs_dir: Path) -> dict[str, dict[str, str]]:
    """One report per dataset (``report_<dataset>.md``): its method x shots table, base / new / H, transfer from
    it (domain generalisation, cross-dataset), its cost table, every row stamped with its setting, and its own
    accuracy-vs-shots figure (``accuracy_vs_shots_<dataset>.png``). Returns {dataset: {markdown, figure}}."""
    written: dict[str, dict[str, str]] = {}
    for dataset in sorted({r.dataset for r in records if r.kind in ("fewshot", "base2new")} | 
                          {r.source for r in records if r.kind == "transfer" and r.source}):
        mine = [r for r in records if dataset in (r.dataset, r.source) and r.kind != "other"]
        cells = fewshot_cells(mine)
        name = safe_name(dataset)
        figure = DATASET_FIGURE.format(dataset=name)
        plot_accuracy_vs_shots([c for c in cells if c.dataset == dataset], [], out / figure)
        md = markdown_report([c for c in cells if c.dataset == dataset], [], base2new_rows(mine),
                             transfer_cells(mine), gains_over_zeroshot([c for c in cells if c.dataset == dataset]),
                             title=f"coopipe report: {dataset_label(dataset)} ({runs_dir})",
                             figures={"Accuracy vs shots per class": figure}, records=mine, costs=cost_rows(mine))
        path = out / DATASET_REPORT.format(dataset=name)
        write_text(path, md)
        written[dataset] = {"markdown": str(path), "figure": str(out / figure)}
    return written


def export_metrics(report_dir: str | Path, metrics_dir: str | Path, *, dataset: str, curve_runs: str | Path) -> Path:
    """``metrics_dir/scores.json`` (``dataset``'s accuracies and gains from the report in ``report_dir``) and
    ``metrics_dir/training/<run>.tsv`` (the training history of each run folder in ``curve_runs``).

    Why a copy: run folders are large and git-ignored, so a DVC experiment commit cannot hold them; these few kB can
    be committed, and then every experiment carries its own numbers and curves."""
    metrics_dir = Path(metrics_dir)
    scores = json.loads((Path(report_dir) / FILES["scores"]).read_text(encoding="utf-8"))
    mine = {"accuracy": scores["accuracy"].get(dataset, {}),
            "gain_over_zeroshot": scores["gain_over_zeroshot"].get(dataset, {})}
    write_json(metrics_dir / FILES["scores"], mine)
    curves = metrics_dir / CURVES
    for stale in curves.glob("*.tsv") if curves.is_dir() else ():
        stale.unlink()
    for history in sorted(Path(curve_runs).glob("*/history.tsv")):
        write_text(curves / f"{history.parent.name}.tsv", history.read_text(encoding="utf-8"))
    return metrics_dir


def run_reports(
    runs_dir: str | Path,
    *,
    out_dir: str | Path | None = None,
    gain_method: str = ReportConfig.gain_method,
    gain_shots: int | None = ReportConfig.gain_shots,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`run_report`, and when the runs hold age results the age report beside it (``<runs>/age_report``:
    MAE by method x shots with the constant predictor, CS curves, plots). Returns (summary, {dataset: age summary})."""
    from coopipe.jobs.age_report import find_age_metrics, run_age_report  # age jobs load only with age runs

    runs_dir = Path(runs_dir)
    out = Path(out_dir) if out_dir is not None else runs_dir / "report"
    summary = run_report(runs_dir, out_dir=out, gain_method=gain_method, gain_shots=gain_shots)
    ages = run_age_report(runs_dir) if find_age_metrics(runs_dir, exclude=[out, runs_dir / "age_report"]) else {}
    return summary, ages

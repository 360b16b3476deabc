"""DVC stage `report`: the paper's tables and figures from every finished run below the runs folder.

Reads params.yaml (paths, data, train, report) and calls :func:`coopipe.jobs.report.run_reports` (``<runs>/report``;
when the runs hold age results also ``<runs>/age_report``: the MAE table by method x shots beside the constant
predictor, CS curves, plots), then :func:`coopipe.jobs.report.export_metrics`: the pipeline dataset's scores and its
runs' training curves into ``paths.metrics`` (git-tracked, so DVC experiments can be compared).
Run by DVC as ``python stages/report.py``; ``--show`` prints the headline tables of the last report and its path
(what `scripts/repro.sh` ends with).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from params import load_params

from coopipe.jobs.report import FILES, export_metrics, run_reports
from coopipe.logs import run_stage


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--runs", help="runs folder (default: paths.runs)")
    parser.add_argument("--out", help="output folder (default: <runs>/report)")
    parser.add_argument("--curves", help="folder of the run folders whose training curves go to paths.metrics")
    parser.add_argument("--show", action="store_true", help="print the last report's headline tables and path")
    args = parser.parse_args(argv)
    p = load_params(args.params)
    runs = Path(args.runs or p.paths.runs)
    out = Path(args.out) if args.out else runs / "report"
    if args.show:  # after `dvc repro`: the numbers and where the report is (nothing before a first report)
        headline = out / FILES["headline"]
        if headline.is_file():
            sys.stdout.write(headline.read_text(encoding="utf-8"))
        return
    run_reports(runs, out_dir=out, gain_method=p.report.gain_method, gain_shots=p.report.gain_shots)
    if args.curves:
        export_metrics(out, p.paths.metrics, dataset=p.data.dataset, curve_runs=args.curves)


if __name__ == "__main__":
    run_stage(main)

"""DVC stage `report`: the paper's tables and figures from every finished run below the runs folder.

Reads params.yaml (paths.runs, report) and calls :func:`coopipe.jobs.report.run_report`; when the runs hold age
results (``data.dataset=utkface|morph|agemanifest``) also :func:`coopipe.jobs.age_report.run_age_report`
(``<runs>/age_report``: the MAE table by method x shots beside the constant predictor, CS curves, plots).
Run by DVC as ``python stages/report.py``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from params import load_params

from coopipe.jobs.report import run_reports
from coopipe.logs import run_stage


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--runs", help="runs folder (default: paths.runs)")
    parser.add_argument("--out", help="output folder (default: <runs>/report)")
    args = parser.parse_args(argv)
    p = load_params(args.params)
    runs = Path(args.runs or p.paths.runs)
    out = Path(args.out) if args.out else runs / "report"
    run_reports(runs, out_dir=out, gain_method=p.report.gain_method, gain_shots=p.report.gain_shots)


if __name__ == "__main__":
    run_stage(main)

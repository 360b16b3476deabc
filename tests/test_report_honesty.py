"""The report never averages results that differ in weights or epochs, says when weights are random or the
protocol departs from the paper's, lists the runs it used, and shows no ± for a single seed."""

from __future__ import annotations

import json
from pathlib import Path

from coopipe.jobs.report import FILES, run_report


def _write(runs: Path, rel: str, **data) -> None:
    path = runs / rel / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": "RN50", "macro_f1": 0.5, "dataset": "eurosat", "method": "coop",
                                "shots": 16, **data}))


def test_results_of_other_weights_or_epochs_are_never_averaged(tmp_path: Path):
    runs = tmp_path / "runs"
    real = {"weights": "open_clip:RN50/openai", "epochs": 200, "paper_epochs": 200}
    for seed, acc in ((1, 0.80), (2, 0.90)):
        _write(runs, f"real/shots16_seed{seed}", seed=seed, accuracy=acc, **real)
    _write(runs, "random/shots16_seed1", seed=1, accuracy=0.10, weights="random-init:seed=0", epochs=200,
           paper_epochs=200)
    _write(runs, "short/shots16_seed1", seed=1, accuracy=0.50, epochs=20, paper_epochs=200,
           weights="open_clip:RN50/openai")
    summary = run_report(runs, out_dir=tmp_path / "report")
    cells = {c["model"]: c for c in summary["fewshot"]}
    assert set(cells) == {"RN50", "RN50 [random weights]", "RN50 [20 epochs (paper 200)]"}
    assert cells["RN50"]["accuracy"]["mean"] == 85.0 and cells["RN50"]["accuracy"]["n"] == 2
    assert cells["RN50 [random weights]"]["accuracy"]["mean"] == 10.0
    md = (tmp_path / "report" / FILES["markdown"]).read_text()
    assert "**Random weights**" in md and "**Not the paper's protocol**" in md
    assert "10.00 ±" not in md and "50.00 ±" not in md  # single seeds: no ±
    assert "85.00 ± 5.00" in md
    assert "## Runs used" in md and "random/shots16_seed1/metrics.json" in md
    assert len(summary["runs"]) == 4


def test_metrics_files_say_how_they_depart():
    from coopipe.report.records import departures

    assert departures({"weights": "random-init:seed=0", "epochs": 30, "paper_epochs": 200}) == [
        "random weights", "30 epochs (paper 200)"]
    assert departures({"weights": "open_clip:RN50/openai", "epochs": 200, "paper_epochs": 200}) == []

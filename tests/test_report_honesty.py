"""The report never averages results that differ in weights or epochs, says when weights are random or the
protocol departs from the paper's (on the row), compares a shortened run with zero-shot CLIP all the same, keeps
age results for the age report, lists the runs it used, and shows no ± for a single seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

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
    cells = {(c["model"], c["note"]): c for c in summary["fewshot"]}
    assert set(cells) == {("RN50", ""), ("RN50 [random weights]", ""), ("RN50", "20 epochs (paper 200)")}
    assert cells[("RN50", "")]["accuracy"]["mean"] == 85.0 and cells[("RN50", "")]["accuracy"]["n"] == 2
    assert cells[("RN50 [random weights]", "")]["accuracy"]["mean"] == 10.0
    md = (tmp_path / "report" / FILES["markdown"]).read_text()
    assert "**Random weights**" in md and "**Not the paper's protocol**" in md
    assert "10.00 ±" not in md and "50.00 ±" not in md  # single seeds: no ±
    assert "85.00 ± 5.00" in md
    assert "## Runs used" in md and "random/shots16_seed1/metrics.json" in md
    assert "| 20 epochs (paper 200) |" in md  # the departure is on the row
    assert len(summary["runs"]) == 4


def test_a_run_that_departs_from_the_paper_epochs_still_gets_its_gain(tmp_path: Path):
    """The offline main job's setting: random weights, 10 epochs instead of the paper's 50 / 200, zero-shot CLIP and
    the linear probe beside CoOp. Every method gets its gain over zero-shot, the departure on its row and bar."""
    runs = tmp_path / "runs"
    short = {"weights": "random-init:seed=0", "seed": 1}
    _write(runs, "zeroshot", method="zeroshot", shots=None, accuracy=0.10, weights="random-init:seed=0")
    _write(runs, "coop/shots1_seed1", shots=1, accuracy=0.15, epochs=10, paper_epochs=50, **short)
    _write(runs, "coop/shots16_seed1", shots=16, accuracy=0.30, epochs=10, paper_epochs=200, **short)
    _write(runs, "linear_probe/shots16_seed1", method="linear_probe", shots=16, accuracy=0.25, **short)
    _write(runs, "utk/coop/shots16_seed1", dataset="utkface", shots=16, accuracy=0.01, mae_exp=12.0, **short)
    summary = run_report(runs, out_dir=tmp_path / "report")
    gains = {g["method"]: (g["gain"], g["note"]) for g in summary["gain"]["rows"]}
    assert gains == {"coop": (pytest.approx(20.0), "10 epochs (paper 200)"), "linear_probe": (pytest.approx(15.0), "")}
    scores = json.loads((tmp_path / "report" / FILES["scores"]).read_text())
    assert scores["gain_over_zeroshot"] == {"eurosat": {"coop": 20.0, "linear_probe": 15.0}}
    md = (tmp_path / "report" / FILES["markdown"]).read_text()
    assert "| EuroSAT | CoOp | 16 | 10.00 | 30.00 | +20.00 | 10 epochs (paper 200) |" in md
    assert "UTKFace" not in md and "utkface" not in json.dumps(scores)  # age results: the age report's
    coop = {c["shots"] for c in summary["fewshot"] if c["method"] == "coop"}
    assert coop == {1, 16}  # one CoOp series, whatever each point's epochs
    from PIL import Image

    fig4 = np.asarray(Image.open(tmp_path / "report" / FILES["fig4"]).convert("L"))
    assert (fig4 < 200).mean() > 0.02, "the gain figure is drawn (bars and labels), not a 'no results' page"


def test_metrics_files_say_how_they_depart():
    from coopipe.report.records import departures

    assert departures({"weights": "random-init:seed=0", "epochs": 30, "paper_epochs": 200}) == [
        "random weights", "30 epochs (paper 200)"]
    assert departures({"weights": "open_clip:RN50/openai", "epochs": 200, "paper_epochs": 200}) == []

"""The report (mean ± std over seeds, tables, figures) on hand-made run folders, and the batch scripts as presets
of `coopipe sweep` (a `coopipe` that logs its arguments stands in for the real one, COOPIPE_BIN).

The numbers are checked exactly: seeds at 50/60/70 % give 60.00 ± 8.16, the *population* std (ddof=0) that
CoOp's parse_test_res.py computes with np.std (the sample std would be 10.00).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from coopipe.cli import app
from coopipe.report.aggregate import (
    Stat,
    average_cells,
    base2new_rows,
    fewshot_cells,
    gains_over_zeroshot,
    harmonic_mean,
    summarize,
)
from coopipe.report.figures import shot_position
from coopipe.report.names import method_label, method_order
from coopipe.report.records import ReportError, RunRecord, dedupe, record_from_metrics
from coopipe.jobs.report import FILES, run_report

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
POP_STD = math.sqrt(200 / 3)  # std of 50, 60, 70 with ddof=0 = 8.1650 (sample std: 10)


def _write(runs: Path, rel: str, name: str = "metrics.json", **data) -> Path:
    path = runs / rel / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": "RN50", "macro_f1": 0.5, **data}))
    return path


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """Two datasets: zero-shot, CoOp 1/16 shots x 3 seeds, a linear probe, a base-to-new and a transfer run."""
    runs = tmp_path / "runs"
    for ds, zs, shift in (("eurosat", 0.40, 0.0), ("dtd", 0.30, 0.1)):
        _write(runs, f"{ds}/zeroshot", method="zeroshot", dataset=ds, shots=0, seed=None, accuracy=zs)
        for seed, acc in zip((1, 2, 3), (0.5, 0.6, 0.7)):
            _write(runs, f"{ds}/coop/shots16_seed{seed}", method="coop", dataset=ds, shots=16, seed=seed,
                   accuracy=acc + shift)
            _write(runs, f"{ds}/coop/shots1_seed{seed}", method="coop", dataset=ds, shots=1, seed=seed,
                   accuracy=0.45)
        for seed in (1, 2):  # one seed short: the table marks it
            _write(runs, f"{ds}/linear_probe/shots16_seed{seed}", method="linear_probe", dataset=ds, shots=16,
                   seed=seed, accuracy=0.5)
    for seed, (b, n) in zip((1, 2), ((0.8, 0.6), (0.9, 0.5))):
        rel = f"eurosat/base2new/coop/shots16_seed{seed}"
        common = {"method": "coop", "dataset": "eurosat", "shots": 16, "seed": seed, "train_classes": "base"}
        _write(runs, rel, "metrics_base.json", classes="base", accuracy=b, **common)
        _write(runs, rel, "metrics_new.json", classes="new", accuracy=n, **common)
    _write(runs, "eurosat/coop/shots16_seed1/transfer/dtd", method="coop", dataset="dtd", shots=16, seed=1,
           accuracy=0.25, source_dataset="eurosat", classes="all")
    (runs / "eurosat" / "broken").mkdir()
    (runs / "eurosat" / "broken" / "metrics.json").write_text("{not json")
    return runs


def test_mean_std_tables_csv_and_figures(runs: Path, tmp_path: Path):
    out = tmp_path / "report"
    returned = run_report(runs, out_dir=out)
    summary = json.loads((out / FILES["summary"]).read_text())  # what was written, as JSON
    assert returned["n_records"] == summary["n_records"]
    assert summary["n_records"] == 2 * (1 + 6 + 2) + 4 + 1 and len(summary["skipped"]) == 1

    cells = {(c["dataset"], c["method"], c["shots"]): c for c in summary["fewshot"]}
    coop16 = cells[("eurosat", "coop", 16)]["accuracy"]
    assert coop16["mean"] == pytest.approx(60.0, abs=1e-9) and coop16["std"] == pytest.approx(POP_STD, abs=1e-9)
    assert coop16["n"] == 3 and coop16["seeds"] == [1, 2, 3]
    assert cells[("dtd", "coop", 16)]["accuracy"]["mean"] == pytest.approx(70.0, abs=1e-9)
    # Average over datasets: mean of the means; std over seeds of the per-seed averages (55/65/75)
    avg = cells[("average", "coop", 16)]
    assert avg["accuracy"]["mean"] == pytest.approx(65.0, abs=1e-9)
    assert avg["accuracy"]["std"] == pytest.approx(POP_STD, abs=1e-9) and avg["n_datasets"] == 2
    assert cells[("average", "zeroshot", 0)]["accuracy"]["mean"] == pytest.approx(35.0, abs=1e-9)
    assert summary["accuracy"]["eurosat"]["coop"]["shots16"] == pytest.approx(60.0)
    scores = json.loads((out / FILES["scores"]).read_text())  # numbers only, for `dvc metrics`
    assert scores["accuracy"]["average"]["coop"]["shots16"] == pytest.approx(65.0)
    assert {ds: by["coop"] for ds, by in scores["gain_over_zeroshot"].items()} == pytest.approx(
        {"eurosat": 20.0, "dtd": 40.0})
    assert set(scores["gain_over_zeroshot"]["eurosat"]) == {"coop", "linear_probe"}  # every method is compared
    assert scores["base2new"]["eurosat"]["coop"]["hm"] == pytest.approx(2 * 85 * 55 / 140, abs=1e-4)

    gains = {g["dataset"]: g["gain"] for g in summary["gain"]["rows"] if g["method"] == "coop"}
    assert summary["gain"]["figure_shots"] == 16 and gains == pytest.approx({"eurosat": 20.0, "dtd": 40.0})
    (b2n,) = [r for r in summary["base2new"] if r["dataset"] == "eurosat"]
    assert b2n["base"]["mean"] == pytest.approx(85.0) and b2n["new"]["mean"] == pytest.approx(55.0)
    assert b2n["hm"] == pytest.approx(2 * 85 * 55 / 140)
    (tr,) = summary["transfer"]
    assert (tr["source"], tr["dataset"], tr["accuracy"]["mean"]) == ("eurosat", "dtd", pytest.approx(25.0))

    md = (out / FILES["markdown"]).read_text()
    assert "| CoOp | 16 | 70.00 ± 8.16 | 60.00 ± 8.16 | 65.00 ± 8.16 |" in md  # DTD before EuroSAT: paper order
    assert "| Zero-shot CLIP | 0 | 30.00 | 40.00 | 35.00 |" in md
    assert "50.00 ± 0.00 (n=2)" in md and "ddof=0" in md and "np.std" in md
    assert "| EuroSAT | CoOp | 16 | 85.00 ± 5.00 | 55.00 ± 5.00 | 66.79 |" in md
    assert "| CoOp | EuroSAT | 16 | 60.00 ± 8.16 | 25.00 | 25.00 |" in md  # a single seed: no ±

    with (out / FILES["csv"]).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    row = next(r for r in rows if (r["table"], r["dataset"], r["method"], r["shots"]) == ("fewshot", "eurosat", "coop", "16"))
    assert float(row["mean"]) == pytest.approx(60.0) and float(row["std"]) == pytest.approx(POP_STD, abs=1e-4)
    assert row["seeds"] == "1;2;3" and row["n"] == "3"
    assert {r["classes"] for r in rows if r["table"] == "base2new"} == {"base", "new", "hm"}
    assert any(r["table"] == "transfer" and r["source"] == "eurosat" for r in rows)

    for name in (FILES["fig3"], FILES["fig4"]):
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200
    assert json.loads((out / FILES["summary"]).read_text())["std"].startswith("mean ± std")


def test_report_cli_default_out_ignores_itself(runs: Path):
    res = CliRunner().invoke(app, ["report", str(runs)])
    assert res.exit_code == 0, res.output
    assert (runs / "report" / FILES["fig3"]).is_file() and "few-shot cell(s)" in res.output
    again = CliRunner().invoke(app, ["report", str(runs)])  # its own files below RUNS are not results
    counts = [next(line for line in r.output.splitlines() if "few-shot cell(s)" in line) for r in (res, again)]
    assert again.exit_code == 0 and counts[0] == counts[1]
    missing = CliRunner().invoke(app, ["report", str(runs / "nope")])
    assert missing.exit_code == 1 and "no runs folder" in missing.output


def test_empty_runs_folder_still_writes_every_file(tmp_path: Path):
    summary = run_report(tmp_path, out_dir=tmp_path / "r")
    assert summary["n_records"] == 0
    assert all((tmp_path / "r" / f).is_file() for f in FILES.values())
    assert "No finished runs" in (tmp_path / "r" / FILES["markdown"]).read_text()


def test_statistics_and_records():
    stat = summarize([50.0, 60.0, 70.0], [1, 2, 3])
    assert stat.text() == "60.00 ± 8.16" and stat.text(expected_n=4) == "60.00 ± 8.16 (n=3)"
    assert Stat(37.5, 0.0, 1, (None,), (37.5,)).text() == "37.50"
    assert harmonic_mean(69.34, 74.22) == pytest.approx(71.70, abs=0.005)  # CoCoOp's CLIP average
    assert [shot_position(k) for k in (0, 1, 2, 4, 8, 16)] == [0, 1, 2, 3, 4, 5]
    assert method_label("coop_csc_middle") == "CoOp (CSC, middle)" and method_label("coop_m8") == "CoOp (M=8)"
    assert method_label("coop_init-a-photo-of-a") == 'CoOp (init "a photo of a", ctxv1, CoCoOp\'s base-to-new row)'
    assert method_label("linear_probe", "RN50", with_model=True) == "Linear probe CLIP [RN50]"
    labels = ["rank", "coop_init-age", "zz_unknown", "cocoop", "coop_m8", "coop", "ridge", "linear_probe", "zeroshot"]
    assert sorted(labels, key=method_order) == [
        "zeroshot", "linear_probe", "ridge", "coop", "coop_init-age", "coop_m8", "cocoop", "rank", "zz_unknown"]

    rec = record_from_metrics({"method": "zeroshot", "dataset": "dtd", "accuracy": 0.5, "shots": None})
    assert rec.shots == 0 and rec.kind == "fewshot"
    assert record_from_metrics({"method": "coop", "dataset": "d", "accuracy": 1, "shots": 4, "seed": 1,
                                "classes": "all", "train_classes": "base"}).kind == "other"
    for bad in ({"method": "coop", "dataset": "d"}, {"method": "coop", "dataset": "d", "accuracy": 61.0},
                {"method": "coop", "dataset": "d", "accuracy": 0.6, "shots": "16"}):
        with pytest.raises(ReportError):
            record_from_metrics(bad)

    a = RunRecord("d", "coop", 16, 1, 0.5, path="a/metrics.json")
    b = RunRecord("d", "coop", 16, 1, 0.9, path="b/metrics.json")
    assert dedupe([b, a]) == [a]  # the same seed twice would shrink the std: the first by path is kept
    cells = fewshot_cells([a, RunRecord("d", "coop", 16, 2, 0.7)])
    assert cells[0].accuracy.mean == pytest.approx(60.0) and cells[0].accuracy.std == pytest.approx(10.0)
    assert average_cells(cells)[0].n_datasets == 1
    assert gains_over_zeroshot(cells) == []  # no zero-shot result: no gain
    assert base2new_rows([a]) == []

    b2n = [RunRecord(ds, "coop", 16, seed, acc, classes=half, train_classes="base")
           for ds, half, accs in (("a", "base", (0.8, 0.9)), ("a", "new", (0.6, 0.5)),
                                  ("b", "base", (0.6, 0.7)), ("b", "new", (0.4, 0.5)))
           for seed, acc in zip((1, 2), accs)]
    avg = base2new_rows(b2n)[-1]  # per-seed averages: base 70/80, new 50/50
    assert avg.dataset == "average" and avg.base.text() == "75.00 ± 5.00" and avg.new.text() == "50.00 ± 0.00"
    assert avg.hm == pytest.approx(60.0)


# ---------------------------------------------------------------- batch scripts over `coopipe sweep`
# What a sweep does (only missing runs, locks, failures, encode once, threads, a LocalCluster against one by one,
# a killed sweep re-run) is tested with real small runs in tests/test_sweep.py; here: each script's preset.
ECHO = """#!/usr/bin/env bash
echo "$*" >>"$STUB_LOG"
"""


@pytest.fixture
def stub(tmp_path: Path) -> dict[str, str]:
    """Environment running the scripts against a `coopipe` that only logs its arguments."""
    bin_ = tmp_path / "coopipe-echo"
    bin_.write_text(ECHO)
    bin_.chmod(0o755)
    return {**os.environ, "COOPIPE_BIN": str(bin_), "STUB_LOG": str(tmp_path / "calls.log")}


def _script(name: str, *args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPTS / name), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("script, preset", [
    ("paper_grid.sh", "sweep --zeroshot --linear-probe"),
    ("fewshot_grid.sh", "sweep --no-report"),
    ("zeroshot.sh", "sweep --no-fewshot --zeroshot --no-report"),
    ("linear_probe.sh", "sweep --no-fewshot --linear-probe --no-report"),
    ("base2new.sh", "sweep --no-fewshot --base2new --zeroshot --shots 16"),
    ("methods_grid.sh", "sweep --methods all --zeroshot --linear-probe --jobs 1 --stack off"),
])
def test_scripts_are_presets_of_coopipe_sweep(script: str, preset: str, stub, tmp_path: Path):
    res = _script(script, "--dataset", "eurosat", "--jobs", "2", env=stub, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert Path(stub["STUB_LOG"]).read_text() == f"{preset} --dataset eurosat --jobs 2\n"


def test_cross_dataset_maps_source_and_targets(stub, tmp_path: Path):
    res = _script("domain_generalization.sh", "--data-root", "d", "--seeds", "1", env=stub, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert Path(stub["STUB_LOG"]).read_text() == (
        "sweep --dataset imagenet --targets imagenetv2,imagenet_sketch,imagenet_a,imagenet_r --zeroshot --shots 16 "
        "--data-root d --seeds 1\n")
    bad = _script("cross_dataset.sh", "--dataset", "eurosat", env=stub, cwd=tmp_path)
    assert bad.returncode == 2 and "--source and --targets" in bad.stderr


def test_sweep_refuses_bad_options_with_code_2(tmp_path: Path):
    res = CliRunner().invoke(app, ["sweep", "--dataset", "eurosat", "--no-encode", "--base2new", "--csc"])
    assert res.exit_code == 2 and "unified context" in res.output
    res = CliRunner().invoke(app, ["sweep", "--dataset", "eurosat", "--no-encode", "--variants", "coop_wide"])
    assert res.exit_code == 2 and "variant token" in res.output


def test_domain_generalization_names_missing_data(tmp_path: Path):
    coopipe = tmp_path / "coopipe"
    coopipe.write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" -m coopipe.cli "$@"\n')
    coopipe.chmod(0o755)
    env = {**os.environ, "COOPIPE_BIN": str(coopipe), "PYTHONPATH": str(ROOT / "pipeline")}
    (tmp_path / "empty").mkdir()
    res = _script("domain_generalization.sh", "--data-root", "empty", env=env, cwd=tmp_path)
    assert res.returncode == 2
    for name in ("imagenet (source)", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"):
        assert f"  {name}" in res.stderr
    assert "--skip-missing" in res.stderr and not (tmp_path / "runs").exists()
    assert "Usage" in _script("domain_generalization.sh", "--help", env=env, cwd=tmp_path).stdout


@pytest.mark.parametrize("script", ["fewshot_grid.sh", "zeroshot.sh", "linear_probe.sh", "paper_grid.sh",
                                    "base2new.sh", "cross_dataset.sh", "domain_generalization.sh", "methods_grid.sh"])
def test_every_script_has_usage(script: str, tmp_path: Path):
    res = _script(script, "--help", env=dict(os.environ), cwd=tmp_path)
    assert res.returncode == 0 and "Usage: bash scripts/" in res.stdout and "--data-root" in res.stdout

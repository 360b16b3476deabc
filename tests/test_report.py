"""The report (mean ± std over seeds, tables, figures) on hand-made run folders, and the batch scripts' skip,
lock, failure and encode-once logic with a stub `coopipe` command (COOPIPE_BIN) standing in for the real one.

The numbers are checked exactly: seeds at 50/60/70 % give 60.00 ± 8.16, the *population* std (ddof=0) that
CoOp's parse_test_res.py computes with np.std (the sample std would be 10.00).
"""

from __future__ import annotations

import csv
import fcntl
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
from coopipe.report.names import method_label
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
    assert scores["gain_over_zeroshot"] == pytest.approx({"eurosat": 20.0, "dtd": 40.0})
    assert scores["base2new"]["eurosat"]["coop"]["hm"] == pytest.approx(2 * 85 * 55 / 140, abs=1e-4)

    gains = {g["dataset"]: g["gain"] for g in summary["gain"]["datasets"]}
    assert summary["gain"]["shots"] == 16 and gains == pytest.approx({"eurosat": 20.0, "dtd": 40.0})
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
    assert "| CoOp | EuroSAT | 16 | 60.00 ± 8.16 | 25.00 ± 0.00 | 25.00 |" in md

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
    assert method_label("coop_init-a-photo-of-a") == 'CoOp (init "a photo of a")'
    assert method_label("linear_probe", "RN50", with_model=True) == "Linear probe CLIP [RN50]"

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


# ---------------------------------------------------------------- batch scripts with a stub coopipe
STUB = r"""#!/usr/bin/env bash
# A stand-in for `coopipe`: logs the call and writes the files the real command would write.
echo "$* [threads=${OMP_NUM_THREADS:-unset}]" >>"$STUB_LOG"
cmd=$1; shift
if [[ $cmd == train ]]; then echo begin >>"$STUB_LOG.spans"; trap 'echo end >>"$STUB_LOG.spans"' EXIT; fi
out="" seed="" classes=all args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in --out) out=${args[i+1]} ;; --seed) seed=${args[i+1]} ;; --classes) classes=${args[i+1]} ;; esac
done
sleep "${STUB_SLEEP:-0}"
metrics='{"method": "m", "dataset": "d", "shots": 1, "seed": 1, "accuracy": 0.5}'
case $cmd in
  encode) ;;
  train)
    if [[ -n ${STUB_FAIL_SEED:-} && $seed == "$STUB_FAIL_SEED" ]]; then echo "error: boom" >&2; exit 1; fi
    mkdir -p "$out" && echo '{}' >"$out/prompt.json" ;;
  eval)
    target=${out:-$1/metrics.json}; mkdir -p "$(dirname "$target")"; echo "$metrics" >"$target"
    echo "coop on d: accuracy 50.00%" ;;
  zeroshot)
    name=metrics.json; [[ $classes == all ]] || name=metrics_$classes.json
    mkdir -p "$out" && echo "$metrics" >"$out/$name" ;;
  linear-probe) mkdir -p "$out" && echo "$metrics" >"$out/metrics.json" ;;
  report) mkdir -p "${args[-1]}" && echo '{}' >"${args[-1]}/summary.json" ;;
  *) echo "stub: unknown command $cmd" >&2; exit 2 ;;
esac
"""


@pytest.fixture
def stub(tmp_path: Path) -> dict[str, str]:
    """Environment running the scripts against the stub; the calls land in STUB_LOG."""
    bin_ = tmp_path / "coopipe-stub"
    bin_.write_text(STUB)
    bin_.chmod(0o755)
    (tmp_path / "data").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {**env, "COOPIPE_BIN": str(bin_), "COOPIPE_PYTHON": sys.executable, "STUB_LOG": str(tmp_path / "calls.log")}


def _script(name: str, *args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPTS / name), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def _calls(env: dict[str, str], command: str) -> list[str]:
    log = Path(env["STUB_LOG"])
    return [line for line in (log.read_text().splitlines() if log.exists() else []) if line.split()[0] == command]


GRID = ("--dataset", "eurosat,dtd", "--data-root", "data", "--pretrained", "none", "--shots", "1,16", "--seeds", "1,2")


def test_paper_grid_encodes_once_runs_everything_then_nothing(stub, tmp_path: Path):
    res = _script("paper_grid.sh", *GRID, env=stub, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    encodes = _calls(stub, "encode")
    assert len(encodes) == 2  # one per dataset, with every shot (the paper's up to the largest) and seed
    assert all("--shots 1,2,4,8,16 --seeds 1,2" in call for call in encodes)
    assert len(_calls(stub, "train")) == len(_calls(stub, "eval")) == 2 * 2 * 2
    assert len(_calls(stub, "zeroshot")) == 2 and len(_calls(stub, "linear-probe")) == 8
    assert (tmp_path / "runs/eurosat/coop/shots16_seed2/metrics.json").is_file()
    assert (tmp_path / "runs/dtd/linear_probe/shots1_seed1/metrics.json").is_file()
    assert (tmp_path / "runs/eurosat/zeroshot/metrics.json").is_file() and len(_calls(stub, "report")) == 1
    assert "18 done, 0 already finished" in res.stdout

    Path(stub["STUB_LOG"]).unlink()
    again = _script("paper_grid.sh", *GRID, env=stub, cwd=tmp_path)
    assert again.returncode == 0 and not Path(stub["STUB_LOG"]).exists()  # no encode, no run, no report
    assert "0 done, 18 already finished" in again.stdout and "up to date" in again.stdout


def test_grid_skips_locked_runs_and_summarises_failures(stub, tmp_path: Path):
    held = tmp_path / "runs/eurosat/coop_csc_middle/shots1_seed1"
    held.parent.mkdir(parents=True)
    with open(f"{held}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process is training this run
        res = _script("fewshot_grid.sh", "--dataset", "eurosat", "--data-root", "data", "--shots", "1,2",
                      "--seeds", "1,2,3", "--csc", "--position", "middle", "--jobs", "2",
                      env={**stub, "STUB_FAIL_SEED": "3"}, cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    trained = [c for c in _calls(stub, "train") if "--csc" in c and "--class-token-position middle" in c]
    assert len(trained) == 5 and not any(f"--out {held} " in c for c in trained)
    assert "[held] coop_csc_middle eurosat 1-shot seed 1" in res.stdout
    assert "3 done, 0 already finished, 1 held by another process, 2 failed" in res.stdout
    assert "coop_csc_middle eurosat 2-shot seed 3  (see runs/eurosat/coop_csc_middle/shots2_seed3/log.txt)" in res.stdout
    assert "error: boom" in (tmp_path / "runs/eurosat/coop_csc_middle/shots2_seed3/log.txt").read_text()

    Path(stub["STUB_LOG"]).unlink()
    retry = _script("fewshot_grid.sh", "--dataset", "eurosat", "--data-root", "data", "--shots", "1,2",
                    "--seeds", "1,2,3", "--variants", "csc_middle", env=stub, cwd=tmp_path)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert len(_calls(stub, "encode")) == 1 and len(_calls(stub, "train")) == 3  # only what was missing
    assert "3 done, 3 already finished" in retry.stdout


def _max_concurrent_trains(env: dict[str, str]) -> int:
    running = peak = 0
    for line in Path(env["STUB_LOG"] + ".spans").read_text().split():
        running += 1 if line == "begin" else -1
        peak = max(peak, running)
    return peak


def test_auto_jobs_run_single_thread_runs_side_by_side(stub, tmp_path: Path):
    """--jobs auto: every run at once when that is at most 2 per core, 1 thread each; encoding keeps all cores."""
    cores = len(os.sched_getaffinity(0))
    env = {**stub, "STUB_SLEEP": "0.5"}
    res = _script("fewshot_grid.sh", "--dataset", "eurosat", "--data-root", "data", "--shots", "1",
                  "--seeds", "1,2,3", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    jobs = min(3, 2 * cores)
    threads = max(1, cores // jobs)
    assert f"3 run(s) to do: {jobs} at a time, {threads} thread(s) each" in res.stdout
    assert _calls(stub, "encode")[0].endswith("[threads=unset]")
    assert all(c.endswith(f"[threads={threads}]") for c in _calls(stub, "train") + _calls(stub, "eval"))
    assert _max_concurrent_trains(stub) == jobs

    for f in (stub["STUB_LOG"], stub["STUB_LOG"] + ".spans"):
        Path(f).unlink()
    res = _script("fewshot_grid.sh", "--dataset", "eurosat", "--data-root", "data", "--shots", "2",
                  "--seeds", "1,2", "--jobs", "1", "--no-encode", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert all(c.endswith(f"[threads={cores}]") for c in _calls(stub, "train"))
    assert _max_concurrent_trains(stub) == 1

    res = _script("fewshot_grid.sh", "--dataset", "eurosat", "--shots", "4", "--seeds", "1,2", "--jobs", "2",
                  "--no-encode", env={**stub, "OMP_NUM_THREADS": str(cores)}, cwd=tmp_path)
    assert res.returncode == 0 and "exceed the" in res.stderr  # kept, with a warning
    assert all(c.endswith(f"[threads={cores}]") for c in _calls(stub, "train"))


def test_two_grids_at_once_train_each_run_once(stub, tmp_path: Path):
    env = {**stub, "STUB_SLEEP": "0.3"}
    args = ["bash", str(SCRIPTS / "fewshot_grid.sh"), "--dataset", "eurosat", "--data-root", "data",
            "--shots", "1,2", "--seeds", "1,2,3", "--epochs", "2", "--jobs", "2"]
    procs = [subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    outs = [c.split("--out ")[1].split()[0] for c in _calls(stub, "train")]
    assert len(outs) == 6 and len(set(outs)) == 6  # each run trained by exactly one of the two
    assert all(o.startswith("runs-ep2/eurosat/coop/") and "--epochs 2" in c for o, c in zip(outs, _calls(stub, "train")))
    assert len(list((tmp_path / "runs-ep2/eurosat/coop").glob("*/metrics.json"))) == 6


def test_base2new_and_transfer_scripts(stub, tmp_path: Path):
    res = _script("base2new.sh", "--dataset", "eurosat", "--data-root", "data", "--seeds", "1", env=stub, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    run = tmp_path / "runs/eurosat/base2new/coop/shots16_seed1"
    assert (run / "metrics_base.json").is_file() and (run / "metrics_new.json").is_file()
    assert "--classes base" in _calls(stub, "train")[0]
    assert {c.split("--classes ")[1].split()[0] for c in _calls(stub, "eval")} == {"base", "new"}
    assert (tmp_path / "runs/eurosat/base2new/zeroshot/metrics_new.json").is_file()
    bad = _script("base2new.sh", "--dataset", "eurosat", "--no-encode", "--csc", env=stub, cwd=tmp_path)
    assert bad.returncode == 2 and "unified context" in bad.stderr

    res = _script("cross_dataset.sh", "--source", "eurosat", "--targets", "dtd,ucf101", "--no-encode",
                  "--seeds", "1,2", env=stub, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    transfers = [c for c in _calls(stub, "eval") if "--transfer" in c]
    assert len(transfers) == 4
    assert (tmp_path / "runs/eurosat/coop/shots16_seed2/transfer/ucf101/metrics.json").is_file()


def test_domain_generalization_names_missing_data(tmp_path: Path):
    env = {**os.environ, "COOPIPE_PYTHON": sys.executable}
    (tmp_path / "empty").mkdir()
    res = _script("domain_generalization.sh", "--data-root", "empty", env=env, cwd=tmp_path)
    assert res.returncode == 2
    for name in ("imagenet (source)", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"):
        assert f"  {name}" in res.stderr
    assert "--skip-missing" in res.stderr and not (tmp_path / "runs").exists()
    assert "Usage" in _script("domain_generalization.sh", "--help", env=env, cwd=tmp_path).stdout


@pytest.mark.parametrize("script", ["fewshot_grid.sh", "zeroshot.sh", "linear_probe.sh", "paper_grid.sh",
                                    "base2new.sh", "cross_dataset.sh", "domain_generalization.sh"])
def test_every_script_has_usage(script: str, tmp_path: Path):
    res = _script(script, "--help", env=dict(os.environ), cwd=tmp_path)
    assert res.returncode == 0 and "Usage: bash scripts/" in res.stdout and "--data-root" in res.stdout

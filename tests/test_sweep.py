"""`coopipe sweep` with real small runs (real EuroSAT images, RN50 random weights, 2 epochs, M = 4, 3 classes):
the plan, a LocalCluster of 2 workers against the same runs one by one, and a sweep killed mid-grid then re-run."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import copy_eurosat_folder
from coopipe.errors import ParamsError
from coopipe.methods import MethodSpec
from coopipe.sweep import SweepSpec, auto_jobs, parse_variant, plan_sweep, run_sweep
from coopipe.sweep.options import encode_args, train_args
from coopipe.sweep.plan import RunSettings
from coopipe.report.records import metrics_files

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("Forest", "SeaLake", "Highway")
NAME = "imagefolder-eurosat3"


def test_plan_folders_order_and_encodes(tmp_path: Path):
    spec = SweepSpec(datasets=("eurosat",), methods=(MethodSpec(), parse_variant("middle")), shots=(1, 16),
                     seeds=(1, 2), zeroshot=True, linear_probe=True, targets=("dtd",), encode=False,
                     runs=str(tmp_path / "runs"))
    plan = plan_sweep(spec)
    labels = [t.label for t in plan.tasks]
    assert labels[0] == "coop eurosat 16-shot seed 1"  # longest first: most shots, CoOp before baselines
    assert labels.index("coop_middle eurosat 1-shot seed 2") < labels.index("linear_probe eurosat 16-shot seed 1")
    assert labels.index("linear_probe eurosat 1-shot seed 2") < labels.index("zeroshot eurosat")
    kinds = [t.kind for t in plan.tasks]
    methods = [t.method.method for t in plan.tasks if t.kind == "coop"]  # the baselines are methods
    assert methods.count("coop") == 8 and methods.count("linear_probe") == 4 and methods.count("zeroshot") == 2
    assert kinds.count("transfer") == 8 and kinds[-8:] == ["transfer"] * 8  # phase 1, after the source runs
    run = next(t for t in plan.tasks if t.label == "coop_middle eurosat 16-shot seed 2")
    assert run.run_dir == str(tmp_path / "runs/eurosat/coop_middle/shots16_seed2")
    assert run.done_files == (run.run_dir + "/metrics.json",)
    assert plan.encodes == ()  # --no-encode
    assert [parse_variant(v).label() for v in ("coop", "csc", "m8", "init", "coop_init-a-photo-of-a")] == [
        "coop", "coop_csc", "coop_m8", "coop_init-a-photo-of-a", "coop_init-a-photo-of-a"]
    assert plan_sweep(SweepSpec(datasets=("d",), shots=(16,), encode=False, settings=RunSettings(epochs=2))).runs_dir == "runs-ep2"
    with pytest.raises(ParamsError, match="unified context"):
        plan_sweep(SweepSpec(datasets=("d",), methods=(parse_variant("csc"),), base2new=True, encode=False))
    with pytest.raises(ParamsError, match="variant token"):
        parse_variant("coop_wide")
    assert train_args("--bf16 --batch-size 32 --epochs 3") == {"autocast_bf16": True, "batch_size": 32, "max_epoch": 3}
    assert encode_args("--precision fp32 --engine eager --workers 2") == {
        "precision": "fp32", "engine": "eager", "num_workers": 2}  # the sweep forwards the engine like precision
    assert auto_jobs(3, cores=2, available_gib=64) == 3 and auto_jobs(9, cores=2, available_gib=64) == 4
    assert auto_jobs(9, cores=2, available_gib=5) == 2 and auto_jobs(9, "cuda") == 1


def test_base2new_default_coop_is_cocoops_table_row(tmp_path: Path):
    """Base-to-new without --methods trains the CoOp row of CoCoOp's table (CoOp's vit_b16_ctxv1: M = 4 from "a photo
    of a"), labelled as such in the report; methods a user names replace it; the few-shot grid keeps CoOp's own."""
    from coopipe.report.names import method_label
    from coopipe.sweep.plan import BASE2NEW_METHODS

    spec = SweepSpec(datasets=("eurosat",), shots=(16,), seeds=(1,), base2new=True, encode=False,
                     runs=str(tmp_path / "runs"))
    plan = plan_sweep(spec)
    halves = {t.method.label() for t in plan.tasks if t.kind == "base2new"}
    assert halves == {"coop_init-a-photo-of-a"} == {m.label() for m in BASE2NEW_METHODS}
    assert {t.method.label() for t in plan.tasks if t.kind == "coop"} == {"coop"}
    ctxv1 = MethodSpec.parse("coop_init-a-photo-of-a")
    assert (ctxv1.ctx_init, ctxv1.csc, ctxv1.class_token_position) == ("a photo of a", False, "end")
    assert "CoCoOp's base-to-new row" in method_label("coop_init-a-photo-of-a") and method_label("coop") == "CoOp"
    named = plan_sweep(SweepSpec(datasets=("eurosat",), methods=(MethodSpec(), MethodSpec("cocoop")), shots=(16,),
                                 seeds=(1,), base2new=True, fewshot=False, encode=False, runs=str(tmp_path / "runs")))
    assert {t.method.label() for t in named.tasks if t.kind == "base2new"} == {"coop", "cocoop"}


def test_held_runs_are_left_alone_and_failures_do_not_stop_the_sweep(tmp_path: Path):
    plan = plan_sweep(_spec(tmp_path / "no-cache", tmp_path / "runs", shots=(1,), seeds=(1, 2)))
    held = Path(plan.tasks[0].run_dir)
    held.parent.mkdir(parents=True)
    with open(f"{held}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process is running this run
        out = run_sweep(plan, scheduler="inline", progress=False, retries=1)
    assert [r.status for r in out.results] == ["held", "failed"]
    (failed,) = out.failed
    log = (Path(failed.run_dir) / "log.txt").read_text()
    assert "StoreError" in failed.error and log.count("StoreError") >= 2 and log.count(" failed:\n") == 2  # retried once


@pytest.fixture(scope="module")
def small(eurosat_root: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, cache) with the few-shot stores of shots 1,2 x seeds 1,2 encoded once."""
    from coopipe.encode import EncodeOptions
    from coopipe.jobs.encode import run_encode

    base = tmp_path_factory.mktemp("sweep")
    folder = copy_eurosat_folder(eurosat_root, base / "eurosat3", CLASSES, 8)
    cache = base / "cache"
    run_encode(dataset="imagefolder", data_root=folder, cache_dir=cache, model="RN50", pretrained="none", views=2,
               shots=(1, 2), seeds=(1, 2), options=EncodeOptions(progress=False, batch_size=32))
    return folder, cache


def _spec(cache: Path, runs: Path, **kw) -> SweepSpec:
    settings = RunSettings(cache=str(cache), pretrained="none", epochs=2)
    return SweepSpec(datasets=(NAME,), methods=(MethodSpec.of("coop", n_ctx=4),), encode=False, runs=str(runs),
                     settings=settings, **kw)


def _metrics(runs: Path) -> dict[str, dict]:
    keep = ("accuracy", "macro_f1", "per_class_accuracy", "method", "shots", "seed")
    return {str(p.relative_to(runs)): {k: v for k, v in json.loads(p.read_text()).items() if k in keep}
            for p in metrics_files(runs, "metrics.json")}


@pytest.mark.slow  # a LocalCluster of 2 worker processes, each loading RN50: about 45 s on 2 cores
def test_local_cluster_of_two_workers_matches_one_by_one(small, tmp_path: Path):
    _, cache = small
    spec: dict = {"shots": (1, 2), "seeds": (1,), "zeroshot": True}
    inline = run_sweep(plan_sweep(_spec(cache, tmp_path / "a", **spec)), scheduler="inline", progress=False)
    cluster = run_sweep(plan_sweep(_spec(cache, tmp_path / "b", **spec)), jobs=2, progress=False)
    assert inline.count("done") == cluster.count("done") == 3 and cluster.jobs == 2 and cluster.threads >= 1
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert len(a) == 3 and a == b  # bit-identical metrics, per class included
    again = run_sweep(plan_sweep(_spec(cache, tmp_path / "b", **spec)), jobs=2, progress=False)
    assert again.count("skipped") == 3 and again.jobs == 0  # nothing to do: no cluster started


@pytest.mark.slow  # two `coopipe sweep` processes with a LocalCluster each (~40 s of CPU on 2 cores)
def test_killed_sweep_reruns_only_missing_runs(small, tmp_path: Path):
    folder, cache = small
    env = {**os.environ, "PYTHONPATH": str(ROOT / "pipeline"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "coopipe.cli", "sweep", "--dataset", "imagefolder", "--data-root", str(folder),
           "--cache", str(cache), "--pretrained", "none", "--views", "2", "--shots", "1,2", "--seeds", "1,2",
           "--epochs", "2", "--n-ctx", "4", "--runs", "runs", "--jobs", "1", "--stack", "off", "--no-progress",
           "--no-report"]  # runs one by one (a stack would finish its runs together)
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runs = tmp_path / "runs" / NAME / "coop_m4"
    deadline = time.monotonic() + 240
    while not list(runs.glob("*/metrics.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # the whole sweep process, mid-grid
    proc.communicate(timeout=60)
    finished = {p: p.stat().st_mtime_ns for p in runs.glob("*/metrics.json")}
    assert 1 <= len(finished) < 4, "the sweep was not killed mid-grid"

    res = subprocess.run(cmd, check=False, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    missing = 4 - len(finished)
    assert f"{missing} done, {len(finished)} already finished, 0 held by another process, 0 failed" in res.stdout
    assert len(list(runs.glob("*/metrics.json"))) == 4
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())  # finished runs untouched


def _malloc_trim_threshold() -> str | None:
    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def test_local_cluster_workers_keep_glibc_malloc_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536 (every large tensor of a step then mapped and
    page-faulted anew: a CoCoOp step measured 1.6x slower); the sweep's LocalCluster leaves it out. dask also
    writes the variable into the parent's environment when it spawns, so the test starts from a clean one."""
    from coopipe.dask_cluster import dask_client

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with dask_client(None, 1, 1) as client:
        seen = client.run(_malloc_trim_threshold)
    assert list(seen.values()) == [None]


def test_methods_all_plans_every_registered_method_that_suits_the_dataset(tmp_path: Path):
    """``--methods all`` reads the registry (a method registered later joins with no list to update); a method
    that needs ordered labels runs on age datasets only; one that cannot score new classes skips base-to-new."""
    import dataclasses

    from coopipe.methods import Method, get_method, method_names, register, unregister
    from coopipe.sweep.plan import BASELINES, registered_methods

    @dataclasses.dataclass(frozen=True)
    class Opts:
        pass

    class Closed(Method):
        name, title, options = "closedset", "Closed set", Opts

        def transferable(self, options: Opts) -> bool:
            return False

    register(Closed())
    try:
        spec = SweepSpec(datasets=("eurosat",), methods=(), all_methods=True, shots=(1,), seeds=(1,), base2new=True,
                         encode=False, runs=str(tmp_path / "runs"))
        by_kind = {(t.kind, t.method.label()) for t in plan_sweep(spec).tasks}
        expected = [n for n in method_names()  # not the rank prompts, ordcoop, nor the baselines (their own flags)
                    if not get_method(n).ordered_labels and n not in BASELINES]
        assert {label for kind, label in by_kind if kind == "coop"} == set(expected)
        assert ("coop", "closedset") in by_kind and ("base2new", "closedset") not in by_kind
        assert ("base2new", "cocoop") in by_kind
        assert {"rank", "ordcoop"} <= {m.method for m in registered_methods("utkface")}
    finally:
        unregister("closedset")

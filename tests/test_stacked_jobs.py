"""The stacked training job writes each run folder as the per-run job does, and resumes each run from its own
checkpoint inside the stack (tolerances: see tests/test_stacked.py)."""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import make_toy_cache

from coopipe.checkpoint import load_checkpoint
from coopipe.checkpoint_files import META_FILE
from coopipe.errors import ParamsError
from coopipe.jobs.train import run_train, run_train_stacked
from coopipe.methods import MethodSpec
from coopipe.sweep import SweepSpec, plan_sweep, run_sweep
from coopipe.sweep.plan import RunSettings
from coopipe.frozen_gemm import onednn_available
from coopipe.sweep.runner import resolve_stack, stack_units

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["cat", "dog", "sea or lake"]
QUICK = {"max_epoch": 3, "n_ctx": 2, "batch_size": 2, "lr": 0.01}
RUNS = [(1, 1), (2, 2), (2, 1)]  # (shots, seed): one and three batches an epoch


@pytest.fixture(scope="module")
def cache(rn50, tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_toy_cache(tmp_path_factory.mktemp("cache"), rn50, CLASSES, {"train": (4, 2), "val": (2, 1), "test": (3, 1)})


@pytest.fixture(scope="module")
def alone(cache, rn50, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("alone")
    for shots, seed in RUNS:
        run_train(cache_dir=cache, dataset="toy", shots=shots, seed=seed, out_dir=root / f"{shots}_{seed}",
                  overrides=QUICK, progress=False, clip=rn50)
    return [root / f"{shots}_{seed}" for shots, seed in RUNS]


def _assert_same_run(a: Path, b: Path) -> None:
    assert {p.name for p in b.iterdir()} <= {p.name for p in a.iterdir()}  # a sweep adds metrics.json, log.txt
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca.complete and cb.complete and ca.run == cb.run and ca.epoch == cb.epoch
    torch.testing.assert_close(ca.ctx, cb.ctx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ca.classifier().text_features, cb.classifier().text_features, rtol=1e-5, atol=1e-6)
    for x, y in zip(ca.history, cb.history):
        assert x.loss == pytest.approx(y.loss, rel=1e-5, abs=1e-6) and x.train_acc == y.train_acc
    sa, sb = (json.loads((p / "train.json").read_text()) for p in (a, b))
    assert {k: v for k, v in sa.items() if k not in ("run", "train_seconds", "final_loss", "cost")} == \
        {k: v for k, v in sb.items() if k not in ("run", "train_seconds", "final_loss", "cost")}


def test_stacked_job_writes_what_the_per_run_job_writes(cache, rn50, alone, tmp_path):
    runs = [(shots, seed, tmp_path / f"{shots}_{seed}") for shots, seed in RUNS]
    summaries = run_train_stacked(cache_dir=cache, dataset="toy", runs=runs, overrides=QUICK, progress=False,
                                  clip=rn50, max_stack=3)
    assert [s["skipped"] for s in summaries] == [False] * 3
    assert [s["cost"]["stacked_runs"] for s in summaries] == [3] * 3  # their cost is the stack's, and says so
    for (_, _, out), ref in zip(runs, alone):
        _assert_same_run(out, ref)
    again = run_train_stacked(cache_dir=cache, dataset="toy", runs=runs, overrides=QUICK, progress=False, clip=rn50)
    assert [s["skipped"] for s in again] == [True] * 3


def test_interrupted_stack_resumes_each_run_from_its_own_checkpoint(cache, rn50, alone, tmp_path):
    runs = [(shots, seed, tmp_path / f"{shots}_{seed}") for shots, seed in RUNS]
    main = threading.get_ident()

    def interrupt_after_first_checkpoint() -> None:  # as Ctrl-C would, once some run has saved resume state
        while not any((out / META_FILE).is_file() for _, _, out in runs):
            time.sleep(0.01)
        signal.pthread_kill(main, signal.SIGINT)

    # an earlier test's library (dask/tornado) may have replaced Python's SIGINT handler in this process: Ctrl-C
    # is Python's default KeyboardInterrupt here, as in a user's shell
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    watcher = threading.Thread(target=interrupt_after_first_checkpoint, daemon=True)
    try:
        watcher.start()
        with pytest.raises(KeyboardInterrupt):
            run_train_stacked(cache_dir=cache, dataset="toy", runs=runs, overrides=QUICK, progress=False, clip=rn50,
                              checkpoint_every=0, max_stack=3)
            time.sleep(30)  # finished before the signal arrived: wait for it (never reached in practice)
        watcher.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    partial = [load_checkpoint(out) for _, _, out in runs if (out / META_FILE).is_file()]
    assert partial and any(not c.complete for c in partial)  # stopped mid-training
    run_train_stacked(cache_dir=cache, dataset="toy", runs=runs, overrides=QUICK, progress=False, clip=rn50,
                      max_stack=2)
    for (_, _, out), ref in zip(runs, alone):
        _assert_same_run(out, ref)


@pytest.mark.slow  # a whole sweep with stacked runs: over 30 s
def test_sweep_stacks_compatible_runs_and_keeps_the_others_alone(cache, rn50, alone, tmp_path):
    assert resolve_stack("auto", "cuda") and not resolve_stack("off", "cuda") and resolve_stack("on", "cpu")
    assert resolve_stack("auto", "cpu") == onednn_available()  # CPU: stack when the text GEMMs run on oneDNN
    with pytest.raises(ParamsError, match="--stack"):
        resolve_stack("yes", "cpu")
    settings = RunSettings(cache=str(cache), pretrained="none", epochs=3, train_options={"batch_size": 2, "lr": 0.01})
    spec = SweepSpec(datasets=("toy",), methods=(MethodSpec.of("coop", n_ctx=2), MethodSpec("cocoop")), shots=(1, 2),
                     seeds=(1, 2), zeroshot=True, encode=False, runs=str(tmp_path / "runs"), settings=settings)
    plan = plan_sweep(spec)
    units = stack_units(plan.tasks, stack=True)
    assert sorted(len(u) for u in units) == [1] * 5 + [4]  # 4 CoOp runs stacked; CoCoOp runs and zero-shot alone
    assert len(stack_units(plan.tasks, stack=False)) == len(plan.tasks)
    coop = dataclasses.replace(spec, methods=(MethodSpec.of("coop", n_ctx=2),), zeroshot=False)
    out = run_sweep(plan_sweep(coop), scheduler="inline", progress=False, stack="on")
    assert out.count("done") == 4, [r.detail() for r in out.results]
    runs = tmp_path / "runs" / "toy" / "coop_m2"
    assert "4 runs stacked" in (runs / "shots1_seed1" / "log.txt").read_text()
    for (shots, seed), ref in zip(RUNS, alone):
        _assert_same_run(runs / f"shots{shots}_seed{seed}", ref)

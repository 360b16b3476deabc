"""Kill loops: `coopipe encode` and `coopipe train` are killed with SIGKILL at random points, re-run each time, and
must end bitwise equal to an uninterrupted run with no stuck state (no `.partial` store, no lock, no half file).

Each run is a real `coopipe` process (forked from a server that imported coopipe, see ``_context``). The kill points
are drawn from a seeded generator between the process start and the measured length of an uninterrupted run, one
in each of KILLS equal slices of that span (in a shuffled order), so they land in start-up, mid-work and the final
writes with no two crowding one phase; after the loop one more run (never killed) must finish from whatever state
the last kill left.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_eurosat_folder, make_store

from coopipe.checkpoint import load_checkpoint
from coopipe.classifier import load_classifier
from coopipe.store import open_store

pytestmark = pytest.mark.slow  # six kills and three full runs each: about a minute per test on 2 cores

KILLS = 6  # one per sixth of the span: ten uniform draws (before) left about one sixth without a kill on average
CLASSES = ("Forest", "SeaLake", "Highway")


def _cli_main(args: tuple[str, ...]) -> None:
    """A process running ``coopipe ARGS`` (one thread, as the uninterrupted reference run)."""
    os.environ.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    import torch

    from coopipe.cli import app

    torch.set_num_threads(1)
    app(args=["--log-level", "WARNING", *args], standalone_mode=False)


@pytest.fixture(scope="module", autouse=True)
def _stop_forkserver():
    """The fork server (and what it forked) ends with this module, not with the interpreter: the session's
    leftover-process check runs before interpreter exit. ``_stop`` is the stdlib's own way to stop it (its tests use
    it): it closes the server's pipe and waits for it to exit."""
    yield
    multiprocessing.forkserver._forkserver._stop()  # type: ignore[attr-defined]


def _started() -> None:
    """A process that does nothing: starting it starts the fork server."""


def _context() -> multiprocessing.context.BaseContext:
    """Processes forked from a server that has imported coopipe (and torch) but run nothing: each start costs a
    fork, not a fresh interpreter, so ten kills fit in a test's time while each process is a real `coopipe`.

    The server is started here: its import of coopipe and torch (seconds, more under load) is no part of a run's
    measured length, which would otherwise place the later kill points after a run's end."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["coopipe.cli"])
    proc = ctx.Process(target=_started)
    proc.start()
    proc.join(600)
    assert proc.exitcode == 0, f"the fork server's first process exited with {proc.exitcode}"
    return ctx


def _run(ctx: multiprocessing.context.BaseContext, args: tuple[str, ...]) -> float:
    start = time.monotonic()
    proc = ctx.Process(target=_cli_main, args=(args,))
    proc.start()
    proc.join(600)
    assert proc.exitcode == 0, f"coopipe {' '.join(args)} exited with {proc.exitcode}"
    return time.monotonic() - start


def _kill_loop(ctx: multiprocessing.context.BaseContext, args: tuple[str, ...], length: float, rng: random.Random,
               output: Path) -> None:
    """SIGKILL ``coopipe ARGS`` KILLS times, the k-th after a random delay in the k-th of KILLS equal slices of
    (0.05, 0.5) x ``length`` (the time of an uninterrupted run; slices in a shuffled order); a run that finishes
    before its kill point has its output removed, so every kill lands in real work (start-up, mid-work or the final
    writes) and the state that the last kill left is what is resumed. A run from scratch that finishes before its
    kill point is an uninterrupted run shorter than ``length`` (the machine's load fell since it was measured): its
    time becomes ``length``, so the kill points stay within the span of the run they are meant to interrupt."""
    slices = list(range(KILLS))
    rng.shuffle(slices)
    width = 0.45 / KILLS
    killed = 0
    for _ in range(6 * KILLS):
        low = 0.05 + width * slices[killed]
        fresh = not output.exists()  # no state to resume: the run is an uninterrupted one
        start = time.monotonic()
        proc = ctx.Process(target=_cli_main, args=(args,))
        proc.start()
        proc.join(rng.uniform(low, low + width) * length)
        if proc.exitcode is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
            killed += 1
            if killed == KILLS:
                return
        else:
            assert proc.exitcode == 0, f"coopipe {' '.join(args)} exited with {proc.exitcode}"
            if fresh:
                length = min(length, time.monotonic() - start)
            shutil.rmtree(output)  # finished before its kill point: start over
    raise AssertionError(f"only {killed} of {KILLS} kills landed in {6 * KILLS} runs")


def _no_stuck_state(root: Path) -> None:
    partial = [p for p in root.rglob("*.partial")] + [p for p in root.rglob("*.tmp")]
    assert not partial, f"left behind: {partial}"


@pytest.mark.timeout(1200)
def test_encode_killed_at_random_points_resumes_to_the_same_store(eurosat_root: Path, tmp_path: Path):
    folder = copy_eurosat_folder(eurosat_root, tmp_path / "data", CLASSES, 8)
    args = ("encode", "--dataset", "imagefolder", "--data-root", str(folder), "--pretrained", "none", "--views", "1",
            "--shots", "2", "--seeds", "1", "--precision", "fp32", "--chunk-rows", "4", "--batch-size", "4",
            "--no-progress")
    ctx = _context()
    length = _run(ctx, (*args, "--cache", str(tmp_path / "clean")))
    _kill_loop(ctx, (*args, "--cache", str(tmp_path / "killed")), length, random.Random(1), tmp_path / "killed")
    _run(ctx, (*args, "--cache", str(tmp_path / "killed")))
    clean = sorted((tmp_path / "clean").rglob("*.zarr"))
    again = sorted((tmp_path / "killed").rglob("*.zarr"))
    assert [p.name for p in clean] == [p.name for p in again] and len(clean) == 3
    for a, b in zip(clean, again):
        sa, sb = open_store(a), open_store(b)
        assert np.array_equal(sa.features[:], sb.features[:]) and np.array_equal(sa.labels(), sb.labels())
    _no_stuck_state(tmp_path / "killed")


@pytest.mark.timeout(1200)
def test_train_killed_at_random_points_resumes_bitwise(rn50, tmp_path: Path):
    cache = tmp_path / "cache"
    g = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 4)
    feats = g.normal(size=(3, rn50.embed_dim))[labels][:, None] + g.normal(size=(12, 2, rn50.embed_dim))
    make_store(cache, model="RN50", weights=rn50.weights_id, classnames=list(CLASSES), feats=feats.astype(np.float32),
               labels=labels, split="train")
    args = ("train", "--features", str(cache), "--dataset", "toy", "--shots", "4", "--seed", "1", "--epochs", "30",
            "--n-ctx", "2", "--batch-size", "4", "--checkpoint-every", "0", "--no-progress")
    ctx = _context()
    length = _run(ctx, (*args, "--out", str(tmp_path / "clean")))
    _kill_loop(ctx, (*args, "--out", str(tmp_path / "killed")), length, random.Random(2), tmp_path / "killed")
    _run(ctx, (*args, "--out", str(tmp_path / "killed")))
    clean, again = load_checkpoint(tmp_path / "clean"), load_checkpoint(tmp_path / "killed")
    assert again.complete and again.epoch == 30
    assert np.array_equal(clean.ctx.numpy(), again.ctx.numpy())
    assert [r.loss for r in clean.history] == [r.loss for r in again.history]
    assert np.array_equal(load_classifier(tmp_path / "clean").text_features.numpy(),
                          load_classifier(tmp_path / "killed").text_features.numpy())
    for name in ("history.tsv", "train.json"):
        assert (tmp_path / "killed" / name).is_file()
    _no_stuck_state(tmp_path / "killed")

"""Kill loops: `coopipe encode` and `coopipe train` are killed with SIGKILL at random points, re-run each time, and
must end bitwise equal to an uninterrupted run with no stuck state (no `.partial` store, no lock, no half file).

Each run is a real `python -m coopipe.cli` process. The kill points are drawn from a seeded generator between the
process start and the measured length of an uninterrupted run, so they land in start-up, mid-work and the final
writes; after the loop one more run (never killed) must finish from whatever state the last kill left.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import copy_eurosat_folder, make_store

from coopipe.checkpoint import load_checkpoint, load_classifier
from coopipe.store import open_store

KILLS = 10
CLASSES = ("Forest", "SeaLake", "Highway")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "coopipe.cli", "--log-level", "WARNING", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}


def _run(cmd: list[str]) -> float:
    start = time.monotonic()
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return time.monotonic() - start


def _kill_loop(cmd: list[str], length: float, rng: random.Random) -> int:
    """Start ``cmd`` KILLS times, each SIGKILLed after a random delay in (0.2, 1.1) x ``length`` (a run that ends
    first simply finishes); returns how many were really killed."""
    killed = 0
    for _ in range(KILLS):
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(0.2, 1.1) * length)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed += 1
    return killed


def _no_stuck_state(root: Path) -> None:
    partial = [p for p in root.rglob("*.partial")] + [p for p in root.rglob("*.tmp")]
    assert not partial, f"left behind: {partial}"


def test_encode_killed_at_random_points_resumes_to_the_same_store(eurosat_root: Path, tmp_path: Path):
    folder = copy_eurosat_folder(eurosat_root, tmp_path / "data", CLASSES, 8)
    args = ("encode", "--dataset", "imagefolder", "--data-root", str(folder), "--pretrained", "none", "--views", "1",
            "--shots", "2", "--seeds", "1", "--precision", "fp32", "--chunk-rows", "4", "--batch-size", "4",
            "--no-progress")
    length = _run(_cli(*args, "--cache", str(tmp_path / "clean")))
    killed = _kill_loop(_cli(*args, "--cache", str(tmp_path / "killed")), length, random.Random(1))
    _run(_cli(*args, "--cache", str(tmp_path / "killed")))
    assert killed >= KILLS // 2, f"only {killed} of {KILLS} runs were killed: the kill points missed the work"
    clean = sorted((tmp_path / "clean").rglob("*.zarr"))
    again = sorted((tmp_path / "killed").rglob("*.zarr"))
    assert [p.name for p in clean] == [p.name for p in again] and len(clean) == 3
    for a, b in zip(clean, again):
        sa, sb = open_store(a), open_store(b)
        assert np.array_equal(sa.features[:], sb.features[:]) and np.array_equal(sa.labels(), sb.labels())
    _no_stuck_state(tmp_path / "killed")


def test_train_killed_at_random_points_resumes_bitwise(rn50, tmp_path: Path):
    cache = tmp_path / "cache"
    g = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 4)
    feats = g.normal(size=(3, rn50.embed_dim))[labels][:, None] + g.normal(size=(12, 2, rn50.embed_dim))
    make_store(cache, model="RN50", weights=rn50.weights_id, classnames=list(CLASSES), feats=feats.astype(np.float32),
               labels=labels, split="train")
    args = ("train", "--features", str(cache), "--dataset", "toy", "--shots", "4", "--seed", "1", "--epochs", "30",
            "--n-ctx", "2", "--batch-size", "4", "--checkpoint-every", "0", "--no-progress")
    length = _run(_cli(*args, "--out", str(tmp_path / "clean")))
    killed = _kill_loop(_cli(*args, "--out", str(tmp_path / "killed")), length, random.Random(2))
    _run(_cli(*args, "--out", str(tmp_path / "killed")))
    assert killed >= KILLS // 2, f"only {killed} of {KILLS} runs were killed: the kill points missed the work"
    clean, again = load_checkpoint(tmp_path / "clean"), load_checkpoint(tmp_path / "killed")
    assert again.complete and again.epoch == 30
    assert np.array_equal(clean.ctx.numpy(), again.ctx.numpy())
    assert [r.loss for r in clean.history] == [r.loss for r in again.history]
    assert np.array_equal(load_classifier(tmp_path / "clean").text_features.numpy(),
                          load_classifier(tmp_path / "killed").text_features.numpy())
    for name in ("history.tsv", "train.json"):
        assert (tmp_path / "killed" / name).is_file()
    _no_stuck_state(tmp_path / "killed")

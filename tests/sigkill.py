"""The SIGKILL loop of the resume tests: an uninterrupted reference run, then the same run killed at random points
after each of its checkpoints and re-run, then resumed to its end; the tests compare the two run folders."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

from coopipe.checkpoint import META_FILE

Start = Callable[[Path], multiprocessing.process.BaseProcess]


def kill_and_resume(start: Start, tmp_path: Path, *, kills: int, max_delay: float) -> tuple[Path, Path]:
    """``start(out)`` starts a `coopipe train` process writing run folder ``out``. Returns (reference, killed): the
    folder of the uninterrupted run and that of the run killed up to ``kills`` times (each kill a random delay of
    at most ``max_delay`` s after the process's first checkpoint) and then resumed to its end."""
    reference, out = tmp_path / "reference", tmp_path / "killed"
    proc = start(reference)
    proc.join(600)
    assert proc.exitcode == 0
    rng, killed = random.Random(0), 0
    while killed < kills:
        proc = start(out)
        before = (out / META_FILE).stat().st_mtime_ns if (out / META_FILE).is_file() else None
        while proc.is_alive() and not ((out / META_FILE).is_file() and (out / META_FILE).stat().st_mtime_ns != before):
            time.sleep(0.01)  # until this process has written a checkpoint: the kill lands in training
        time.sleep(rng.uniform(0.0, max_delay))
        if not proc.is_alive():  # a quiet machine may finish the last epochs before the kill lands
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        killed += 1
    assert killed >= 1, "the run finished before its first kill: give it more epochs"
    proc = start(out)
    proc.join(600)
    assert proc.exitcode == 0
    return reference, out

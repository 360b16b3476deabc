"""What one sweep task does where it runs (a dask worker, or this process): one run folder, start to end.

:func:`execute_task` skips a finished run, takes ``flock`` on ``<run>.lock`` without waiting (a run another process
holds is reported ``held``, never run twice), checks again under the lock, then trains and evaluates through the job functions, logging into ``<run>/log.txt``. Errors never escape: the result says
``failed`` with the message, so one bad run does not stop the sweep. Interrupted training resumes from its last
checkpoint the next time the task runs (``run_train`` does that).
"""

from __future__ import annotations


import logging
import os
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coopipe.errors import LockedError
from coopipe.locks import exclusive_lock
from coopipe.methods import MethodSpec
from coopipe.sweep.plan import RunSettings, RunTask

logger = logging.getLogger(__name__)

STATUSES = ("done", "skipped", "held", "failed")
YEAR_KEYS = ("mae_exp", "constant_mae")  # age results: errors in years, not fractions


@dataclass(frozen=True)
class RunResult:
    """The outcome of one task: ``done``, ``skipped`` (already finished), ``held`` (another process) or ``failed``."""

    label: str
    run_dir: str
    status: str
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)  # accuracy (or base/new accuracy), fractions
    error: str | None = None

    def detail(self) -> str:
        if self.status == "failed":
            return f"{self.error}; see {self.run_dir}/log.txt"
        if self.status == "held":
            return f"another process holds {self.run_dir}.lock"
        if self.status == "skipped":
            return "finished"
        accs = ", ".join(f"{k} {v:.2f} years" if k in YEAR_KEYS else f"{k} {100 * v:.2f}%"
                         for k, v in self.metrics.items() if isinstance(v, float))
        return f"{self.seconds:.0f}s" + (f", {accs}" if accs else "")


class ModelPool:
    """The last loaded CLIP model, kept between the runs of one worker (loading it again costs seconds a run)."""

    def __init__(self) -> None:
        self._key: tuple[str, str, str] | None = None
        self._clip: Any = None

    def get(self, model: str, pretrained: str, device: str) -> Any:
        from coopipe.models import load_clip

        key = (model, pretrained, device)
        if key != self._key:
            self._clip, self._key = load_clip(model, pretrained, device=device), key
        return self._clip


def set_threads(threads: int) -> None:
    """One run's share of the cores (1 by default: single-thread runs side by side are the most work per core)."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@contextmanager
def run_lock(run_dir: Path) -> Iterator[bool]:
    """``flock -n <run>.lock``: yields whether this process got it (released when the process dies, too)."""
    lock = exclusive_lock(Path(f"{run_dir}.lock"), f"run {run_dir}")
    try:
        lock.__enter__()
    except LockedError:
        yield False
        return
    try:
        yield True
    finally:
        lock.__exit__(None, None, None)


@contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """coopipe's log records of this task appended to ``path`` (the run's log.txt)."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("coopipe")
    level = root.level
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def execute_task(task: RunTask, settings: RunSettings, pool: ModelPool | None = None) -> RunResult:
    """Run ``task`` unless it is finished or held; never raises for a failure of the run itself."""
    return execute_stack((task,), settings, pool)[0]


def execute_stack(tasks: Sequence[RunTask], settings: RunSettings, pool: ModelPool | None = None) -> list[RunResult]:
    """Run ``tasks`` (one result each, in order); with several, their training runs stacked in one text pass first.

    The tasks of a stack share dataset, kind and method (:func:`coopipe.sweep.runner.stack_units` groups them). Each
    run folder is locked; finished and held ones are reported as such. The stacked training
    (:func:`coopipe.jobs.train.run_train_stacked`) writes every run's checkpoint; then each task goes through the
    per-run path, which finds its training complete and evaluates. If the stacked training fails (a diverged run
    stops its stack), each run goes the per-run path from its own checkpoint: one bad run never fails its mates.
    """
    pool = pool or ModelPool()
    results: dict[int, RunResult] = {}
    with ExitStack() as held:
        mine: list[tuple[int, RunTask]] = []
        for i, task in enumerate(tasks):
            if task.finished():
                results[i] = RunResult(task.label, task.run_dir, "skipped")
            elif not held.enter_context(run_lock(Path(task.run_dir))):
                results[i] = RunResult(task.label, task.run_dir, "held")
            elif task.finished():  # finished by another process since we looked
                results[i] = RunResult(task.label, task.run_dir, "skipped")
            else:
                mine.append((i, task))
        t0 = time.monotonic()
        if len(mine) > 1:
            _train_stack([task for _, task in mine], settings, pool)
        for i, task in mine:
            results[i] = _execute_locked(task, settings, pool, t0)
    return [results[i] for i in range(len(tasks))]


def _train_stack(tasks: Sequence[RunTask], s: RunSettings, pool: ModelPool) -> None:
    """The stacked training of ``tasks``' runs, logged into each run's log.txt; a failure is logged, not raised."""
    from coopipe.jobs.train import run_train_stacked

    first = tasks[0]
    assert first.method is not None
    with ExitStack() as logs:
        for task in tasks:
            Path(task.run_dir).mkdir(parents=True, exist_ok=True)
            logs.enter_context(_log_to(Path(task.run_dir) / "log.txt"))
        logger.info("== %d runs stacked (pid %d): %s", len(tasks), os.getpid(), "; ".join(t.label for t in tasks))
        try:
            run_train_stacked(cache_dir=s.cache, dataset=first.dataset, runs=[(t.shots, int(t.seed or 0), t.run_dir) for t in tasks],
                              overrides=_overrides(s, first.method), device=s.device, progress=False,
                              params_record={"cli": "coopipe sweep"}, clip=pool.get(s.model, s.pretrained, s.device),
                              classes="base" if first.kind == "base2new" else "all")
        except Exception:  # noqa: BLE001 (each run then goes the per-run path, from its own checkpoint)
            logger.warning("stacked training failed; training each run alone:\n%s", traceback.format_exc())


def _execute_locked(task: RunTask, settings: RunSettings, pool: ModelPool, t0: float) -> RunResult:
    run = Path(task.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    with _log_to(run / "log.txt"):
        logger.info("== %s (pid %d)", task.label, os.getpid())
        try:
            metrics = _run(task, settings, pool)
        except Exception as exc:  # noqa: BLE001 (a failed run is reported, and the sweep goes on)
            logger.error("%s failed:\n%s", task.label, traceback.format_exc())
            return RunResult(task.label, task.run_dir, "failed", time.monotonic() - t0,
                             error=f"{type(exc).__name__}: {exc}")
    if not task.finished():
        return RunResult(task.label, task.run_dir, "failed", time.monotonic() - t0,
                         error=f"finished without writing {', '.join(task.done_files)}")
    return RunResult(task.label, task.run_dir, "done", time.monotonic() - t0, metrics)


def _overrides(s: RunSettings, m: MethodSpec) -> dict[str, Any]:
    """The training options of a run of method ``m``: the sweep's options, the method itself, ``--epochs`` (not for
    a training-free method: it runs 0 epochs whatever the grid's, and has no epoch for ``select_every`` to keep)."""
    overrides: dict[str, Any] = {**dict(s.train_options), "method": m}
    if not m.definition.trains:
        return {k: v for k, v in overrides.items() if k not in ("max_epoch", "warmup_epoch", "select_every")}
    if s.epochs:
        overrides["max_epoch"] = s.epochs
    return overrides


def _run(task: RunTask, s: RunSettings, pool: ModelPool) -> dict[str, Any]:
    from coopipe.jobs.evaluate import run_eval
    from coopipe.jobs.train import run_train

    run = Path(task.run_dir)
    clip = pool.get(s.model, s.pretrained, s.device)
    if task.kind in ("coop", "base2new"):
        assert task.method is not None
        overrides = _overrides(s, task.method)
        classes = "base" if task.kind == "base2new" else "all"
        run_train(cache_dir=s.cache, dataset=task.dataset, shots=task.shots, seed=int(task.seed or 0), out_dir=run,
                  overrides=overrides, device=s.device, progress=False, params_record={"cli": "coopipe sweep"},
                  clip=clip, classes=classes)
        if classes == "all":
            return _age_summary(run_eval(run, cache_dir=s.cache, clip=clip))
        return {half: run_eval(run, cache_dir=s.cache, classes=half, out=run / f"metrics_{half}.json",
                               pretrained=s.pretrained, device=s.device, clip=clip)["accuracy"]
                for half in ("base", "new")}
    if task.kind == "transfer":
        source = run.parent.parent
        if not (source / "metrics.json").is_file():
            raise RuntimeError(f"source run {source} is not finished (failed, or held by another process); "
                               "re-run when it is")
        return {"accuracy": run_eval(source, cache_dir=s.cache, dataset=task.target, transfer=True,
                                     out=run / "metrics.json", pretrained=s.pretrained, device=s.device,
                                     clip=clip)["accuracy"]}
    raise ValueError(f"unknown task kind {task.kind!r}")


def _age_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """What the sweep prints of a result: the accuracy, and for an age run its MAE and the constant's (years)."""
    out: dict[str, Any] = {"accuracy": metrics["accuracy"]}
    for key in ("mae_exp", "constant_mae"):
        if metrics.get(key) is not None:
            out[key] = float(metrics[key])
    return out

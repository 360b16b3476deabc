"""Run a sweep plan: encode once per dataset, then every missing run as a task on dask.distributed.

Scheduling rule (measured on 2 cores, CoOp step, K = 10): one thread per run is the most work per core (2 runs x 1
thread: 62 ms a step each, against 88 ms for 1 run x 2 threads), a few more single-thread runs than cores cost only
~5% and spare the grid a tail where the last run trains alone, while runs whose threads add up to more than the
cores are 20-40x slower (OpenMP threads spin-wait on each other). So by default (``jobs='auto'``) a
``LocalCluster`` gets ``min(pending, 2 x cores)`` single-thread worker processes, at most one per 2 GiB of
available memory (one on cuda); ``jobs=N`` forces N workers and splits the cores between them. A caller's
``OMP_NUM_THREADS`` is kept. ``scheduler=ADDRESS`` sends the same tasks to a running cluster (paths must be valid
on its workers); ``scheduler='inline'`` runs them one by one in this process (debugging, and the reference the
tests compare the cluster with). On this machine's CPU, stacks of runs train in this process with all the cores
(in a dask worker they ran 1.6-2x slower, measured before the workers' MALLOC_TRIM_THRESHOLD_ was unset: see
``coopipe.dask_cluster``), phase by phase before the other units, which go to the workers side by side; with ``jobs=1``
everything runs here.

Encoding runs alone, before the runs, one ``run_encode`` per dataset behind a blocking per-dataset lock
(``<cache>/.encode-<dataset>.lock``: a second sweep waits, then finds the stores). Datasets whose runs are all
finished are not encoded at all, so a finished grid re-runs in about a second and loads no model. Transfer tasks
(phase 1) start when the source runs (phase 0) are done. Failed runs are retried ``retries`` more times, and a
re-run of the sweep retries them too (they have no result files).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed import WorkerPlugin
from tqdm.auto import tqdm  # type: ignore[import-untyped]

from coopipe.sweep.plan import EncodeTask, RunSettings, RunTask, SweepPlan
from coopipe.config import SweepConfig
from coopipe.errors import ParamsError
from coopipe.dask_cluster import dask_client
from coopipe.frozen_gemm import onednn_available
from coopipe.sweep.tasks import ModelPool, RunResult, execute_stack, set_threads
from coopipe.logs import route_worker_logging
from coopipe.report.records import metrics_files

logger = logging.getLogger(__name__)

GIB_PER_RUN = 2.0
RUNS_PER_CORE = 2
PLUGIN_NAME = "coopipe-sweep"
INLINE = "inline"
STACK_MODES = ("auto", "on", "off")
# On the CPU, ``auto`` stacks when the text tower's GEMMs run on oneDNN (coopipe/frozen_gemm.py), and each stack
# trains as one unit in the sweep's own process with all the cores (see _run_tasks). Measured on a quiet 2-core AMD EPYC (16-shot K = 10 CoOp steps,
# RN50 text tower, fp32): 3 runs stacked in one process with 2 threads took 77 ms per run-step on oneDNN (100 ms on
# MKL), against 0.19-0.25 core-seconds per step for one-thread runs side by side (3 runs on 2 cores thrash). The
# earlier rule (one one-thread stack per core) lost end to end (611 s against 438 s on the paper grid), because
# per-core stacks of mixed 1,000- and 50-step runs end unevenly; one stack per group has no such tail. Without
# oneDNN, ``auto`` keeps the one-thread runs side by side. See docs/performance.md.
STACKABLE_KINDS = ("coop", "base2new")
Unit = tuple[RunTask, ...]  # tasks executed together: one run, or runs trained stacked


@dataclass
class SweepOutcome:
    """Every task's result (in completion order), the wall time and how the runs were spread."""

    results: list[RunResult] = field(default_factory=list)
    seconds: float = 0.0
    jobs: int = 0
    threads: int = 0
    interrupted: bool = False
    planned: int = 0  # tasks in the plan (more than the results when interrupted)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> list[RunResult]:
        return [r for r in self.results if r.status == "failed"]


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _available_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def auto_jobs(pending: int, device: str = "cpu", *, cores: int | None = None, available_gib: float | None = None) -> int:
    """Runs at once for ``jobs='auto'``: min(pending, 2 x cores), one per 2 GiB available; 1 on a GPU."""
    if device != "cpu":
        return 1
    n = min(pending, RUNS_PER_CORE * (cores or _cores()))
    gib = available_gib if available_gib is not None else _available_gib()
    if gib is not None:
        n = min(n, int(gib // GIB_PER_RUN))
    return max(1, n)


def threads_per_run(jobs: int, cores: int | None = None) -> int:
    """Each run's share of the cores (a caller's OMP_NUM_THREADS wins, with a warning when it oversubscribes)."""
    cores = cores or _cores()
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        if jobs * int(given) > cores:
            logger.warning("%d runs x OMP_NUM_THREADS=%s threads exceed the %d cores; runs will be many times slower "
                           "(unset OMP_NUM_THREADS to let the sweep split the cores)", jobs, given, cores)
        return int(given)
    return max(1, cores // jobs)


def resolve_stack(stack: str, device: str = "cpu") -> bool:
    """Whether the sweep stacks runs: ``on``/``off`` as said; ``auto`` on CUDA (a K = 10 text pass leaves the GPU
    idle) and on the CPU when the text GEMMs run on oneDNN (measured; see the note above)."""
    if stack not in STACK_MODES:
        raise ParamsError(f"--stack must be one of {', '.join(STACK_MODES)}, got {stack!r}")
    if stack != "auto":
        return stack == "on"
    return onednn_available() if device == "cpu" else device.startswith("cuda")


def stack_units(tasks: Sequence[RunTask], stack: bool) -> list[Unit]:
    """The tasks as units of work, in order: with ``stack``, the training runs of one kind, dataset, method and
    phase (so one class list, model and device) form a stack trained in one text pass; runs of a method that
    cannot stack (image-conditional ones such as CoCoOp: a text pass per image) and every other task stay alone."""
    units: list[list[RunTask]] = []
    groups: dict[tuple[Any, ...], list[RunTask]] = {}
    for task in tasks:
        stackable = stack and task.kind in STACKABLE_KINDS and task.method is not None
        if stackable and task.method.definition.stackable:  # type: ignore[union-attr]
            key = (task.kind, task.dataset, task.method, task.phase)
            if key in groups:
                groups[key].append(task)
                continue
            groups[key] = [task]
            units.append(groups[key])
        else:
            units.append([task])
    return [tuple(unit) for unit in units]


def encode_dataset(task: EncodeTask, settings: RunSettings) -> None:
    """One dataset's ``run_encode`` (every split, shot and seed), behind the cache's per-dataset lock."""
    from coopipe.encode import EncodeOptions
    from coopipe.jobs.encode import run_encode

    cache = Path(settings.cache)
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".encode-{task.name}.lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another process is encoding %s: waiting for it", task.name)
            fcntl.flock(fh, fcntl.LOCK_EX)
        options = EncodeOptions(**{"device": settings.device, "progress": False, **dict(task.options)})
        run_encode(dataset=task.dataset, data_root=task.data_root, splits=task.splits, cache_dir=cache,
                   model=settings.model, pretrained=settings.pretrained, views=task.views, augment=task.augment,
                   shots=task.shots,
                   seeds=task.seeds, options=options, dataset_options=task.dataset_options)


class SweepWorker(WorkerPlugin):
    """Worker plugin: sets the run's thread count once and keeps a model pool for the worker's runs."""

    name = PLUGIN_NAME

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.pool: ModelPool | None = None

    def setup(self, worker: Any) -> None:
        route_worker_logging()  # open_clip's root-logger warnings: filtered, not "WARNING:root:..."
        self.pool = ModelPool()
        set_threads(self.threads)

    def teardown(self, worker: Any) -> None:
        self.pool = None


def run_on_worker(unit: Unit, settings: RunSettings) -> list[RunResult]:
    """The function each dask task calls (on a worker with the :class:`SweepWorker` plugin): one unit's results."""
    from distributed import get_worker

    plugin: SweepWorker = get_worker().plugins[PLUGIN_NAME]  # type: ignore[assignment]
    set_threads(plugin.threads)
    return execute_stack(unit, settings, plugin.pool)


def run_sweep(
    plan: SweepPlan,
    *,
    jobs: int | str = "auto",
    scheduler: str | None = None,
    retries: int = 0,
    progress: bool = True,
    on_result: Callable[[RunResult], None] | None = None,
    stack: str = SweepConfig.stack,
) -> SweepOutcome:
    """Run every missing task of ``plan``; returns the results (the caller prints and summarises them).

    ``stack`` (``auto|on|off``, :func:`resolve_stack`): train compatible runs stacked in one text pass."""
    stacked = resolve_stack(stack, plan.settings.device)
    t0 = time.monotonic()
    outcome = SweepOutcome(planned=len(plan.tasks))

    def record(result: RunResult) -> None:
        outcome.results.append(result)
        if on_result is not None:
            on_result(result)

    pending: list[RunTask] = []
    for task in plan.tasks:
        if task.finished():
            record(RunResult(task.label, task.run_dir, "skipped"))
        else:
            pending.append(task)
    if pending:
        try:
            pending = _encode(plan, pending, record, remote=scheduler not in (None, INLINE), scheduler=scheduler)
            _run_tasks(plan, pending, outcome, record, jobs=jobs, scheduler=scheduler, retries=retries,
                       progress=progress, stack=stacked)
        except KeyboardInterrupt:
            outcome.interrupted = True
    outcome.seconds = time.monotonic() - t0
    return outcome


def _encode(plan: SweepPlan, pending: list[RunTask], record: Callable[[RunResult], None], *, remote: bool,
            scheduler: str | None) -> list[RunTask]:
    """Encode the datasets the pending tasks read; tasks of a dataset whose encoding failed are failed too."""
    needed = {t.needs for t in pending}
    broken: dict[str, str] = {}
    for enc in plan.encodes:
        if enc.name not in needed:
            continue
        logger.info("encode %s (%s, %s) into %s", enc.name, plan.settings.model, plan.settings.pretrained,
                    plan.settings.cache)
        try:
            if remote:
                from distributed import Client

                with Client(scheduler) as client:
                    client.submit(encode_dataset, enc, plan.settings, pure=False).result()
            else:
                encode_dataset(enc, plan.settings)
        except Exception as exc:  # noqa: BLE001 (any failure of one dataset: the other datasets go on)
            logger.error("encoding %s failed: %s", enc.name, exc)
            broken[enc.name] = f"encode {enc.name} failed: {type(exc).__name__}: {exc}"
    kept = []
    for task in pending:
        if task.needs in broken:
            record(RunResult(task.label, task.run_dir, "failed", error=broken[task.needs]))
        else:
            kept.append(task)
    return kept


def _run_tasks(plan: SweepPlan, pending: Sequence[RunTask], outcome: SweepOutcome,
               record: Callable[[RunResult], None], *, jobs: int | str, scheduler: str | None, retries: int,
               progress: bool, stack: bool = False) -> None:
    if not pending:
        return
    phases = sorted({t.phase for t in pending})
    units = {phase: stack_units([t for t in pending if t.phase == phase], stack) for phase in phases}
    # On this machine's CPU a stack trains here with all the cores (in a dask worker it ran 1.6-2x slower, measured
    # with dask's MALLOC_TRIM_THRESHOLD_, and a one-thread stack beside short runs left a core idle); the other units
    # go side by side.
    local_cpu = scheduler is None and plan.settings.device == "cpu"
    here = {phase: [u for u in units[phase] if local_cpu and len(u) > 1] for phase in phases}
    apart = {phase: [u for u in units[phase] if not (local_cpu and len(u) > 1)] for phase in phases}
    most = max(max(len(u) for u in apart.values()), 1)
    n = auto_jobs(most, plan.settings.device) if jobs == "auto" else int(jobs)
    if scheduler == INLINE:
        n = 1
    outcome.jobs, outcome.threads = n, threads_per_run(n)
    logger.info("%d run(s) to do in %d unit(s)%s: %d at a time, %d thread(s) each (%d cores)", len(pending),
                sum(len(u) for u in units.values()), " (runs stacked)" if stack else "", n, outcome.threads, _cores())
    with tqdm(total=len(pending), unit="run", disable=not progress, desc="sweep", dynamic_ncols=True) as bar:
        def finish(result: RunResult, task: RunTask, tries: dict[RunTask, int]) -> RunTask | None:
            if result.status == "failed" and tries[task] < retries:
                tries[task] += 1
                logger.warning("retrying %s (%d of %d): %s", task.label, tries[task], retries, result.error)
                return task
            record(result)
            bar.update(1)
            return None

        pool = ModelPool()  # one model for every unit trained in this process
        if scheduler == INLINE or (local_cpu and n == 1):  # one unit at a time: all of them here
            _run_inline(plan, units, outcome.threads, finish, pool)
            return
        with contextlib.ExitStack() as stack_of_clients:
            client = None
            for phase in phases:
                if here[phase]:
                    logger.info("%d stack(s) train in this process with %d thread(s)", len(here[phase]),
                                threads_per_run(1))
                    _run_inline(plan, {phase: here[phase]}, threads_per_run(1), finish, pool)
                if apart[phase]:
                    if client is None:
                        client = stack_of_clients.enter_context(dask_client(scheduler, n, outcome.threads))
                        client.register_plugin(SweepWorker(outcome.threads), name=PLUGIN_NAME)
                    _run_phase(client, apart[phase], plan.settings, finish)


def _run_inline(plan: SweepPlan, units: dict[int, list[Unit]], threads: int,
                finish: Callable[[RunResult, RunTask, dict[RunTask, int]], RunTask | None], pool: ModelPool) -> None:
    """Every unit, phase by phase, one after another in this process with ``threads`` threads (restored after)."""
    import torch

    before = torch.get_num_threads()
    set_threads(threads)
    try:
        for phase in sorted(units):
            tries = {t: 0 for unit in units[phase] for t in unit}
            for unit in units[phase]:
                for task, result in zip(unit, execute_stack(unit, plan.settings, pool)):
                    while (again := finish(result, task, tries)) is not None:  # a retry runs alone
                        task, result = again, execute_stack((again,), plan.settings, pool)[0]
    finally:
        set_threads(before)


def _run_phase(client: Any, units: Sequence[Unit], settings: RunSettings,
               finish: Callable[[RunResult, RunTask, dict[RunTask, int]], RunTask | None]) -> None:
    from distributed import as_completed

    tries = {t: 0 for unit in units for t in unit}
    futures = {client.submit(run_on_worker, unit, settings, pure=False, priority=len(units) - i): unit
               for i, unit in enumerate(units)}  # longest first
    done = as_completed(list(futures))
    for future in done:
        unit = futures.pop(future)
        try:
            results = future.result()
        except Exception as exc:  # noqa: BLE001 (the worker died, killed or out of memory: the sweep goes on)
            error = f"worker lost: {type(exc).__name__}: {exc}"
            results = [RunResult(task.label, task.run_dir, "failed", error=error) for task in unit]
        for task, result in zip(unit, results):
            again = finish(result, task, tries)
            if again is not None:  # a retry runs alone
                retry = client.submit(run_on_worker, (again,), settings, pure=False)
                futures[retry] = (again,)
                done.add(retry)


def report_is_current(runs_dir: Path) -> bool:
    """Whether ``<runs>/report/summary.json`` (and, with age runs, ``<runs>/age_report/age_report.md``) is newer
    than every result below ``runs_dir``."""
    from coopipe.jobs.age_report import AGE_FILES, find_age_metrics

    stamps = [runs_dir / "report" / "summary.json"]
    if find_age_metrics(runs_dir, exclude=[runs_dir / "report", runs_dir / "age_report"]):
        stamps.append(runs_dir / "age_report" / AGE_FILES["index"])
    if not all(p.is_file() for p in stamps):
        return False
    stamp = min(p.stat().st_mtime for p in stamps)
    outputs = (runs_dir / "report", runs_dir / "age_report")
    return not any(p.stat().st_mtime > stamp for p in metrics_files(runs_dir)
                   if not any(o in p.parents for o in outputs))


def write_reports(runs_dir: Path) -> list[str]:
    """The usual report (``<runs>/report``) and, with age results, the age report beside it; one line per report."""
    from coopipe.jobs.report import run_reports

    summary, ages = run_reports(runs_dir)
    lines = [f"report: {summary['n_records']} result(s) -> {runs_dir / 'report'}"]
    lines += [f"age report ({dataset}, {age['runs']} runs) -> {runs_dir / 'age_report'}" for dataset, age in ages.items()]
    return lines

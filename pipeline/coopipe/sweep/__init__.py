"""Sweeps: plan a grid of runs (datasets x methods x shots x seeds, baselines, base/new, transfer) and run every
missing one as a task on dask.distributed.

- :mod:`coopipe.sweep.plan`: the typed plan (:class:`RunTask`, :class:`EncodeTask`) and :func:`plan_sweep`;
- :mod:`coopipe.sweep.tasks`: what one task does on a worker (lock the run folder, skip a finished run, train /
  evaluate / run a baseline, return a :class:`RunResult`);
- :mod:`coopipe.sweep.runner`: encoding once per dataset, then the tasks on a ``LocalCluster`` (or a scheduler
  address), progress, failures and retries.

Why dask: the grid outgrows one machine (11 datasets x 5 shots x 3 seeds x 4 variants is 660 runs); the same plan
goes to a real cluster with ``--scheduler ADDRESS``. The run folder is the unit of idempotence (a run whose result
files exist is skipped) and of locking (``flock`` on ``<run>.lock``), so a killed sweep re-runs only what is
missing and two sweeps never run one run at once.
"""

from coopipe.sweep.plan import (
    EncodeTask,
    RunTask,
    SweepPlan,
    SweepSpec,
    parse_variant,
    plan_sweep,
)
from coopipe.sweep.runner import SweepOutcome, auto_jobs, run_sweep
from coopipe.sweep.tasks import RunResult, execute_task

__all__ = [
    "EncodeTask", "RunResult", "RunTask", "SweepOutcome", "SweepPlan", "SweepSpec", "auto_jobs", "execute_task",
    "parse_variant", "plan_sweep", "run_sweep",
]

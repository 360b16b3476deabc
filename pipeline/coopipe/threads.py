"""How many threads a step uses, and how a waiting thread waits: small steps that stay fast on a shared CPU.

Why: a small step (CoCoOp at batch 1, CoOp at small K, one test image at a time) is hundreds of short parallel
regions: each GEMM, layer norm, GELU and fill of a K = 10 batch-1 CoCoOp step (about 48 packed text rows) is tens
of microseconds of work split over the intra-op pool, with a barrier at its end. PyTorch's CPU wheels run that pool
on GNU libgomp, whose waiting threads spin (``GOMP_SPINCOUNT`` 300,000 pauses, milliseconds on these CPUs) before
they sleep. On a quiet machine that is what makes the step fast. When another process takes a core, the spinning
thread holds the core the preempted thread needs, and every barrier waits out a scheduler time slice: profiled on
2 shared cores, a 48-row layer norm took 7.5 ms instead of microseconds, and the step ran 20x slower than quiet.

Two levers, both here:

- :func:`yielding_waits`: a waiting thread spins briefly (:data:`SPIN_COUNT` pauses: 30 times shorter than
  libgomp's default, yet enough to bridge the gap between two operations of a quiet step) and then sleeps,
  handing the core back. libgomp reads its settings once, when it is loaded (``import torch``), so this runs when the ``coopipe``
  package is imported, before any of its modules imports torch, and only where the user has set neither
  ``OMP_WAIT_POLICY`` nor ``GOMP_SPINCOUNT``.
- :func:`threads_for` / :func:`step_threads`: one thread where a pass is too small to split (fewer than
  :data:`SPLIT_ROWS_WIDTH` text rows x width elements per activation), otherwise the pool's size, but never more
  than the cores other processes leave free when the step starts (:func:`free_cores`) where the user asks for it
  (:data:`SHARE_VARIABLE` set, :func:`shares_cores`). A thread that lands on a core another process also wants is
  preempted for a time slice, and its partners wait for it at every barrier; one thread on the one free core
  instead runs at that core's full speed. It is asked for, not the default, because it makes a float32 run's
  rounding follow its neighbours: without it the same seed gives the identical run on the same CPU.

The thread count changes only the order of float summations inside a product, never what is computed
(``tests/test_threads.py`` checks a CoCoOp step's loss and gradients with the policy against the plain
computation in float64, and one thread against two: bit for bit in float64, within rounding in float32, where
oneDNN's products may round differently, so a float32 run's last bits follow the machine's load).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, MutableMapping

logger = logging.getLogger(__name__)

__all__ = [
    "RESAMPLE_S", "SHARE_VARIABLE", "SPIN_COUNT", "SPLIT_ROWS_WIDTH", "WAIT_VARIABLES", "free_cores", "shares_cores", "step_threads", "threads_for", "yielding_waits",
]

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # a user who sets either keeps their own wait policy
# Pauses a waiting libgomp thread spins before it sleeps. libgomp's default is 300,000 (several milliseconds: a
# scheduler time slice lost at every barrier once a core is taken); 10,000 is a few hundred microseconds.
SPIN_COUNT = 10_000
# Below this many elements per activation (packed text rows x width) a pass runs on one thread: 16 rows of a
# 512-wide text tower. Measured on 2 cores (oneDNN fp32): 2 threads beat one from 48 rows up (docs/performance.md).
SPLIT_ROWS_WIDTH = 16 * 512
# Set (to anything but 0) to cap a step's threads by the cores free when it starts (:func:`free_cores`).
SHARE_VARIABLE = "COOPIPE_SHARE_CORES"
RESAMPLE_S = 0.0005  # a second look at the runnable count, where the first saw another process's thread


def yielding_waits(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Make libgomp's waiting threads yield the core after a short spin: sets ``GOMP_SPINCOUNT`` in ``environ``.

    Only where the user set neither of :data:`WAIT_VARIABLES` and torch is not imported yet (libgomp has then
    read its settings already; a child process still inherits the variable). Returns whether it set it.
    """
    if any(name in environ for name in WAIT_VARIABLES):
        return False
    environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    if "torch" in sys.modules:
        logger.debug("torch was imported before coopipe: GOMP_SPINCOUNT applies to child processes only")
    return True


def threads_for(rows: int, width: int, available: int) -> int:
    """Threads for a pass of ``rows`` text rows of ``width``: one where it is too small to split, else ``available``."""
    return 1 if rows * width < SPLIT_ROWS_WIDTH else max(available, 1)


def _runnable_elsewhere(loadavg: str, own_states: list[str]) -> int:
    """Runnable threads of other processes: the system's count (``/proc/loadavg``'s fourth field, ``running/total``,
    which includes the calling thread) less this process's threads in state R (``/proc/self/task/*/stat``)."""
    running = int(loadavg.split()[3].split("/")[0])
    own = sum(1 for stat in own_states if stat.rpartition(")")[2].split()[:1] == ["R"])
    return max(running - max(own, 1), 0)


def _runnable_now() -> int:
    """Runnable threads of other processes, one snapshot (see :func:`_runnable_elsewhere`)."""
    with open("/proc/loadavg") as f:
        loadavg = f.read()
    if int(loadavg.split()[3].split("/")[0]) <= 1:  # only the calling thread: no need to read the others
        return 0
    states = []
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/stat") as f:
            states.append(f.read())
    return _runnable_elsewhere(loadavg, states)


def free_cores() -> int | None:
    """Cores this process may use (its affinity) that no other process's runnable thread wants right now.

    A snapshot when a step starts: steps are short and repeated, so a load that comes and goes is followed step by
    step. A thread seen runnable is looked for again :data:`RESAMPLE_S` later (the fewer counts): a kernel worker
    or a process that wakes for an instant should not halve the threads of a whole step on a quiet machine.
    None where the counts cannot be read (not Linux): the caller then keeps the pool's size.
    """
    try:
        cores = len(os.sched_getaffinity(0))
        others = _runnable_now()
        if others:
            time.sleep(RESAMPLE_S)
            others = min(others, _runnable_now())
        return max(cores - others, 1)
    except (AttributeError, OSError, ValueError, IndexError):
        return None


def shares_cores(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether the user asked for the free-core cap (:data:`SHARE_VARIABLE`): faster beside other work, at the price
    of float32 rounding that follows the load (docs/performance.md section 9)."""
    return environ.get(SHARE_VARIABLE, "") not in ("", "0")


def _no_cap() -> None:
    return None


@contextlib.contextmanager
def step_threads(rows: int, width: int, *, free: Callable[[], int | None] | None = None) -> Iterator[int]:
    """Run the block (a step's forward and backward) on :func:`threads_for` threads, at most ``free()`` of them
    (:func:`free_cores` unless given, where :func:`shares_cores`; a None count: no cap), then restore the pool's size."""
    import torch  # here, not at the top: yielding_waits must be importable before torch is

    before = torch.get_num_threads()
    cap = (free or (free_cores if shares_cores() else _no_cap))()
    threads = threads_for(rows, width, before if cap is None else min(before, cap))
    if threads == before:
        yield threads
        return
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)

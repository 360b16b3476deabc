"""The suite leaves no process behind: every process a test starts, and every process those start, must be gone
when the session ends.

Why a subreaper: a process whose parent dies (a `coopipe` run killed with SIGKILL in a kill loop, say) is
reparented to PID 1, and from there no check in this process can see it. Made a child subreaper
(``PR_SET_CHILD_SUBREAPER``, Linux), the test process adopts such orphans instead, so at the end of the session every
survivor is a descendant that :func:`leftover_processes` finds.
"""

from __future__ import annotations

import ctypes
import multiprocessing.resource_tracker
import os
import sys
import time

import psutil

_PR_SET_CHILD_SUBREAPER = 36


def adopt_orphans() -> bool:
    """Make this process the reaper of its orphaned descendants; False where the platform has no such call."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)  # this process's symbols: libc's prctl, no ldconfig subprocess
    return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def _interpreter_helpers() -> set[int]:
    """multiprocessing's resource tracker of this process: it ends with the interpreter (when the last holder of
    its pipe exits), so it is no leak by itself; a process that still holds its pipe is reported on its own."""
    pid = getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None)
    return {pid} if pid else set()


def _reap(proc: psutil.Process) -> None:
    try:
        os.waitpid(proc.pid, os.WNOHANG)
    except ChildProcessError:  # not ours to wait for (a grandchild's zombie): its parent reaps it
        pass


def leftover_processes(grace_s: float = 15.0) -> list[psutil.Process]:
    """Descendants of this process still running after ``grace_s`` seconds (zombies are reaped, not counted)."""
    deadline = time.monotonic() + grace_s
    while True:
        alive = []
        for proc in psutil.Process().children(recursive=True):
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    _reap(proc)
                elif proc.pid not in _interpreter_helpers():
                    alive.append(proc)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid}: {' '.join(proc.cmdline())[:160]}"
    except psutil.Error:
        return f"pid {proc.pid}"


def kill_all(procs: list[psutil.Process]) -> None:
    """SIGKILL the leftovers (the check reports them; it does not leave them running) and reap them."""
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    for proc in procs:
        _reap(proc)

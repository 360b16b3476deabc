"""Worker processes die with the process that started them.

Why: a forked decode worker inherits its parent's open files, among them the ``flock`` of the store being
written. If the parent is killed (SIGKILL, the OOM killer) while a worker is blocked or busy, the worker lives on
holding that lock, and every re-run reports the store "being written by another process" until someone finds
and kills the orphan. On Linux, ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` has the kernel kill the worker as soon as
its parent dies; elsewhere, PyTorch's own watchdog (a parent-alive check between batches) is all there is.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (call first thing in a forked worker).

    Only where the worker's parent is the process that started it (the ``fork`` start method): a worker started
    through a fork server is the server's child, whose death says nothing about the caller's; there PyTorch's
    watchdog is what notices.
    """
    parent = multiprocessing.parent_process()
    if not sys.platform.startswith("linux") or parent is None or parent.pid != os.getppid():
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            logger.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
            return
    except (OSError, AttributeError) as exc:  # no libc symbol: nothing better to do than the watchdog
        logger.debug("prctl unavailable: %s", exc)
        return
    if os.getppid() != parent.pid:
        os._exit(1)  # the parent died before the request took effect: nobody will ever read our results

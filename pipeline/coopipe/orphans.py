"""Worker processes die with the process that started them.

Why: a DataLoader worker notices a dead parent only between batches, and then hangs at exit joining its queue's
feeder thread, which is blocked writing prefetched batches into a pipe nobody reads any more. A `coopipe encode`
killed with SIGKILL (the resume protocol allows it at any moment) so left its decode workers running for good,
each holding a model-sized memory image. Asking the kernel to SIGKILL the worker when its parent exits
(``PR_SET_PDEATHSIG``, Linux) ends that at the cause; elsewhere the worker keeps torch's own between-batch check.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """In a freshly started worker: be SIGKILLed when the parent exits; exit now if it already has."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)  # this process's symbols: libc's prctl, no ldconfig subprocess
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)

"""Exclusive advisory locks on folders that one process at a time may write (a store, a run folder).

Why: two ``coopipe train`` on one ``--out`` once ran at once and the later silently overwrote the earlier result;
two encodes of one store would interleave chunks. A lock is an ``flock`` on a small file, released by the kernel
when the process dies (a killed run never leaves a stale lock behind).
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from coopipe.errors import LockedError

__all__ = ["exclusive_lock"]


@contextmanager
def exclusive_lock(lock_file: Path, what: str, *, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (created with its folder); :class:`LockedError` naming ``what`` and
    the lock file at once if another process holds it (by default never waits: a second writer is a mistake to
    report). ``wait=True`` blocks until the holder is done instead, for work that any process may do once and all
    others then reuse (an engine export: the waiter finds the file written)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise LockedError(
                f"{what} is being written by another process (lock {lock_file}); wait for it to finish or stop it"
            ) from exc
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)

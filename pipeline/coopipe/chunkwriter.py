"""A background thread that writes finished chunks of a feature store while the encoder keeps running.

Why: on a small CPU every millisecond the main thread spends compressing and writing a chunk is a millisecond
the image encoder (the only cost that should count) stands still. Handing finished chunks to one writer thread
takes zstd compression and zarr I/O off the critical path; the bounded queue keeps memory bounded.
"""

from __future__ import annotations

import logging
import queue
import threading

import numpy as np

from coopipe.store_writer import StoreWriter

logger = logging.getLogger(__name__)


class ChunkWriterThread:
    """Writes finished chunks on one background thread, so zstd compression and zarr I/O overlap the model.

    At most ``depth`` chunks wait (bounded memory); a write error is raised in the caller at the next
    :meth:`put` or at :meth:`close`. Chunks are written (and marked done) in the order they finish.
    """

    def __init__(self, writer: StoreWriter, depth: int = 2) -> None:
        self._writer = writer
        self._queue: queue.Queue[tuple[int, np.ndarray, np.ndarray] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="coopipe-chunk-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._writer.write_chunk(*item)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, chunk: int, features: np.ndarray, valid: np.ndarray) -> None:
        self._raise()
        self._queue.put((chunk, features, valid))

    def close(self, *, raise_errors: bool = True) -> None:
        """Wait until every queued chunk is written."""
        self._queue.put(None)
        self._thread.join()
        if raise_errors:
            self._raise()
        elif self._error is not None:
            logger.error("writing a finished chunk failed too: %s", self._error)


__all__ = ["ChunkWriterThread"]

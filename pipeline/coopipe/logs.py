"""Logging set-up for programs (CLI, stage scripts, sweep workers); the library itself only creates loggers.

Every line goes through one handler that writes *above* the progress bars (``tqdm.write``), so a log line is never
glued onto a bar (``...28.14s/run]WARNING:coopipe.models: ...``). Python warnings (``warnings.warn`` from
libraries) are routed through logging too, and open_clip, which logs through the *root* logger with
``logging.warning`` (which, on a process without handlers such as a dask worker, configures its own
``WARNING:root:`` output), is filtered here.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _QuietThirdParty(logging.Filter):
    """open_clip logs through the *root* logger (INFO on every model build, a WARNING for random weights, which
    coopipe reports itself); keep those out of the user's terminal unless COOPIPE_LOG=DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "root":
            return True
        if "No pretrained weights loaded" in record.getMessage():
            return False
        return record.levelno >= logging.WARNING


class AboveProgressBars(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes through ``tqdm.write``: open bars are cleared, the line printed, the bars
    redrawn below it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            # the current stderr, not the one at set-up: a caller (typer's CliRunner, pytest) may have swapped and
            # closed that one since, and every later line would end in "--- Logging error ---"
            stream = sys.stderr
            tqdm.write(self.format(record), file=stream)
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(level: str | None = None) -> None:
    level = (level or os.environ.get("COOPIPE_LOG", "INFO")).upper()
    handler = AboveProgressBars()
    handler.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S"))
    if level != "DEBUG":
        handler.addFilter(_QuietThirdParty())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # library warnings (warnings.warn) as log lines, above the bars; released first, because a second call is a no-op
    # while logging still holds the hook of an earlier set-up that something else (warnings.catch_warnings) undid
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    for noisy in ("distributed", "asyncio", "numcodecs", "PIL", "urllib3", "filelock", "matplotlib", "faiss"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def route_worker_logging() -> None:
    """In a worker process (dask) whose root logger has no handler: the same filtered handler, at WARNING, so that
    third-party root-logger warnings neither print as ``WARNING:root:...`` nor interleave with the bars."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = AboveProgressBars()
    handler.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S"))
    handler.setLevel(logging.WARNING)  # a run's INFO lines go to its log.txt, not to the worker's stderr
    handler.addFilter(_QuietThirdParty())
    root.addHandler(handler)
    logging.captureWarnings(True)


def run_stage(main: Callable[[], None]) -> None:
    """Entry point of a stage script: configure logging, run ``main``, and turn coopipe's errors into one
    line on stderr and exit code 1 (DVC then reports the stage as failed without a traceback)."""
    from coopipe.errors import CoopipeError

    setup_logging()
    try:
        main()
    except CoopipeError as exc:
        logging.getLogger("coopipe").error("%s", exc)
        raise SystemExit(1) from None

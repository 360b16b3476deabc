"""Logging set-up for programs (CLI and stage scripts); the library itself only creates loggers."""

from __future__ import annotations

import logging
from collections.abc import Callable
import os


class _QuietThirdParty(logging.Filter):
    """open_clip logs through the *root* logger (INFO on every model build, a WARNING for random weights);
    keep those out of the user's terminal unless COOPIPE_LOG=DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "root":
            return True
        if "No pretrained weights loaded" in record.getMessage():
            return False
        return record.levelno >= logging.WARNING


def setup_logging(level: str | None = None) -> None:
    level = (level or os.environ.get("COOPIPE_LOG", "INFO")).upper()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    if level != "DEBUG":
        handler.addFilter(_QuietThirdParty())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("distributed", "asyncio", "numcodecs", "PIL", "urllib3", "filelock", "matplotlib", "faiss"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


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

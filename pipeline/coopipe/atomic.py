"""Atomic file writes: every file coopipe writes in place goes through :func:`atomic_write`.

Why: runs are killed (a grid stopped, a machine out of memory, a DVC stage interrupted) and their folders are
read again (resume, skip-if-done, the report, DVC's hashes). A file written in place can be left half-written
and then read as valid. Writing to a temporary file in the same folder (same filesystem, so the rename is
atomic), flushing it to disk and ``os.replace``-ing it onto the target means a reader sees the old file or the
new one, never a mix; a write that fails leaves the old file untouched and removes its temporary file.

The temporary name is unique (``mkstemp``: two processes writing the same file never share it) and keeps the
target's suffix, so writers that pick a format from the extension (matplotlib's ``savefig``, FAISS) still work.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "write_bytes", "write_json", "write_text"]

FILE_MODE = 0o644  # mkstemp creates 0600; published files are readable like any other output


def atomic_write(path: str | os.PathLike[str], write_fn: Callable[[Path], Any]) -> Path:
    """Call ``write_fn(tmp)`` to fill a temporary file next to ``path``, fsync it, then move it onto ``path``.

    ``write_fn`` receives the temporary path (an existing empty file) and may open or replace it. If it
    raises, ``path`` keeps its old content and the temporary file is removed. Missing parent folders are
    created. Returns ``path``.
    """
    path = Path(path)
    if path.is_dir():  # os.replace would fail only after the whole write
        raise IsADirectoryError(errno.EISDIR, "cannot write a file over a folder", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is None:  # a write deep inside a library (a full disk): name the file being written
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike[str], data: Any, *, indent: int | None = 1, **dumps: Any) -> Path:
    """Write ``data`` as JSON (plus a final newline) to ``path`` atomically.

    ``indent`` and any other ``json.dumps`` keyword (``default``, ``separators``, ``ensure_ascii``) are passed
    on; by default numpy/torch scalars and other non-JSON values are written through ``float``, as metrics are.
    """
    dumps.setdefault("default", float)
    return write_text(path, json.dumps(data, indent=indent, **dumps) + "\n")

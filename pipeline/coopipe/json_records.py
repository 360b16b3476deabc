"""Reading the JSON and text files coopipe is given: one place where a file that is missing, not UTF-8, not JSON,
nested too deeply or holding fields of the wrong shape becomes one line naming the file and the fix.

Why one module: every record (a checkpoint's ``prompt.json``, an export's ``export.json``, split files, few-shot
indexes, manifests, class-name lists, metrics files, params) is read from a file people copy, edit and half-write.
Readers that caught only some of the errors ``json.loads`` or ``str.decode`` raise surfaced the rest as a bare
``Expecting value ...``, ``'utf-8' codec can't decode ...``, ``dictionary update sequence element ...`` or
``RecursionError`` naming no file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from coopipe.errors import CheckpointError, CoopipeError, MissingFileError

__all__ = ["fields_of", "parse_json", "read_folder_record", "read_json", "read_text"]

# What interpreting a parsed record raises when a field has the wrong type or shape (``dict([1])``,
# ``int("abc")``, ``float(tensor_of_two)``, ``None.get``, a missing key, a path holding a NUL byte)
_FIELD_ERRORS = (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError)


def read_text(path: str | os.PathLike[str], *, what: str, fix: str, error: type[CoopipeError]) -> str:
    """The UTF-8 text of ``path`` (``what`` names it in messages: "split file"); a missing file is a
    :class:`MissingFileError`, text that is not UTF-8 an ``error`` naming the file and ``fix``. Other operating-system
    errors (permission, a folder) are left to the command line's boundary, which names the path."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise MissingFileError(f"{what} {path} not found; {fix}") from exc
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text ({exc}); {fix}") from exc


def read_json(path: str | os.PathLike[str], *, what: str, fix: str, error: type[CoopipeError]) -> Any:
    """The parsed JSON of ``path``; not UTF-8, not JSON or nested too deeply to parse is one ``error`` naming it."""
    return parse_json(read_text(path, what=what, fix=fix, error=error), where=f"{what} {path}", fix=fix, error=error)


def parse_json(text: str, *, where: str, fix: str, error: type[CoopipeError]) -> Any:
    """``text`` parsed as JSON; not JSON or nested too deeply to parse is one ``error`` naming ``where`` (the file,
    and the line where a file holds one record a line)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{where} is not readable JSON ({exc}); {fix}") from exc
    except RecursionError as exc:
        raise error(f"{where} is nested too deeply to read; {fix}") from exc


@contextmanager
def fields_of(path: str | os.PathLike[str], *, what: str, fix: str, error: type[CoopipeError]) -> Iterator[None]:
    """Interpret a parsed record inside this block: a field of the wrong type or shape (the built-in errors that
    rebuilding values raises) becomes one ``error`` naming the file; coopipe's own errors pass unchanged."""
    try:
        yield
    except CoopipeError:
        raise
    except _FIELD_ERRORS as exc:
        detail = f"{type(exc).__name__}: {exc}" if isinstance(exc, KeyError | AttributeError) else str(exc)
        raise error(f"{what} {path} has a field of the wrong type or shape ({detail}); {fix}") from exc


def read_folder_record(path: str | os.PathLike[str], name: str, *, missing: str, fix: str) -> tuple[Path, Any]:
    """(folder, parsed JSON) of the record file ``name`` in ``path`` (a folder, or the record file itself).

    ``missing`` ends the :class:`MissingFileError` when the file is absent ("write one with ..."); ``fix`` the
    :class:`CheckpointError` when it is not readable JSON ("re-train").
    """
    path = Path(path)
    folder = path.parent if path.name == name else path
    record_path = folder / name
    if not record_path.is_file():
        raise MissingFileError(f"no {name} in {folder}: {missing}")
    return folder, read_json(record_path, what="record", fix=fix, error=CheckpointError)

"""Reading the small JSON record of a folder (a checkpoint's ``prompt.json``, an export's ``export.json``).

Why one function: both records are read from a folder or from the file itself, and a missing, unreadable or
non-JSON file must give one line naming it and the fix, never a traceback; the two readers differed only in those
words.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from coopipe.errors import CheckpointError, MissingFileError

__all__ = ["read_folder_record"]


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
    try:
        return folder, json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{record_path} is not readable JSON ({exc}); {fix}") from exc

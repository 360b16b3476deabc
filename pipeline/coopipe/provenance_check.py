"""The schema of a store's provenance: the fields every reader indexes, with their types and safe values.

Why one module: the provenance of an imported HDF5 file and the provenance found in a store's attributes are
read by the same code (``cache info``, ``eval``, store names); checking them in one place means a missing
``classnames`` or a list where an object belongs is one line naming the file, never a ``KeyError`` later.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from coopipe.errors import StoreError, UnsafePathError

MAX_VIEWS = 1024

# The provenance fields a store must carry, with their JSON types (what readers of a store index without checks).
_PROVENANCE_SCHEMA: dict[str, tuple[type, ...]] = {
    "dataset": (str,), "split": (str,), "model": (str,), "weights": (str,), "file_list_sha256": (str,),
    "n_split": (int,), "classnames": (list,), "rows": (str, dict), "preprocess": (dict,), "views": (dict,),
    "dtype": (str,), "precision": (str,), "coopipe_version": (str,), "open_clip_version": (str,),
}
READ_FIELDS = ("dataset", "split", "model", "weights", "classnames", "views")  # what every store reader needs
MAX_NAME_CHARS = 200  # dataset, split and class names
MAX_ID_CHARS = 1000  # model and weights identities


def checked_provenance(
    provenance: Any, where: str, fix: str = "cannot import it", required: Collection[str] = tuple(_PROVENANCE_SCHEMA)
) -> dict[str, Any]:
    """``provenance``, refused (one line naming ``where`` and ``fix``) unless it has the schema's fields, safe.

    An imported HDF5 file may come from anyone: ``dataset``/``split`` become folder and file names, so a value such as
    ``../../x`` must never reach the file system (the store path is slugged and confined as well), and every
    reader of a store (``cache info``, ``eval``) indexes these fields without further checks.
    """
    if not isinstance(provenance, dict):
        raise StoreError(f"{where}: the 'provenance' attribute is not an object; {fix}")
    for key, types in _PROVENANCE_SCHEMA.items():
        value = provenance.get(key)
        if key not in provenance and key not in required:
            continue
        if not isinstance(value, types) or (int in types and isinstance(value, bool)):
            want = " or ".join(t.__name__ for t in types)
            raise StoreError(f"{where}: provenance field {key!r} is missing or not a {want} (got {value!r:.60}); "
                             f"{fix}")
    for key in ("dataset", "split", "model", "weights"):
        value, limit = provenance[key], MAX_NAME_CHARS if key in ("dataset", "split") else MAX_ID_CHARS
        if not value or len(value) > limit or not value.isprintable():
            raise StoreError(f"{where}: provenance field {key!r} must be 1..{limit} printable characters; "
                             f"{fix}")
    for key in ("dataset", "split"):
        value = provenance[key]
        if value in (".", "..") or any(c in value for c in "/\\\0") or value != value.strip():
            raise UnsafePathError(
                f"{where}: provenance {key} {value!r} is not a plain name (it would build a path outside the "
                f"cache); refusing it ({fix})"
            )
    names = provenance["classnames"]
    if not names or not all(isinstance(c, str) and 0 < len(c) <= MAX_ID_CHARS for c in names):
        raise StoreError(f"{where}: provenance 'classnames' must be a non-empty list of names; {fix}")
    n_aug = provenance["views"].get("n_aug")
    if type(n_aug) is not int or not 0 <= n_aug <= MAX_VIEWS:
        raise StoreError(f"{where}: provenance field 'views' is missing or malformed; {fix}")
    if provenance.get("dtype", "float32") not in ("float16", "float32") or provenance.get("n_split", 1) < 1:
        raise StoreError(f"{where}: provenance 'dtype' must be float16 or float32 and 'n_split' positive; "
                         f"{fix}")
    return provenance

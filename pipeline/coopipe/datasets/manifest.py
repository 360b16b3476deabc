"""A CSV or JSON manifest: one row per image with ``path``, ``label`` and optionally ``split``.

Formats (chosen by suffix):

- ``.csv`` / ``.tsv``: a header row naming the columns, e.g. ``path,label,split``;
- ``.json``: a list of objects ``{"path": ..., "label": ..., "split": ...}``, or an object
  ``{"classnames": [...], "items": [...]}`` whose class names fix the label order;
- ``.jsonl``: one such object per line.

``label`` is a class name or an integer index into the class names (which then must be given, as the
``classnames`` option or in the JSON). Without given class names, the classes are the sorted distinct labels.
``path`` is relative to the manifest's folder, or absolute. Without a ``split`` column, every class is split at
random (seeded) by ``val_ratio`` / ``test_ratio``. The dataset is named ``manifest-<file stem>``.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coopipe.datasets.base import SPLITS, Dataset, Split
from coopipe.datasets.common import (
    DEFAULT_TEMPLATE,
    check_files_exist,
    check_template,
    readable_classname,
    safe_name,
    shown,
    split_stratified,
)
from coopipe.errors import DatasetError, MissingFileError
from coopipe.json_records import parse_json, read_text

logger = logging.getLogger(__name__)

_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def build_manifest(
    data_root: Path,
    *,
    classnames: Sequence[str] | str | Path | None = None,
    template: str = DEFAULT_TEMPLATE,
    val_ratio: float = 0.2,
    test_ratio: float = 0.3,
    seed: int = 0,
    path_column: str = "path",
    label_column: str = "label",
    split_column: str = "split",
    check_files: bool = True,
) -> Dataset:
    """Read the manifest file ``data_root``; ``classnames`` is a list or a text file with one name per line."""
    manifest = data_root
    if not manifest.is_file():
        raise MissingFileError(f"manifest {manifest} not found; pass a .csv, .tsv, .json or .jsonl manifest file")
    check_template(template)
    rows, given = _read_rows(manifest, path_column, label_column)
    if classnames is not None:
        given = _load_classnames(classnames, manifest)
    if not rows:
        raise DatasetError(f"manifest {manifest} lists no images; add rows with {path_column} and {label_column}")
    has_split = any(row.get(split_column) not in (None, "") for _, row in rows)

    names = given if given is not None else _infer_classnames(rows, manifest, label_column)
    lookup = _label_lookup(names)
    paths: list[str] = []
    labels: list[int] = []
    split_of: list[str] = []
    for where, row in rows:
        paths.append(_row_path(row, path_column, manifest, where))
        labels.append(_label_index(row.get(label_column), lookup, names, manifest, where, label_column))
        if has_split:
            value = row.get(split_column)
            key = _SPLIT_ALIASES.get(str(value).strip().lower()) if value not in (None, "") else None
            if key is None:
                raise DatasetError(
                    f"manifest {manifest}, {where}: {split_column} {value!r} is not one of train/val/test; "
                    f"fill the {split_column} column on every row (or drop it to split by ratio)"
                )
            split_of.append(key)

    counts = [0] * len(names)
    for label in labels:
        counts[label] += 1
    empty = [names[i] for i, n in enumerate(counts) if n == 0]
    if empty:
        raise DatasetError(
            f"manifest {manifest}: empty classes: {shown(empty)} have no images; add rows or drop them from classnames"
        )

    if has_split:
        splits = {
            name: Split(
                tuple(p for p, s in zip(paths, split_of) if s == name),
                tuple(lab for lab, s in zip(labels, split_of) if s == name),
            )
            for name in SPLITS
        }
    else:
        by_class: list[list[str]] = [[] for _ in names]
        for path, label in zip(paths, labels):
            by_class[label].append(path)
        splits = split_stratified(by_class, val_ratio=val_ratio, test_ratio=test_ratio, seed=seed)

    root = manifest.parent
    if check_files:
        check_files_exist(
            root,
            splits,
            source=str(manifest),
            fix=f"paths in the manifest are relative to {root} (or absolute); fix them or add the images",
        )
    readable = tuple(readable_classname(n) for n in names)
    logger.debug("manifest %s: %d classes, %s", manifest, len(names), {k: len(v) for k, v in splits.items()})
    return Dataset(
        f"manifest-{safe_name(manifest.stem)}", root, readable, template, splits, source=str(manifest)
    )


def read_manifest_paths(manifest: Path, *, path_column: str = "path") -> list[Path]:
    """The image paths a manifest lists (no labels needed: `coopipe predict` reads unlabelled manifests).

    Same formats as :func:`build_manifest`; relative paths are resolved against the manifest's folder.
    """
    if not manifest.is_file():
        raise MissingFileError(f"manifest {manifest} not found; pass a .csv, .tsv, .json or .jsonl manifest file")
    rows, _ = _read_rows(manifest, path_column, path_column)  # the label column is optional here
    paths = []
    for where, row in rows:
        paths.append(manifest.parent / _row_path(row, path_column, manifest, where))
    return paths


def _row_path(row: dict[str, Any], path_column: str, manifest: Path, where: str) -> str:
    """A row's image path, stripped; missing, empty or holding a NUL byte (no file system takes one) is one line."""
    path = row.get(path_column)
    if not isinstance(path, str) or not path.strip() or "\0" in path:
        raise DatasetError(f"manifest {manifest}, {where}: missing or empty {path_column!r}, or a NUL byte in it; "
                           f"every row needs a path")
    return path.strip()


def _read_rows(
    manifest: Path, path_column: str, label_column: str
) -> tuple[list[tuple[str, dict[str, Any]]], list[str] | None]:
    """Rows as ``(where, mapping)`` (``where`` names the line or item for messages), and JSON class names."""
    suffix = manifest.suffix.lower()
    text = read_text(manifest, what="manifest", fix="save it as UTF-8 text", error=DatasetError).removeprefix("\ufeff")
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        for column in (path_column, label_column):
            if column not in header:
                raise DatasetError(
                    f"manifest {manifest} has no {column!r} column (header: {', '.join(header) or 'none'}); "
                    f"expected a header row like 'path,label,split'"
                )
        return [(f"line {reader.line_num}", dict(row)) for row in reader], None
    if suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                where = f"line {lineno}"
                rows.append((where, _json_row(_parse_json(line, manifest, where), manifest, where)))
        return rows, None
    if suffix == ".json":
        data = _parse_json(text, manifest, "file")
        given: list[str] | None = None
        if isinstance(data, dict):
            items = data.get("items", data.get("images"))
            if not isinstance(items, list):
                raise DatasetError(
                    f"manifest {manifest} is a JSON object without an 'items' list; expected a list of "
                    f'{{"path": ..., "label": ...}} or {{"classnames": [...], "items": [...]}}'
                )
            if "classnames" in data:
                given = _check_name_list(data["classnames"], f"{manifest} ('classnames')")
            data = items
        if not isinstance(data, list):
            raise DatasetError(
                f'manifest {manifest} must hold a JSON list of {{"path": ..., "label": ...}} objects'
            )
        return [(f"item {i}", _json_row(item, manifest, f"item {i}")) for i, item in enumerate(data)], given
    raise DatasetError(f"manifest {manifest}: unsupported suffix {manifest.suffix!r}; use .csv, .tsv, .json or .jsonl")


def _parse_json(text: str, manifest: Path, where: str) -> Any:
    return parse_json(text, where=f"manifest {manifest}, {where},", fix="fix that JSON", error=DatasetError)


def _json_row(item: Any, manifest: Path, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise DatasetError(f"manifest {manifest}, {where}: expected an object like {{\"path\": ..., \"label\": ...}}")
    return item


def _load_classnames(classnames: Sequence[str] | str | Path, manifest: Path) -> list[str]:
    if isinstance(classnames, (str, Path)):
        path = Path(classnames).expanduser()
        if not path.is_absolute():
            path = manifest.parent / path if (manifest.parent / path).is_file() else path
        if not path.is_file():
            raise MissingFileError(f"class-name file {path} (for manifest {manifest}) not found; one name per line")
        text = read_text(path, what="class-name file", fix="save it as UTF-8 text, one name per line", error=DatasetError)
        names = [line.strip() for line in text.splitlines() if line.strip()]
        return _check_name_list(names, str(path))
    return _check_name_list(list(classnames), "classnames option")


def _check_name_list(names: Any, where: str) -> list[str]:
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() and "\0" not in n
                                                           for n in names):
        raise DatasetError(f"{where}: class names must be a non-empty list of non-empty strings without NUL bytes")
    cleaned: list[str] = [n.strip() for n in names]
    dup = sorted(n for n, count in Counter(cleaned).items() if count > 1)
    if dup:
        raise DatasetError(f"{where}: duplicate class names {shown(dup)}; class names must be distinct")
    return cleaned


def _infer_classnames(rows: list[tuple[str, dict[str, Any]]], manifest: Path, label_column: str) -> list[str]:
    names: set[str] = set()
    for where, row in rows:
        label = row.get(label_column)
        if _as_int(label) is not None:
            raise DatasetError(
                f"manifest {manifest}, {where}: integer label {label!r} needs class names; pass "
                f"classnames=[...] (or a text file, one per line), or write class names in the {label_column} column"
            )
        if not isinstance(label, str) or not label.strip():
            raise DatasetError(f"manifest {manifest}, {where}: missing or empty {label_column!r}")
        names.add(label.strip())
    return sorted(names)


def _label_lookup(names: list[str]) -> dict[str, int]:
    lookup = {readable_classname(n): i for i, n in enumerate(names)}
    lookup.update({n: i for i, n in enumerate(names)})
    return lookup


def _label_index(
    label: Any, lookup: dict[str, int], names: list[str], manifest: Path, where: str, column: str
) -> int:
    if isinstance(label, str) and label.strip() in lookup:
        return lookup[label.strip()]
    index = _as_int(label)
    if index is not None:
        if 0 <= index < len(names):
            return index
        raise DatasetError(
            f"manifest {manifest}, {where}: label {index} is out of range for {len(names)} classes "
            f"(0..{len(names) - 1})"
        )
    raise DatasetError(
        f"manifest {manifest}, {where}: unknown class name {label!r} in {column!r}; known: {shown(names, 8)} "
        f"(fix the label or the class names)"
    )


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None

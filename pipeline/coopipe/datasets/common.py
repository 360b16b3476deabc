"""Helpers shared by the adapters: CoOp split files, image listing, existence checks, seeded splits."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from coopipe.datasets.base import SPLITS, Split
from coopipe.errors import DatasetError, MissingFileError
from coopipe.imageio import shown_path
from coopipe.json_records import read_json

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jfif"}
)
SPLIT_FILE_FORMAT = '{"train": [[relpath, label, classname], ...], "val": [...], "test": [...]}'
DEFAULT_TEMPLATE = "a photo of a {}."  # prompt of user datasets (CoOp's generic ImageNet prompt)
_MAX_SHOWN = 3  # how many offending items an error message names


def readable_classname(name: str) -> str:
    """CoOp's rendering of a class name in prompts: underscores become spaces (``Apply_Eye_Makeup``)."""
    return " ".join(name.replace("_", " ").split())


def safe_name(name: str) -> str:
    """A file-name-safe form of ``name`` (letters, digits, ``.``, ``_``, ``-``), for :attr:`Dataset.name`."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return cleaned or "unnamed"


def check_template(template: str) -> str:
    if template.count("{}") != 1:
        raise DatasetError(f"prompt template {template!r} must contain exactly one '{{}}' for the class name")
    return template


def shown(items: Sequence[object], limit: int = _MAX_SHOWN) -> str:
    """``a, b, c (+12 more)``: a short list for one-line error messages."""
    head = ", ".join(str(item) for item in items[:limit])
    return head + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def find_missing(root: Path, relpaths: Iterable[str]) -> list[str]:
    """The paths (relative to ``root``, or absolute) that do not exist, in input order.

    Lists each parent folder once instead of stat-ing every file, so 27,000 paths take milliseconds.
    """
    listings: dict[str, frozenset[str] | None] = {}
    missing = []
    base = os.fspath(root)
    for rel in relpaths:
        parent, name = os.path.split(rel)
        if parent not in listings:
            try:
                listings[parent] = frozenset(os.listdir(os.path.join(base, parent)))
            except OSError:  # missing folder, not a folder, no permission: all its files count as missing
                listings[parent] = None
        names = listings[parent]
        if names is None or name not in names:
            missing.append(rel)
    return missing


def check_files_exist(root: Path, splits: dict[str, Split], *, source: str, fix: str) -> None:
    """Raise :class:`MissingFileError` (count, first few paths, fix) unless every listed image exists."""
    if not root.is_dir():
        raise MissingFileError(f"image folder {root} (used by {source}) does not exist; {fix}")
    paths = [path for split in splits.values() for path in split.paths]
    missing = find_missing(root, paths)
    if missing:
        raise MissingFileError(
            f"{len(missing)} of {len(paths)} images listed in {source} are missing under {root}, "
            f"e.g. {shown(missing)}; {fix}"
        )


def check_confined(root: Path, splits: dict[str, Split], *, source: str) -> None:
    """Refuse paths (absolute, ``..``, or through links) that resolve outside ``root``: for untrusted lists.

    By default split files and manifests may point anywhere (a local tool reading the user's own lists);
    with ``confine_paths`` an encode reads only files inside the dataset's image folder.
    """
    base = os.path.realpath(root)
    outside = [
        path for split in splits.values() for path in split.paths
        if os.path.commonpath([base, os.path.realpath(os.path.join(base, path))]) != base
    ]
    if outside:
        from coopipe.errors import UnsafePathError

        raise UnsafePathError(
            f"{len(outside)} image path(s) listed in {source} lie outside {root}, e.g. {shown(outside)}; "
            f"fix the list, or encode without confine_paths if you trust it"
        )


def list_images(folder: Path, *, recursive: bool = True) -> list[str]:
    """Image files under ``folder`` as sorted POSIX paths relative to it (hidden files and folders skipped)."""
    found: list[str] = []
    if recursive:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, folder)
            prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            found.extend(prefix + f for f in filenames if _is_image(f))
    else:
        with os.scandir(folder) as entries:
            found.extend(e.name for e in entries if _is_image(e.name) and e.is_file())
    found.sort()
    return found


def list_subfolders(folder: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``folder`` (a looping or broken link is skipped, logged)."""
    names = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError as exc:  # e.g. ELOOP: a symlink loop would otherwise end the listing with a traceback
                logger.warning("skipping %s: %s", shown_path(entry.path), exc.strerror)
                continue
            if is_dir:
                names.append(entry.name)
    return sorted(names)


def _is_image(filename: str) -> bool:
    return not filename.startswith(".") and os.path.splitext(filename)[1].lower() in IMAGE_EXTENSIONS


def read_split_file(path: Path, *, missing_fix: str = "") -> tuple[tuple[str, ...], dict[str, Split]]:
    """Parse a CoOp split file: ``{"train": [[relpath, label, classname], ...], "val": ..., "test": ...}``.

    Returns the class names as written in the file (index = label) and the splits. Raises
    :class:`MissingFileError` if the file is absent, :class:`DatasetError` for any format problem, a label
    given two names, two labels with one name, or labels ``0..N-1`` with no images (empty classes).
    """
    if not path.is_file():
        raise MissingFileError(f"split file {path} not found; {missing_fix or 'check the path'}")
    raw = read_json(path, what="split file", fix=f"expected CoOp's format {SPLIT_FILE_FORMAT}", error=DatasetError)
    if not isinstance(raw, dict) or not raw or set(raw) - set(SPLITS):
        got = f"keys {sorted(raw)}" if isinstance(raw, dict) else f"a JSON {type(raw).__name__}"
        raise DatasetError(
            f"split file {path} has {got}; expected an object with keys among train/val/test in CoOp's "
            f"format {SPLIT_FILE_FORMAT}"
        )
    names: dict[int, str] = {}
    splits: dict[str, Split] = {}
    for split_name in SPLITS:
        items = raw.get(split_name, [])
        if not isinstance(items, list):
            raise DatasetError(
                f"split file {path}: {split_name!r} is a JSON {type(items).__name__}, expected a list of "
                f"[relpath, label, classname]"
            )
        paths: list[str] = []
        labels: list[int] = []
        for i, entry in enumerate(items):
            if not (
                isinstance(entry, list)
                and len(entry) == 3
                and isinstance(entry[0], str)
                and entry[0]
                and type(entry[1]) is int
                and entry[1] >= 0
                and isinstance(entry[2], str)
                and entry[2]
                and "\0" not in entry[0] + entry[2]
            ):
                raise DatasetError(
                    f"split file {path}: {split_name}[{i}] is {json.dumps(entry)[:80]}, expected "
                    f"[relpath, label, classname] with a non-negative integer label and no NUL byte in a name "
                    f"(CoOp's split format)"
                )
            relpath, label, classname = entry
            known = names.setdefault(label, classname)
            if known != classname:
                raise DatasetError(
                    f"split file {path}: label {label} is called both {known!r} and {classname!r} "
                    f"({split_name}[{i}]); each label needs one class name"
                )
            paths.append(relpath)
            labels.append(label)
        splits[split_name] = Split(tuple(paths), tuple(labels))
    if not names:
        raise DatasetError(f"split file {path} lists no images; expected CoOp's format {SPLIT_FILE_FORMAT}")
    num_classes = max(names) + 1
    empty = [label for label in range(num_classes) if label not in names]
    if empty:
        raise DatasetError(
            f"split file {path}: empty classes: labels {shown(empty)} have no images (labels must be 0..N-1 "
            f"with every class present); renumber the labels or add the images"
        )
    classnames = tuple(names[label] for label in range(num_classes))
    seen: dict[str, int] = {}
    for label, name in enumerate(classnames):
        if name in seen:
            raise DatasetError(
                f"split file {path}: labels {seen[name]} and {label} are both called {name!r}; "
                f"class names must be distinct"
            )
        seen[name] = label
    logger.debug("read %s: %d classes, %s", path, num_classes, {k: len(v) for k, v in splits.items()})
    return classnames, splits


def split_stratified(
    paths_by_class: Sequence[Sequence[str]], *, val_ratio: float, test_ratio: float, seed: int
) -> dict[str, Split]:
    """Split each class's images at random (seeded) into train/val/test by the given ratios.

    Every class keeps at least one train image. Within a split, entries are ordered by label, then path, so
    the result depends only on the file set, the ratios and the seed.
    """
    check_ratios(val_ratio, test_ratio)
    rng = np.random.default_rng(seed)
    out: dict[str, tuple[list[str], list[int]]] = {name: ([], []) for name in SPLITS}
    for label, class_paths in enumerate(paths_by_class):
        ordered = sorted(class_paths)
        n = len(ordered)
        n_val, n_test = _round(n * val_ratio), _round(n * test_ratio)
        while n - n_val - n_test < 1 and (n_val or n_test):
            if n_test >= n_val:
                n_test -= 1
            else:
                n_val -= 1
        perm = rng.permutation(n)
        parts = {"val": perm[:n_val], "test": perm[n_val : n_val + n_test], "train": perm[n_val + n_test :]}
        for name, idx in parts.items():
            chosen = sorted(ordered[i] for i in idx)
            out[name][0].extend(chosen)
            out[name][1].extend([label] * len(chosen))
    return {name: Split(tuple(p), tuple(l)) for name, (p, l) in out.items()}


def check_ratios(val_ratio: float, test_ratio: float) -> None:
    for label, value in (("val_ratio", val_ratio), ("test_ratio", test_ratio)):
        if not (isinstance(value, (int, float)) and 0 <= value < 1):
            raise DatasetError(f"{label} must be a number in [0, 1), got {value!r}")
    if val_ratio + test_ratio >= 1:
        raise DatasetError(
            f"val_ratio + test_ratio must be below 1 (got {val_ratio} + {test_ratio}); leave images for training"
        )


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))

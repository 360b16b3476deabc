"""Datasets whose labels are ages (ordinal ranks): UTKFace, MORPH in OrdinalCLIP's list layout, numeric manifests.

Why a separate family: an age dataset is a classification dataset over *ranks* (ages ``min_age..max_age``, 101
ranks by default, as OrdinalCLIP), whose class names are the numbers and whose prompt is an age template. Unlike a
CoOp dataset, many ranks may have no image at all (UTKFace's sample has ages 16-77 only), so a rank without images
is normal here, not an error. A label is ``age - min_age``; :func:`rank_values` turns class indices back into ages.

Split files for ages (:func:`write_age_split_file` / :func:`read_age_split_file`) hold
``{"train": [[relpath, age], ...], "val": [...], "test": [...]}`` with ages in years, so they stay valid under
another rank range. UTKFace has no official split: without a split file, a seeded split stratified by age is drawn
and can be recorded with ``record_split``.

MORPH (OrdinalCLIP's ``data_list`` layout): ``$DATA/MORPH/data_list/ET_proto_train.txt`` and ``ET_proto_val.txt``,
one ``relpath age`` per line, paths relative to ``$DATA/MORPH``. OrdinalCLIP uses the val list as its test list
too (model selection on the test set); that departure is reproduced by default, recorded in the dataset's
``source`` and logged; give ``test_list`` (or a distinct ``val_list``) to keep the two apart.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from coopipe.datasets.base import SPLITS, Dataset, Split
from coopipe.datasets.common import (
    check_files_exist,
    check_template,
    list_images,
    safe_name,
    split_stratified,
)
from coopipe.errors import DatasetError, MissingFileError
from coopipe.json_records import read_text

logger = logging.getLogger(__name__)

__all__ = [
    "AGE_TEMPLATE",
    "MAX_AGE",
    "MIN_AGE",
    "build_age_manifest",
    "build_morph",
    "build_utkface",
    "parse_age",
    "rank_classnames",
    "rank_values",
    "read_age_split_file",
    "write_age_split_file",
]

AGE_TEMPLATE = "a photo of a {} year old person."
MIN_AGE, MAX_AGE = 0, 100  # OrdinalCLIP's 101 ranks
_WHOLE_YEARS = re.compile(r"[+-]?[0-9]+(\.0*)?")
MORPH_TRAIN_LIST = "ET_proto_train.txt"
MORPH_VAL_LIST = "ET_proto_val.txt"
_UTK_NAME = re.compile(r"^([^_]+)_")


def rank_classnames(min_age: int = MIN_AGE, max_age: int = MAX_AGE) -> tuple[str, ...]:
    """The class names of the ranks: the ages as numbers (``"0" .. "100"``)."""
    _check_range(min_age, max_age)
    return tuple(str(age) for age in range(min_age, max_age + 1))


def rank_values(classnames: Sequence[str]) -> np.ndarray:
    """The age (float64) of each class of an age dataset, from its numeric class names: (K,)."""
    try:
        return np.array([float(name) for name in classnames], dtype=np.float64)
    except ValueError as exc:
        raise DatasetError(f"class names {list(classnames)[:3]}... are not numbers; this is not an age dataset") from exc


def parse_age(value: Any, *, min_age: int, max_age: int, where: str) -> int:
    """A whole-year age in ``min_age..max_age`` from ``value`` (str or number); ``where`` names file and line."""
    text = str(value).strip() if value is not None and not isinstance(value, bool) else repr(value)
    if isinstance(value, float) and value.is_integer():
        text = str(int(value))  # a JSON 30.0
    # digits only (``30``, ``30.0``): ``1e1``, ``0x1e``, ``3_0``, ``nan`` or ``30.5`` are not an age in years
    if not _WHOLE_YEARS.fullmatch(text):
        raise DatasetError(f"{where}: age {text!r} is not a whole number of years (write digits, e.g. 30); fix the label")
    age = int(text.split(".")[0])
    if not min_age <= age <= max_age:
        raise DatasetError(
            f"{where}: age {age} is outside the rank range {min_age}..{max_age}; fix the label or widen the range "
            f"(--dataset-option min_age=.../max_age=..., or data.options in params.yaml)"
        )
    return age


def _check_range(min_age: int, max_age: int) -> None:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (min_age, max_age)) or max_age < min_age:
        raise DatasetError(
            f"the rank range {min_age!r}..{max_age!r} is empty or not whole years; give integers min_age <= max_age"
        )


def _split_by_age(paths: Sequence[str], ages: Sequence[int], min_age: int, max_age: int, *, val_ratio: float,
                  test_ratio: float, seed: int) -> dict[str, Split]:
    """Seeded split stratified by age (each age split by the ratios; ranks without images stay empty)."""
    by_rank: list[list[str]] = [[] for _ in range(max_age - min_age + 1)]
    for path, age in zip(paths, ages):
        by_rank[age - min_age].append(path)
    return split_stratified(by_rank, val_ratio=val_ratio, test_ratio=test_ratio, seed=seed)


def _dataset(name: str, root: Path, splits: dict[str, Split], *, min_age: int, max_age: int, template: str,
             source: str, check_files: bool) -> Dataset:
    if not any(len(s) for s in splits.values()):
        raise DatasetError(f"{source} lists no images in the rank range {min_age}..{max_age}")
    if check_files:
        check_files_exist(root, splits, source=source, fix=f"image paths must be relative to {root}; fix them")
    return Dataset(name, root, rank_classnames(min_age, max_age), check_template(template), splits, source=source,
                   label_kind="ordinal")


# ---------------------------------------------------------------- split files
def write_age_split_file(dataset: Dataset, path: str | Path) -> Path:
    """Record ``dataset``'s splits as an age split file (ages in years), atomically; returns the path."""
    values = rank_values(dataset.classnames)
    data = {
        name: [[p, int(values[label])] for p, label in zip(split.paths, split.labels)]
        for name, split in dataset.splits.items()
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, separators=(",", ":")) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_age_split_file(path: str | Path, *, min_age: int = MIN_AGE, max_age: int = MAX_AGE) -> dict[str, Split]:
    """Read ``{"train": [[relpath, age], ...], ...}`` (CoOp's ``[relpath, label, classname]`` with a numeric
    class name is read too: the age is the class name). Errors name the file and the entry."""
    path = Path(path)
    _check_range(min_age, max_age)
    if not path.is_file():
        raise MissingFileError(f"age split file {path} not found; pass an existing split file or leave it out")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"), parse_float=str)  # ages as written: 1e1 stays "1e1"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"age split file {path} is not readable JSON ({exc})") from exc
    if not isinstance(raw, dict) or not raw or set(raw) - set(SPLITS):
        raise DatasetError(f"age split file {path}: expected an object with keys among train/val/test")
    splits: dict[str, Split] = {}
    for name in SPLITS:
        items = raw.get(name, [])
        if not isinstance(items, list):
            raise DatasetError(f"age split file {path}: {name!r} must be a list of [relpath, age]")
        paths, labels = [], []
        for i, entry in enumerate(items):
            where = f"age split file {path}, {name}[{i}]"
            if not isinstance(entry, list) or len(entry) not in (2, 3) or not isinstance(entry[0], str) or not entry[0]:
                raise DatasetError(f"{where}: {json.dumps(entry)[:80]} is not [relpath, age]")
            age = parse_age(entry[-1], min_age=min_age, max_age=max_age, where=where)
            paths.append(entry[0])
            labels.append(age - min_age)
        splits[name] = Split(tuple(paths), tuple(labels))
    return splits


# ---------------------------------------------------------------- UTKFace
def build_utkface(
    data_root: Path,
    *,
    split_file: str | Path | None = None,
    record_split: str | Path | None = None,
    val_ratio: float = 0.2,
    test_ratio: float = 0.3,
    seed: int = 0,
    min_age: int = MIN_AGE,
    max_age: int = MAX_AGE,
    template: str = AGE_TEMPLATE,
    check_files: bool = True,
) -> Dataset:
    """UTKFace under ``$DATA/utkface/images/`` (``data_root`` = ``$DATA``); age from ``AGE_GENDER_RACE_DATE...jpg``.

    Without ``split_file`` the images are split per age at random (``seed``) by the ratios; ``record_split`` writes
    that split as an age split file (give it back as ``split_file`` to pin the split). Paths are relative to the
    images folder.
    """
    _check_range(min_age, max_age)
    root = Path(data_root) / "utkface" / "images"
    if not root.is_dir():
        raise MissingFileError(f"UTKFace images folder {root} not found; put the faces under $DATA/utkface/images/")
    if split_file is not None:
        splits = read_age_split_file(split_file, min_age=min_age, max_age=max_age)
        source = str(split_file)
    else:
        paths = list_images(root, recursive=False)
        if not paths:
            raise DatasetError(f"UTKFace images folder {root} holds no images")
        ages = []
        for path in paths:
            match = _UTK_NAME.match(path)
            where = f"UTKFace file {root / path}"
            if match is None:
                raise DatasetError(f"{where}: name is not AGE_GENDER_RACE_DATE.jpg.chip.jpg; rename or remove it")
            ages.append(parse_age(match.group(1), min_age=min_age, max_age=max_age, where=where))
        splits = _split_by_age(paths, ages, min_age, max_age, val_ratio=val_ratio, test_ratio=test_ratio, seed=seed)
        source = f"{root} (split stratified by age, seed {seed}, val {val_ratio}, test {test_ratio})"
    dataset = _dataset("utkface", root, splits, min_age=min_age, max_age=max_age, template=template, source=source,
                       check_files=check_files)
    if record_split is not None:
        logger.info("UTKFace split recorded in %s", write_age_split_file(dataset, record_split))
    return dataset


# ---------------------------------------------------------------- MORPH (OrdinalCLIP data lists)
def read_age_list(path: Path, *, min_age: int, max_age: int) -> tuple[list[str], list[int]]:
    """An OrdinalCLIP data list: ``relpath age [age ...]`` per line (several ages: the middle one, as its eval)."""
    if not path.is_file():
        raise MissingFileError(f"data list {path} not found; expected OrdinalCLIP's 'relpath age' lines")
    paths: list[str] = []
    ages: list[int] = []
    text = read_text(path, what="data list", fix="save it as UTF-8 text, 'relpath age' per line", error=DatasetError)
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"data list {path}, line {lineno}"
        if "\0" in line:
            raise DatasetError(f"{where}: holds a NUL byte, which no file name can hold; fix the line")
        if len(fields) < 2:
            raise DatasetError(f"{where}: {line.strip()[:60]!r} has no age; expected 'relpath age'")
        values = fields[1:]
        paths.append(fields[0])
        ages.append(parse_age(values[len(values) // 2], min_age=min_age, max_age=max_age, where=where))
    if not paths:
        raise DatasetError(f"data list {path} lists no images")
    return paths, ages


def build_morph(
    data_root: Path,
    *,
    train_list: str | Path | None = None,
    val_list: str | Path | None = None,
    test_list: str | Path | None = None,
    image_root: str | Path | None = None,
    min_age: int = MIN_AGE,
    max_age: int = MAX_AGE,
    template: str = AGE_TEMPLATE,
    check_files: bool = True,
) -> Dataset:
    """MORPH Album2 in OrdinalCLIP's layout: ``$DATA/MORPH/data_list/ET_proto_{train,val}.txt``.

    Lists default to that layout; ``image_root`` defaults to ``$DATA/MORPH``. Without ``test_list`` the val list is
    the test list too, as in OrdinalCLIP (recorded in ``source``); without ``val_list`` the default val list is used.
    """
    _check_range(min_age, max_age)
    base = Path(data_root) / "MORPH"
    lists = base / "data_list"
    root = Path(image_root).expanduser() if image_root is not None else base
    train_path = Path(train_list) if train_list is not None else lists / MORPH_TRAIN_LIST
    val_path = Path(val_list) if val_list is not None else lists / MORPH_VAL_LIST
    test_path = Path(test_list) if test_list is not None else val_path
    splits = {}
    for name, path in (("train", train_path), ("val", val_path), ("test", test_path)):
        paths, ages = read_age_list(path, min_age=min_age, max_age=max_age)
        splits[name] = Split(tuple(paths), tuple(a - min_age for a in ages))
    source = f"train {train_path}, val {val_path}, test {test_path}"
    if test_path == val_path:
        source += " (val list doubles as test, as in OrdinalCLIP: selection on the test set)"
        logger.warning("MORPH: the val list %s is also the test list (OrdinalCLIP's protocol); pass test_list to "
                       "keep them apart", val_path)
    return _dataset("morph", root, splits, min_age=min_age, max_age=max_age, template=template, source=source,
                    check_files=check_files)


# ---------------------------------------------------------------- numeric manifests
def build_age_manifest(
    data_root: Path,
    *,
    path_column: str = "path",
    label_column: str = "age",
    split_column: str = "split",
    val_ratio: float = 0.2,
    test_ratio: float = 0.3,
    seed: int = 0,
    min_age: int = MIN_AGE,
    max_age: int = MAX_AGE,
    template: str = AGE_TEMPLATE,
    check_files: bool = True,
) -> Dataset:
    """A CSV/TSV/JSON/JSONL manifest (as ``manifest``) whose label column is an age; paths relative to its folder.

    With a ``split`` column the rows keep their split; without one, a seeded split stratified by age is drawn.
    """
    from coopipe.datasets.manifest import (  # the manifest reader, shared
        _SPLIT_ALIASES,
        _read_rows,
    )

    _check_range(min_age, max_age)
    manifest = Path(data_root)
    if not manifest.is_file():
        raise MissingFileError(f"manifest {manifest} not found; pass a .csv, .tsv, .json or .jsonl manifest file")
    rows, _ = _read_rows(manifest, path_column, label_column)
    if not rows:
        raise DatasetError(f"manifest {manifest} lists no images; add rows with {path_column} and {label_column}")
    has_split = any(row.get(split_column) not in (None, "") for _, row in rows)
    paths, ages, split_of = [], [], []
    for where, row in rows:
        place = f"manifest {manifest}, {where}"
        path = row.get(path_column)
        if not isinstance(path, str) or not path.strip():
            raise DatasetError(f"{place}: missing or empty {path_column!r}; every row needs a path")
        paths.append(path.strip())
        ages.append(parse_age(row.get(label_column), min_age=min_age, max_age=max_age, where=place))
        if has_split:
            value = row.get(split_column)
            key = _SPLIT_ALIASES.get(str(value).strip().lower()) if value not in (None, "") else None
            if key is None:
                raise DatasetError(f"{place}: {split_column} {value!r} is not one of train/val/test")
            split_of.append(key)
    if has_split:
        splits = {
            name: Split(tuple(p for p, s in zip(paths, split_of) if s == name),
                        tuple(a - min_age for a, s in zip(ages, split_of) if s == name))
            for name in SPLITS
        }
    else:
        splits = _split_by_age(paths, ages, min_age, max_age, val_ratio=val_ratio, test_ratio=test_ratio, seed=seed)
    return _dataset(f"agemanifest-{safe_name(manifest.stem)}", manifest.parent, splits, min_age=min_age,
                    max_age=max_age, template=template, source=str(manifest), check_files=check_files)

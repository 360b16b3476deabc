"""A generic image folder: one sub-folder per class, split by a seeded stratified ratio or a CoOp split file."""

from __future__ import annotations

import logging
from pathlib import Path

from coopipe.datasets.base import Dataset
from coopipe.datasets.common import (
    DEFAULT_TEMPLATE,
    check_files_exist,
    check_template,
    list_images,
    list_subfolders,
    read_split_file,
    readable_classname,
    safe_name,
    shown,
    split_stratified,
)
from coopipe.errors import DatasetError, MissingFileError

logger = logging.getLogger(__name__)



def build_image_folder(
    data_root: Path,
    *,
    val_ratio: float = 0.2,
    test_ratio: float = 0.3,
    seed: int = 0,
    split_file: str | Path | None = None,
    template: str = DEFAULT_TEMPLATE,
    check_files: bool = True,
) -> Dataset:
    """``data_root/<class>/**/<image>``: class names from the folder names (underscores become spaces).

    Without ``split_file``, each class is split at random (``numpy`` generator seeded with ``seed``) into
    train/val/test by ``val_ratio`` and ``test_ratio`` (the rest is train; every class keeps a train image).
    With ``split_file`` (CoOp's format, paths relative to ``data_root``), the file defines classes and splits.
    The dataset is named ``imagefolder-<folder name>``.
    """
    root = data_root
    if not root.is_dir():
        raise MissingFileError(f"image folder {root} not found; pass a folder holding one sub-folder per class")
    check_template(template)
    name = f"imagefolder-{safe_name(root.resolve().name)}"
    if split_file is not None:
        path = Path(split_file).expanduser()
        classnames, splits = read_split_file(path, missing_fix="pass an existing CoOp-format split file")
        if check_files:
            check_files_exist(
                root, splits, source=str(path), fix=f"split-file paths must be relative to {root}; fix them"
            )
        return Dataset(
            name, root, tuple(readable_classname(c) for c in classnames), template, splits, source=str(path)
        )
    folders = list_subfolders(root)
    if not folders:
        raise DatasetError(f"image folder {root} has no class sub-folders; expected {root}/<class name>/<image>")
    images = [[f"{folder}/{image}" for image in list_images(root / folder)] for folder in folders]
    empty = [folder for folder, found in zip(folders, images) if not found]
    if empty:
        raise DatasetError(
            f"empty classes: sub-folders {shown(empty)} of {root} hold no images (.jpg, .png, ...); "
            f"add images or remove the folders"
        )
    splits = split_stratified(images, val_ratio=val_ratio, test_ratio=test_ratio, seed=seed)
    classnames = tuple(readable_classname(folder) for folder in folders)
    if len(set(classnames)) != len(classnames):
        raise DatasetError(f"class sub-folders of {root} give duplicate class names; rename the folders")
    logger.debug("image folder %s: %d classes, %s", root, len(folders), {k: len(v) for k, v in splits.items()})
    return Dataset(name, root, classnames, template, splits, source=str(root))

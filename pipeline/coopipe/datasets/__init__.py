"""Dataset adapters: image paths, labels, readable class names and zero-shot prompts.

Build datasets through :func:`load_dataset` (or a registry from :func:`default_registry`); sample the CoOp
few-shot subsets with :func:`make_few_shot_index` / :func:`sample_few_shot`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from coopipe.datasets.ages import (
    AGE_TEMPLATE,
    build_age_manifest,
    build_morph,
    build_utkface,
    rank_values,
    read_age_split_file,
    write_age_split_file,
)
from coopipe.datasets.base import SPLITS, Dataset, DatasetInfo, DatasetRegistry, Split
from coopipe.datasets.common import read_split_file
from coopipe.datasets.coop import COOP_SPECS, coop_builder
from coopipe.datasets.fewshot import (
    VAL_MAX_SHOTS,
    FewShotIndex,
    few_shot_union,
    make_few_shot_index,
    sample_few_shot,
    sample_val,
)
from coopipe.datasets.folder import build_image_folder
from coopipe.datasets.manifest import build_manifest

__all__ = [
    "AGE_TEMPLATE",
    "SPLITS",
    "VAL_MAX_SHOTS",
    "Dataset",
    "DatasetInfo",
    "DatasetRegistry",
    "FewShotIndex",
    "Split",
    "default_registry",
    "few_shot_union",
    "is_age_dataset",
    "load_dataset",
    "make_few_shot_index",
    "rank_values",
    "read_age_split_file",
    "read_split_file",
    "sample_few_shot",
    "sample_val",
    "write_age_split_file",
]


def default_registry() -> DatasetRegistry:
    """CoOp's 15 datasets, ``imagefolder``, ``manifest`` and the age datasets ``utkface``, ``morph``, ``agemanifest``."""
    registry = DatasetRegistry()
    for spec in COOP_SPECS:
        registry.register(
            spec.name,
            coop_builder(spec),
            f"{spec.description}; $DATA/{spec.folder}/",
            aliases=(spec.coop_name, *spec.aliases),
        )
    registry.register(
        "imagefolder",
        build_image_folder,
        "one sub-folder per class (data root = that folder); seeded stratified split or a CoOp split file",
        aliases=("image_folder", "folder"),
    )
    registry.register(
        "manifest",
        build_manifest,
        "CSV/JSON manifest with path, label[, split] columns (data root = the manifest file)",
    )
    registry.register(
        "utkface",
        build_utkface,
        "UTKFace faces, age from the file name (ranks 0..100); $DATA/utkface/images/; seeded age-stratified split",
        label_kind="ordinal",
    )
    registry.register(
        "morph",
        build_morph,
        "MORPH Album2 in OrdinalCLIP's lists: $DATA/MORPH/data_list/ET_proto_{train,val}.txt (val doubles as test)",
        aliases=("morph2", "morph_album2"),
        label_kind="ordinal",
    )
    registry.register(
        "agemanifest",
        build_age_manifest,
        "CSV/JSON manifest with path, age[, split] columns (data root = the manifest file); ranks 0..100",
        aliases=("age_manifest", "age-manifest"),
        label_kind="ordinal",
    )
    return registry


def load_dataset(name: str, data_root: str | Path, **options: Any) -> Dataset:
    """Build dataset ``name`` (any case, or a CoOp alias such as ``EuroSAT``) from ``data_root``.

    For CoOp datasets ``data_root`` is CoOp's ``$DATA`` folder; for ``imagefolder`` the folder of class
    sub-folders; for ``manifest`` the manifest file. Unknown names raise :class:`UnknownDatasetError`.
    """
    return default_registry().build(name, data_root, **options)


def is_age_dataset(dataset: Dataset | str) -> bool:
    """Whether ``dataset`` has ordinal labels (ages): such datasets take the age few-shot rule and the age metrics.
    A :class:`Dataset` says so itself; a dataset name (what a store's provenance or a run record carries) is
    answered by the adapter that builds it (:meth:`DatasetRegistry.label_kind`)."""
    kind = default_registry().label_kind(dataset) if isinstance(dataset, str) else dataset.label_kind
    return kind == "ordinal"

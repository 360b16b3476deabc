"""CoOp's 11 benchmark datasets and the 4 ImageNet variants, read from CoOp's ``$DATA/<folder>/`` layout.

Folder names, split files and class-name rules follow CoOp's ``datasets/*.py``:

- split-file datasets: ``$DATA/<folder>/split_zhou_<Name>.json`` with paths relative to the image folder;
- FGVCAircraft: ``$DATA/fgvc_aircraft/`` holding the archive's ``data/`` content (``images/``, ``variants.txt``,
  ``images_variant_{train,val,test}.txt``); a ``fgvc_aircraft/data/`` sub-folder is accepted too;
- ImageNet: ``$DATA/imagenet/images/{train,val}/<wnid>/`` plus ``imagenet/classnames.txt``
  (``<wnid> <class name>`` per line); labels follow the sorted wnid folders; val and test are both ``val/``;
- the variants are test-only and take their class names from their own ``classnames.txt`` if present, else from
  ``$DATA/imagenet/classnames.txt``. ImageNet-A and -R use the 200 wnid folders present, labelled in sorted order.

Class names come out as CoOp prompts them (underscores become spaces, e.g. UCF101's ``Apply_Eye_Makeup``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coopipe.datasets.base import Dataset, Split
from coopipe.datasets.common import (
    check_files_exist,
    list_images,
    list_subfolders,
    read_split_file,
    readable_classname,
    shown,
)
from coopipe.errors import DatasetError, MissingFileError
from coopipe.json_records import read_text

logger = logging.getLogger(__name__)

_COOP_DATA_DOC = "see CoOp's DATASETS.md for the expected $DATA layout"


@dataclass(frozen=True)
class CoopSpec:
    """One CoOp dataset: registry name, CoOp's class name, folders and prompt."""

    name: str  # registry name, also Dataset.name
    coop_name: str  # CoOp's class name, accepted as an alias
    folder: str  # $DATA/<folder>
    image_dir: str  # image folder inside <folder> ("" = the folder itself)
    split_file: str | None  # split_zhou_*.json inside <folder>, None for non-split-file datasets
    template: str
    description: str
    aliases: tuple[str, ...] = ()


PHOTO = "a photo of a {}."

COOP_SPECS: tuple[CoopSpec, ...] = (
    CoopSpec("imagenet", "ImageNet", "imagenet", "images", None, PHOTO, "ImageNet-1k (CoOp layout; test = val)"),
    CoopSpec(
        "caltech101", "Caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", PHOTO,
        "Caltech101, CoOp's split",
    ),
    CoopSpec(
        "oxford_pets", "OxfordPets", "oxford_pets", "images", "split_zhou_OxfordPets.json",
        "a photo of a {}, a type of pet.", "Oxford-IIIT Pets, CoOp's split",
    ),
    CoopSpec(
        "stanford_cars", "StanfordCars", "stanford_cars", "", "split_zhou_StanfordCars.json", PHOTO,
        "Stanford Cars, CoOp's split",
    ),
    CoopSpec(
        "oxford_flowers", "OxfordFlowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
        "a photo of a {}, a type of flower.", "Oxford Flowers102, CoOp's split", aliases=("Flowers102",),
    ),
    CoopSpec(
        "food101", "Food101", "food-101", "images", "split_zhou_Food101.json", "a photo of {}, a type of food.",
        "Food-101, CoOp's split",
    ),
    CoopSpec(
        "fgvc_aircraft", "FGVCAircraft", "fgvc_aircraft", "images", None, "a photo of a {}, a type of aircraft.",
        "FGVC-Aircraft variants (the dataset's own train/val/test lists)",
    ),
    CoopSpec("sun397", "SUN397", "sun397", "SUN397", "split_zhou_SUN397.json", PHOTO, "SUN397, CoOp's split"),
    CoopSpec(
        "dtd", "DescribableTextures", "dtd", "images", "split_zhou_DescribableTextures.json", "{} texture.",
        "Describable Textures (DTD), CoOp's split", aliases=("DTD",),
    ),
    CoopSpec(
        "eurosat", "EuroSAT", "eurosat", "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {}.",
        "EuroSAT RGB, CoOp's split",
    ),
    CoopSpec(
        "ucf101", "UCF101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
        "a photo of a person doing {}.", "UCF101 middle frames, CoOp's split",
    ),
    CoopSpec(
        "imagenetv2", "ImageNetV2", "imagenetv2", "imagenetv2-matched-frequency-format-val", None, PHOTO,
        "ImageNetV2 matched-frequency (test only)",
    ),
    CoopSpec(
        "imagenet_sketch", "ImageNetSketch", "imagenet-sketch", "images", None, PHOTO,
        "ImageNet-Sketch (test only)", aliases=("imagenet-sketch",),
    ),
    CoopSpec(
        "imagenet_a", "ImageNetA", "imagenet-adversarial", "imagenet-a", None, PHOTO,
        "ImageNet-A, 200 classes (test only)", aliases=("imagenet-a",),
    ),
    CoopSpec(
        "imagenet_r", "ImageNetR", "imagenet-rendition", "imagenet-r", None, PHOTO,
        "ImageNet-R, 200 classes (test only)", aliases=("imagenet-r",),
    ),
)
COOP_SPECS_BY_NAME = {spec.name: spec for spec in COOP_SPECS}


def build_split_file_dataset(
    spec: CoopSpec, data_root: Path, *, split_file: str | Path | None = None, check_files: bool = True
) -> Dataset:
    """A dataset described by a CoOp ``split_zhou_*.json`` file (``split_file`` overrides its location)."""
    assert spec.split_file is not None  # programming error, not user input
    folder = data_root / spec.folder
    if not folder.is_dir() and (data_root / spec.split_file).is_file():
        folder = data_root  # given the dataset's own folder ($DATA/<folder>) instead of $DATA
    image_root = folder / spec.image_dir if spec.image_dir else folder
    path = Path(split_file).expanduser() if split_file is not None else folder / spec.split_file
    classnames, splits = read_split_file(
        path,
        missing_fix=(
            f"put CoOp's {spec.split_file} into {folder} (the data root should hold {spec.folder}/; "
            f"{_COOP_DATA_DOC})"
        ),
    )
    if check_files:
        check_files_exist(
            image_root,
            splits,
            source=str(path),
            fix=f"extract the {spec.coop_name} images into {image_root} ({_COOP_DATA_DOC})",
        )
    return Dataset(
        name=spec.name,
        image_root=image_root,
        classnames=tuple(readable_classname(c) for c in classnames),
        template=spec.template,
        splits=splits,
        source=str(path),
    )


def build_fgvc_aircraft(data_root: Path, *, check_files: bool = True) -> Dataset:
    """FGVC-Aircraft from the archive's own lists: ``variants.txt`` and ``images_variant_<split>.txt``."""
    spec = COOP_SPECS_BY_NAME["fgvc_aircraft"]
    folder = data_root / spec.folder
    if not (folder / "variants.txt").is_file() and (folder / "data" / "variants.txt").is_file():
        folder = folder / "data"  # the archive's data/ folder kept as is
    variants = folder / "variants.txt"
    fix = f"extract the data/ folder of fgvc-aircraft-2013b.tar.gz as {data_root / spec.folder} ({_COOP_DATA_DOC})"
    classnames = [line.strip() for line in _read_lines(variants, fix=fix) if line.strip()]
    if not classnames:
        raise DatasetError(f"{variants} lists no variants; {fix}")
    label_of = {name: i for i, name in enumerate(classnames)}
    splits: dict[str, Split] = {}
    for split_name in ("train", "val", "test"):
        list_file = folder / f"images_variant_{split_name}.txt"
        paths: list[str] = []
        labels: list[int] = []
        for lineno, line in enumerate(_read_lines(list_file, fix=fix), start=1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in label_of:
                raise DatasetError(
                    f"{list_file}:{lineno}: variant {variant!r} is not in {variants}; expected lines "
                    f"'<image id> <variant>' with variants from variants.txt"
                )
            paths.append(image_id + ".jpg")
            labels.append(label_of[variant])
        splits[split_name] = Split(tuple(paths), tuple(labels))
    _check_no_empty_classes(classnames, splits, source=str(folder / "images_variant_*.txt"))
    image_root = folder / spec.image_dir
    if check_files:
        check_files_exist(image_root, splits, source=str(folder / "images_variant_*.txt"), fix=fix)
    return Dataset(spec.name, image_root, tuple(classnames), spec.template, splits, source=str(folder))


def build_imagenet(data_root: Path, *, check_files: bool = True) -> Dataset:
    """ImageNet in CoOp's layout; ``check_files`` is accepted for symmetry (files come from listing)."""
    spec = COOP_SPECS_BY_NAME["imagenet"]
    folder = data_root / spec.folder
    image_root = folder / spec.image_dir
    names_file, wnid_names = read_imagenet_classnames([folder / "classnames.txt"])
    wnids: list[str] | None = None
    lists: dict[str, Split] = {}
    for sub in ("train", "val"):
        sub_root = image_root / sub
        if not sub_root.is_dir():
            raise MissingFileError(
                f"ImageNet folder {sub_root} not found; put the {sub} images in {image_root}/{sub}/<wnid>/ "
                f"({_COOP_DATA_DOC})"
            )
        folders = list_subfolders(sub_root)
        if wnids is None:
            wnids = folders
        elif folders != wnids:
            diff = sorted(set(folders) ^ set(wnids))
            raise DatasetError(
                f"ImageNet train/ and val/ under {image_root} hold different class folders ({shown(diff)}); "
                f"both need the same wnid folders"
            )
        lists[sub] = _split_from_class_folders(sub_root, folders, prefix=f"{sub}/")
    assert wnids is not None
    classnames = _names_for_wnids(wnids, wnid_names, source=names_file)
    splits = {"train": lists["train"], "val": lists["val"], "test": lists["val"]}
    return Dataset(spec.name, image_root, classnames, spec.template, splits, source=str(folder))


def build_imagenet_variant(spec: CoopSpec, data_root: Path, *, check_files: bool = True) -> Dataset:
    """ImageNetV2 (folders ``0``..``999``), -Sketch, -A, -R (wnid folders): test-only datasets."""
    folder = data_root / spec.folder
    image_root = folder / spec.image_dir
    candidates = [folder / "classnames.txt", data_root / "imagenet" / "classnames.txt"]
    names_file, wnid_names = read_imagenet_classnames(candidates)
    if not image_root.is_dir():
        raise MissingFileError(
            f"{spec.coop_name} image folder {image_root} not found; extract the images there ({_COOP_DATA_DOC})"
        )
    folders = list_subfolders(image_root)
    if spec.name == "imagenetv2":
        count = len(wnid_names)
        want = [str(label) for label in range(count)]
        absent = sorted(set(want) - set(folders), key=int)
        if absent:
            raise DatasetError(
                f"ImageNetV2 folder {image_root} lacks class folders {shown(absent)}; it needs folders 0..{count - 1} "
                f"(the imagenetv2-matched-frequency-format-val archive)"
            )
        test = _split_from_class_folders(image_root, want, prefix="")
        classnames = tuple(readable_classname(n) for n in wnid_names.values())
    else:
        if not folders:
            raise DatasetError(f"{spec.coop_name} folder {image_root} has no class folders; {_COOP_DATA_DOC}")
        test = _split_from_class_folders(image_root, folders, prefix="")
        classnames = _names_for_wnids(folders, wnid_names, source=names_file)
    return Dataset(spec.name, image_root, classnames, spec.template, {"test": test}, source=str(folder))


def read_imagenet_classnames(candidates: list[Path]) -> tuple[Path, dict[str, str]]:
    """The first existing ``classnames.txt`` and its ``wnid -> class name`` map (``<wnid> <name>`` lines, in order)."""
    for path in candidates:
        if path.is_file():
            break
    else:
        raise MissingFileError(
            f"ImageNet class-name file not found (looked for {', '.join(map(str, candidates))}); put CoOp's "
            f"classnames.txt ('<wnid> <class name>' per line) there ({_COOP_DATA_DOC})"
        )
    names: dict[str, str] = {}
    for lineno, line in enumerate(_read_lines(path, fix="check the file"), start=1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not name.strip():
            raise DatasetError(f"{path}:{lineno}: expected '<wnid> <class name>', got {line.strip()!r}")
        names[wnid] = name.strip()
    if not names:
        raise DatasetError(f"{path} lists no classes; expected '<wnid> <class name>' per line")
    return path, names


def _names_for_wnids(wnids: list[str], wnid_names: dict[str, str], *, source: Path) -> tuple[str, ...]:
    unknown = [w for w in wnids if w not in wnid_names]
    if unknown:
        raise DatasetError(
            f"class folders {shown(unknown)} are not listed in {source}; use CoOp's ImageNet classnames.txt"
        )
    return tuple(readable_classname(wnid_names[w]) for w in wnids)


def _split_from_class_folders(root: Path, folders: list[str], *, prefix: str) -> Split:
    """Label = position in ``folders``; an empty folder is an error (empty class)."""
    paths: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    for label, name in enumerate(folders):
        images = list_images(root / name, recursive=False)
        if not images:
            empty.append(name)
        paths.extend(f"{prefix}{name}/{image}" for image in images)
        labels.extend([label] * len(images))
    if empty:
        raise DatasetError(f"empty classes: folders {shown(empty)} under {root} hold no images; add or remove them")
    return Split(tuple(paths), tuple(labels))


def _check_no_empty_classes(classnames: list[str], splits: dict[str, Split], *, source: str) -> None:
    used = {label for split in splits.values() for label in split.labels}
    empty = [classnames[i] for i in range(len(classnames)) if i not in used]
    if empty:
        raise DatasetError(f"empty classes: {shown(empty)} have no images in {source}")


def _read_lines(path: Path, *, fix: str) -> list[str]:
    """The lines of a text split or class list; a NUL byte (no file or class name holds one) is one line naming it."""
    lines = read_text(path, what="file", fix=fix, error=DatasetError).splitlines()
    bad = next((n for n, line in enumerate(lines, start=1) if "\0" in line), None)
    if bad is not None:
        raise DatasetError(f"{path}, line {bad}: holds a NUL byte, which no file or class name can hold; {fix}")
    return lines


def coop_builder(spec: CoopSpec) -> Callable[..., Dataset]:
    """The registry builder ``(data_root, **options) -> Dataset`` for one CoOp dataset."""
    if spec.name == "imagenet":
        return build_imagenet
    if spec.name == "fgvc_aircraft":
        return build_fgvc_aircraft
    if spec.split_file is not None:

        def build_from_split(
            data_root: Path, *, split_file: str | Path | None = None, check_files: bool = True
        ) -> Dataset:
            return build_split_file_dataset(spec, data_root, split_file=split_file, check_files=check_files)

        build_from_split.__doc__ = f"{spec.description}: $DATA/{spec.folder}/{spec.split_file}"
        return build_from_split

    def build_variant(data_root: Path, *, check_files: bool = True) -> Dataset:
        return build_imagenet_variant(spec, data_root, check_files=check_files)

    build_variant.__doc__ = f"{spec.description}: $DATA/{spec.folder}/{spec.image_dir}/"
    return build_variant

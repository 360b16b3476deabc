"""Dataset adapters, the registry and few-shot sampling: real EuroSAT data plus tiny temporary datasets."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coopipe.datasets import (
    Dataset,
    DatasetRegistry,
    FewShotIndex,
    default_registry,
    few_shot_union,
    load_dataset,
    make_few_shot_index,
    read_split_file,
    sample_few_shot,
    sample_val,
)
from coopipe.errors import DatasetError, MissingFileError, UnknownDatasetError

EUROSAT_NAMES = (
    "Annual Crop Land",
    "Forest",
    "Herbaceous Vegetation Land",
    "Highway or Road",
    "Industrial Buildings",
    "Pasture Land",
    "Permanent Crop Land",
    "Residential Buildings",
    "River",
    "Sea or Lake",
)

# ---------------------------------------------------------------------------------------------- helpers


def write_image(path: Path, value: int = 0, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (value % 256, 40, 90)).save(path, format=fmt)
    return path


def make_class_folders(root: Path, counts: dict[str, int]) -> Path:
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            write_image(root / name / f"img_{i:02d}.{'png' if i % 2 else 'jpg'}", 10 * c + i)
    return root


def make_coop_eurosat(data_root: Path, entries: dict[str, list[list]], *, images: bool = True) -> Path:
    """A tiny CoOp-layout EuroSAT: ``data_root/eurosat/2750/...`` and its split file."""
    folder = data_root / "eurosat"
    folder.mkdir(parents=True, exist_ok=True)
    if images:
        for items in entries.values():
            for relpath, label, _ in items:
                write_image(folder / "2750" / relpath, label)
    (folder / "split_zhou_EuroSAT.json").write_text(json.dumps(entries))
    return folder / "split_zhou_EuroSAT.json"


def tiny_split(n: int = 3) -> dict[str, list[list]]:
    names = [("AnnualCrop", "Annual Crop Land"), ("SeaLake", "Sea or Lake")]
    return {
        split: [
            [f"{d}/{d}_{split}{i}.jpg", label, name] for label, (d, name) in enumerate(names) for i in range(n)
        ]
        for split in ("train", "val", "test")
    }


def per_class_counts(dataset: Dataset, split: str, indices: np.ndarray) -> np.ndarray:
    labels = np.asarray(dataset.split(split).labels)[indices]
    return np.bincount(labels, minlength=dataset.num_classes)


# -------------------------------------------------------------------------------------- real EuroSAT data


@pytest.fixture(scope="module")
def eurosat(eurosat_root: Path) -> Dataset:
    return load_dataset("eurosat", eurosat_root)


@pytest.mark.data
def test_eurosat_splits_names_and_prompt(eurosat: Dataset, eurosat_root: Path) -> None:
    assert eurosat.name == "eurosat"
    assert {k: len(v) for k, v in eurosat.splits.items()} == {"train": 13500, "val": 5400, "test": 8100}
    assert eurosat.classnames == EUROSAT_NAMES
    assert eurosat.template == "a centered satellite photo of {}."
    assert eurosat.prompts()[0] == "a centered satellite photo of Annual Crop Land."
    assert eurosat.image_root == eurosat_root / "eurosat" / "2750"
    assert (eurosat.image_root / eurosat.split("train").paths[0]).is_file()
    assert set(eurosat.split("test").labels) == set(range(10))


@pytest.mark.data
def test_eurosat_builds_fast_with_file_check_and_aliases(eurosat_root: Path, eurosat: Dataset) -> None:
    start = time.perf_counter()
    again = load_dataset("EuroSAT", eurosat_root)  # CoOp's name, checks all 27,000 files
    assert time.perf_counter() - start < 3.0
    assert again.file_list_hash("train") == eurosat.file_list_hash("train")
    # the dataset's own folder works as the data root too
    assert len(load_dataset("eurosat", eurosat_root / "eurosat").split("val")) == 5400


@pytest.mark.data
def test_eurosat_few_shot_protocol(eurosat: Dataset) -> None:
    for shots in (1, 2, 4, 8, 16):
        index = make_few_shot_index(eurosat, shots, seed=1)
        assert (per_class_counts(eurosat, "train", index.train_array()) == shots).all()
        assert (per_class_counts(eurosat, "val", index.val_array()) == min(shots, 4)).all()
        assert index.val_shots == min(shots, 4)
    a, b, c = (make_few_shot_index(eurosat, 16, seed=s) for s in (1, 1, 2))
    assert a == b
    assert a.train_indices != c.train_indices and a.val_indices != c.val_indices
    assert list(a.train_indices) == sorted(set(a.train_indices))


@pytest.mark.data
def test_eurosat_index_file_round_trip(eurosat: Dataset, tmp_path: Path) -> None:
    index = make_few_shot_index(eurosat, 4, seed=3)
    path = index.save(tmp_path / "sub" / index.default_filename())
    assert path.name == "eurosat-shots4-seed3.json"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    raw = json.loads(path.read_text())
    assert raw["dataset"] == "eurosat" and raw["shots"] == 4 and raw["seed"] == 3
    assert raw["split_hashes"] == {"train": eurosat.file_list_hash("train"), "val": eurosat.file_list_hash("val")}
    loaded = FewShotIndex.load(path)
    assert loaded == index
    loaded.check_dataset(eurosat, source=str(path))


@pytest.mark.data
def test_eurosat_few_shot_union(eurosat: Dataset) -> None:
    union = few_shot_union(eurosat, [1, 2, 4], seeds=[1, 2, 3])
    expected = set()
    for shots in (1, 2, 4):
        for seed in (1, 2, 3):
            expected |= set(make_few_shot_index(eurosat, shots, seed).train_indices)
    assert union.tolist() == sorted(expected)
    assert union.dtype == np.int64


@pytest.mark.data
@pytest.mark.parametrize(
    ("name", "split_name", "num_classes", "sizes"),
    [
        ("Caltech101", "Caltech101", 100, (4128, 1649, 2465)),
        ("dtd", "DescribableTextures", 47, (2820, 1128, 1692)),
        ("OxfordFlowers", "OxfordFlowers", 102, (4093, 1633, 2463)),
        ("OxfordPets", "OxfordPets", 37, (2944, 736, 3669)),
        ("StanfordCars", "StanfordCars", 196, (6509, 1635, 8041)),
        ("UCF101", "UCF101", 101, (7639, 1898, 3783)),
        ("eurosat", "EuroSAT", 10, (13500, 5400, 8100)),
    ],
)
def test_coop_split_files_parse(
    shared_data: Path, tmp_path: Path, name: str, split_name: str, num_classes: int, sizes: tuple[int, int, int]
) -> None:
    split_file = shared_data / "splits" / f"split_zhou_{split_name}.json"
    dataset = load_dataset(name, tmp_path, split_file=split_file, check_files=False)
    assert dataset.num_classes == num_classes
    assert tuple(len(dataset.split(s)) for s in ("train", "val", "test")) == sizes
    assert all("_" not in c for c in dataset.classnames)  # CoOp prompts UCF101's Apply_Eye_Makeup as words
    # and without check_files=False the missing images are reported
    with pytest.raises(MissingFileError, match="extract"):
        load_dataset(name, tmp_path, split_file=split_file)


@pytest.mark.data
def test_coop_prompts(shared_data: Path, tmp_path: Path) -> None:
    split = shared_data / "splits"
    ucf = load_dataset("ucf101", tmp_path, split_file=split / "split_zhou_UCF101.json", check_files=False)
    assert ucf.prompts()[0] == "a photo of a person doing Apply Eye Makeup."
    dtd = load_dataset("DTD", tmp_path, split_file=split / "split_zhou_DescribableTextures.json", check_files=False)
    assert dtd.prompts()[0] == "banded texture."


# ------------------------------------------------------------------------------------------- registry


def test_registry_names_aliases_and_unknown() -> None:
    registry = default_registry()
    assert registry.names() == [
        "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
        "sun397", "dtd", "eurosat", "ucf101", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r",
        "imagefolder", "manifest", "utkface", "morph", "agemanifest",
    ]  # fmt: skip
    for alias, name in [
        ("EuroSAT", "eurosat"), ("OxfordPets", "oxford_pets"), ("oxfordpets", "oxford_pets"),
        ("StanfordCars", "stanford_cars"), ("OxfordFlowers", "oxford_flowers"), ("Food101", "food101"),
        ("FGVCAircraft", "fgvc_aircraft"), ("SUN397", "sun397"), ("DescribableTextures", "dtd"),
        ("UCF101", "ucf101"), ("ImageNetV2", "imagenetv2"), ("ImageNetSketch", "imagenet_sketch"),
        ("ImageNetA", "imagenet_a"), ("ImageNetR", "imagenet_r"), ("Caltech101", "caltech101"),
        ("ImageNet", "imagenet"),
    ]:  # fmt: skip
        assert registry.resolve(alias) == name
    with pytest.raises(UnknownDatasetError, match=r"unknown dataset 'eurosatt'.*eurosat.*known: imagenet, "):
        load_dataset("eurosatt", "/nowhere")
    with pytest.raises(DatasetError, match="does not take option.*bogus"):
        load_dataset("eurosat", "/nowhere", bogus=1)


def test_templates_from_coop_table() -> None:
    from coopipe.datasets.coop import COOP_SPECS

    templates = {spec.name: spec.template for spec in COOP_SPECS}
    assert templates["fgvc_aircraft"] == "a photo of a {}, a type of aircraft."
    assert templates["dtd"] == "{} texture."
    assert templates["oxford_pets"] == "a photo of a {}, a type of pet."
    assert templates["oxford_flowers"] == "a photo of a {}, a type of flower."
    assert templates["food101"] == "a photo of {}, a type of food."
    assert templates["ucf101"] == "a photo of a person doing {}."
    for name in ("imagenet", "caltech101", "stanford_cars", "sun397", "imagenetv2", "imagenet_sketch",
                 "imagenet_a", "imagenet_r"):
        assert templates[name] == "a photo of a {}."


# ------------------------------------------------------------------------------ CoOp layouts, tiny data


def test_tiny_coop_split_dataset(tmp_path: Path) -> None:
    make_coop_eurosat(tmp_path, tiny_split())
    dataset = load_dataset("eurosat", tmp_path)
    assert dataset.classnames == ("Annual Crop Land", "Sea or Lake")
    assert len(dataset.split("train")) == 6
    assert dataset.split("train").paths[0] == "AnnualCrop/AnnualCrop_train0.jpg"


def test_fgvc_aircraft_layout(tmp_path: Path) -> None:
    for folder in (tmp_path / "fgvc_aircraft", tmp_path / "alt" / "fgvc_aircraft" / "data"):
        folder.mkdir(parents=True)
        (folder / "variants.txt").write_text("707-320\nA300B4\n")
        for split in ("train", "val", "test"):
            lines = [f"{split}{i}{c} {v}" for c, v in enumerate(["707-320", "A300B4"]) for i in range(2)]
            (folder / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
            for line in lines:
                write_image(folder / "images" / f"{line.split()[0]}.jpg")
    for root in (tmp_path, tmp_path / "alt"):
        dataset = load_dataset("FGVCAircraft", root)
        assert dataset.classnames == ("707-320", "A300B4")
        assert dataset.split("test").labels == (0, 0, 1, 1)
        assert dataset.prompts()[1] == "a photo of a A300B4, a type of aircraft."
    (tmp_path / "fgvc_aircraft" / "images" / "val00.jpg").unlink()
    with pytest.raises(MissingFileError, match=r"1 of 12 images .*val00\.jpg"):
        load_dataset("fgvc_aircraft", tmp_path)


@pytest.fixture()
def tiny_imagenet(tmp_path: Path) -> Path:
    wnids = ["n01", "n02", "n03"]
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "classnames.txt").write_text("n01 tench\nn02 goldfish\nn03 great white shark\n")
    for sub in ("train", "val"):
        for w in wnids:
            for i in range(2):
                write_image(tmp_path / "imagenet" / "images" / sub / w / f"{w}_{i}.JPEG", fmt="JPEG")
    for w in ("n01", "n03"):  # ImageNet-A / -R: a subset of the classes
        write_image(tmp_path / "imagenet-adversarial" / "imagenet-a" / w / "a.jpg")
        write_image(tmp_path / "imagenet-rendition" / "imagenet-r" / w / "r.jpg")
    (tmp_path / "imagenet-adversarial" / "imagenet-a" / "README.txt").write_text("ignored")
    for label in range(3):
        write_image(tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / str(label) / "x.jpeg")
    for w in wnids:
        write_image(tmp_path / "imagenet-sketch" / "images" / w / "s.JPEG", fmt="JPEG")
    return tmp_path


def test_imagenet_and_variants(tiny_imagenet: Path) -> None:
    imagenet = load_dataset("imagenet", tiny_imagenet)
    assert imagenet.classnames == ("tench", "goldfish", "great white shark")
    assert imagenet.split("val") == imagenet.split("test")
    assert imagenet.split("train").paths[0] == "train/n01/n01_0.JPEG"
    assert (imagenet.image_root / imagenet.split("test").paths[-1]).is_file()
    for name in ("imagenet_a", "ImageNetR"):
        variant = load_dataset(name, tiny_imagenet)
        assert variant.classnames == ("tench", "great white shark")
        assert list(variant.splits) == ["test"] and variant.split("test").labels == (0, 1)
        assert variant.template == "a photo of a {}."
        with pytest.raises(DatasetError, match="no 'train' split"):
            variant.split("train")
    assert load_dataset("imagenetv2", tiny_imagenet).split("test").labels == (0, 1, 2)
    assert load_dataset("imagenet-sketch", tiny_imagenet).num_classes == 3
    (tiny_imagenet / "imagenet" / "classnames.txt").unlink()
    with pytest.raises(MissingFileError, match="classnames.txt"):
        load_dataset("imagenet_r", tiny_imagenet)


# --------------------------------------------------------------------------------- generic image folder


def test_image_folder_stratified_split(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "My Pets", {"golden_retriever": 10, "tabby_cat": 10, "hamster": 4})
    dataset = load_dataset("imagefolder", root, val_ratio=0.2, test_ratio=0.3, seed=0)
    assert dataset.name == "imagefolder-My-Pets"
    assert dataset.classnames == ("golden retriever", "hamster", "tabby cat")
    assert dataset.template == "a photo of a {}."
    counts = {s: np.bincount(dataset.split(s).labels, minlength=3).tolist() for s in ("train", "val", "test")}
    assert counts == {"train": [5, 2, 5], "val": [2, 1, 2], "test": [3, 1, 3]}
    all_paths = [p for s in dataset.splits.values() for p in s.paths]
    assert len(all_paths) == len(set(all_paths)) == 24
    same = load_dataset("imagefolder", root, val_ratio=0.2, test_ratio=0.3, seed=0)
    assert same.splits == dataset.splits
    others = [load_dataset("imagefolder", root, seed=s).split("train").paths for s in (1, 2, 3)]
    assert any(p != dataset.split("train").paths for p in others)
    no_test = load_dataset("imagefolder", root, test_ratio=0.0, template="itap of a {}.")
    assert len(no_test.splits["test"]) == 0 and no_test.prompts()[1] == "itap of a hamster."


def test_image_folder_with_split_file(tmp_path: Path) -> None:
    root = make_class_folders(tmp_path / "data", {"a": 2, "b": 2})
    split = {
        "train": [["a/img_00.jpg", 0, "class_a"], ["b/img_00.jpg", 1, "class b"]],
        "val": [],
        "test": [["a/img_01.png", 0, "class_a"], ["b/img_01.png", 1, "class b"]],
    }
    (tmp_path / "split.json").write_text(json.dumps(split))
    dataset = load_dataset("imagefolder", root, split_file=tmp_path / "split.json")
    assert dataset.classnames == ("class a", "class b")
    assert dataset.split("test").paths == ("a/img_01.png", "b/img_01.png")
    split["test"][0][0] = "a/gone.png"
    (tmp_path / "split.json").write_text(json.dumps(split))
    with pytest.raises(MissingFileError, match=r"split\.json.*a/gone\.png"):
        load_dataset("imagefolder", root, split_file=tmp_path / "split.json")


def test_image_folder_bad_input(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="nope"):
        load_dataset("imagefolder", tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_dataset("imagefolder", tmp_path / "flat")
    root = make_class_folders(tmp_path / "d", {"a": 3})
    (root / "empty_class").mkdir()
    (root / "empty_class" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=r"empty classes: sub-folders empty_class of .*d"):
        load_dataset("imagefolder", root)
    (root / "empty_class" / "notes.txt").unlink()
    (root / "empty_class").rmdir()
    with pytest.raises(DatasetError, match="val_ratio"):
        load_dataset("imagefolder", root, val_ratio=1.5)
    with pytest.raises(DatasetError, match="below 1"):
        load_dataset("imagefolder", root, val_ratio=0.5, test_ratio=0.5)
    with pytest.raises(DatasetError, match="exactly one"):
        load_dataset("imagefolder", root, template="a photo")


# --------------------------------------------------------------------------------------------- manifest


def test_manifest_csv_with_split_column(tmp_path: Path) -> None:
    absolute = write_image(tmp_path / "elsewhere" / "abs.png")
    write_image(tmp_path / "m" / "imgs" / "c1.jpg")
    write_image(tmp_path / "m" / "imgs" / "d1.jpg")
    write_image(tmp_path / "m" / "imgs" / "d2.jpg")
    manifest = tmp_path / "m" / "my pets.csv"
    manifest.write_text(
        f"path,label,split\nimgs/c1.jpg,cat,train\nimgs/d1.jpg,dog,train\n{absolute},cat,Test\nimgs/d2.jpg,dog,val\n"
    )
    dataset = load_dataset("manifest", manifest)
    assert dataset.name == "manifest-my-pets"
    assert dataset.classnames == ("cat", "dog")
    assert dataset.split("train").paths == ("imgs/c1.jpg", "imgs/d1.jpg")
    assert dataset.split("train").labels == (0, 1)
    assert dataset.split("val").labels == (1,)
    assert (dataset.image_root / dataset.split("test").paths[0]) == absolute
    assert load_dataset("manifest", manifest, classnames=["dog", "cat"]).split("train").labels == (1, 0)


def test_manifest_json_integer_labels_and_ratio_split(tmp_path: Path) -> None:
    items = []
    for label, name in enumerate(["sea_lake", "forest"]):
        for i in range(5):
            write_image(tmp_path / f"{name}{i}.png", i)
            items.append({"path": f"{name}{i}.png", "label": label if i % 2 else name})
    manifest = tmp_path / "data.json"
    manifest.write_text(json.dumps({"classnames": ["sea_lake", "forest"], "items": items}))
    dataset = load_dataset("manifest", manifest, val_ratio=0.2, test_ratio=0.2, seed=1)
    assert dataset.classnames == ("sea lake", "forest")
    assert {s: len(v) for s, v in dataset.splits.items()} == {"train": 6, "val": 2, "test": 2}
    assert set(dataset.split("train").labels) == {0, 1}
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps({**item, "split": "train"}) for item in items))
    assert len(load_dataset("manifest", jsonl, classnames=["sea_lake", "forest"]).split("train")) == 10
    (tmp_path / "classes.txt").write_text("sea_lake\nforest\n")
    assert load_dataset("manifest", jsonl, classnames="classes.txt").num_classes == 2


def test_manifest_bad_input(tmp_path: Path) -> None:
    write_image(tmp_path / "a.jpg")
    write_image(tmp_path / "b.jpg")
    with pytest.raises(MissingFileError, match=r"missing\.csv"):
        load_dataset("manifest", tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\na.jpg,cat\nb.jpg,dgo\n")
    with pytest.raises(DatasetError, match=r"bad\.csv, line 3: unknown class name 'dgo'.*known: cat, dog"):
        load_dataset("manifest", bad, classnames=["cat", "dog"])
    bad.write_text("path,label\na.jpg,0\nb.jpg,1\n")
    with pytest.raises(DatasetError, match=r"bad\.csv, line 2: integer label '0' needs class names"):
        load_dataset("manifest", bad)
    with pytest.raises(DatasetError, match=r"bad\.csv, line 3: label 1 is out of range"):
        load_dataset("manifest", bad, classnames=["cat"])
    bad.write_text("file,class\na.jpg,cat\n")
    with pytest.raises(DatasetError, match=r"bad\.csv has no 'path' column"):
        load_dataset("manifest", bad)
    bad.write_text("path,label,split\na.jpg,cat,train\nb.jpg,dog,holdout\n")
    with pytest.raises(DatasetError, match=r"bad\.csv, line 3: split 'holdout'"):
        load_dataset("manifest", bad)
    bad.write_text("path,label\na.jpg,cat\nb.jpg,cat\n")
    with pytest.raises(DatasetError, match=r"bad\.csv: empty classes: dog"):
        load_dataset("manifest", bad, classnames=["cat", "dog"])
    bad.write_text("path,label\na.jpg,cat\ngone.jpg,dog\n")
    with pytest.raises(MissingFileError, match=r"1 of 2 images listed in .*bad\.csv .*gone\.jpg"):
        load_dataset("manifest", bad)
    js = tmp_path / "bad.json"
    js.write_text("{not json")
    with pytest.raises(DatasetError, match=r"bad\.json.*not readable JSON"):
        load_dataset("manifest", js)
    js.write_text(json.dumps({"rows": []}))
    with pytest.raises(DatasetError, match=r"bad\.json.*'items'"):
        load_dataset("manifest", js)
    other = tmp_path / "bad.xml"
    other.write_text("<x/>")
    with pytest.raises(DatasetError, match="unsupported suffix"):
        load_dataset("manifest", other)


# --------------------------------------------------------------------------------- split-file problems


def test_missing_split_file_names_file_and_fix(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match=r"split_zhou_EuroSAT\.json not found; put CoOp's"):
        load_dataset("eurosat", tmp_path)
    with pytest.raises(MissingFileError, match=r"split_zhou_Caltech101\.json"):
        load_dataset("caltech101", tmp_path)


def test_missing_images_counted_and_named(tmp_path: Path) -> None:
    split_file = make_coop_eurosat(tmp_path, tiny_split())
    for relpath in ("SeaLake/SeaLake_test1.jpg", "SeaLake/SeaLake_test2.jpg", "AnnualCrop/AnnualCrop_val0.jpg"):
        (tmp_path / "eurosat" / "2750" / relpath).unlink()
    with pytest.raises(MissingFileError) as info:
        load_dataset("eurosat", tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert f"3 of 18 images listed in {split_file}" in message
    assert "AnnualCrop/AnnualCrop_val0.jpg" in message and "SeaLake/SeaLake_test1.jpg" in message
    assert "extract the EuroSAT images into" in message
    assert load_dataset("eurosat", tmp_path, check_files=False).num_classes == 2


def test_missing_image_folder(tmp_path: Path) -> None:
    make_coop_eurosat(tmp_path, tiny_split(), images=False)
    with pytest.raises(MissingFileError, match=r"image folder .*2750 .*split_zhou_EuroSAT\.json.* does not exist"):
        load_dataset("eurosat", tmp_path)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("{oops", "not readable JSON"),
        ("[1, 2]", "has a JSON list; expected an object"),
        ('{"training": []}', r"keys \['training'\]"),
        ('{"train": {"a": 1}}', "'train' is a JSON dict"),
        ('{"train": [["a.jpg", 0]]}', r"train\[0\] is \[\"a.jpg\", 0\]"),
        ('{"train": [["a.jpg", "0", "x"]]}', r"train\[0\].*integer label"),
        ('{"train": [], "test": []}', "lists no images"),
        ('{"train": [["a.jpg", 0, "x"], ["b.jpg", 0, "y"]]}', "label 0 is called both 'x' and 'y'"),
        ('{"train": [["a.jpg", 0, "x"], ["b.jpg", 1, "x"]]}', "labels 0 and 1 are both called 'x'"),
        ('{"train": [["a.jpg", 0, "x"], ["b.jpg", 2, "z"]]}', "empty classes: labels 1 have no images"),
    ],
)
def test_bad_split_file_format(tmp_path: Path, content: str, pattern: str) -> None:
    folder = tmp_path / "eurosat"
    folder.mkdir()
    (folder / "split_zhou_EuroSAT.json").write_text(content)
    with pytest.raises(DatasetError, match=rf"split file .*split_zhou_EuroSAT\.json.*{pattern}"):
        load_dataset("eurosat", tmp_path)
    with pytest.raises(DatasetError, match=pattern):
        read_split_file(folder / "split_zhou_EuroSAT.json")


# ------------------------------------------------------------------------------------- few-shot sampling


def test_sample_few_shot_exact_and_deterministic() -> None:
    labels = np.repeat(np.arange(5), [20, 7, 16, 30, 9])
    np.random.default_rng(0).shuffle(labels)
    state = np.random.get_state()
    a = sample_few_shot(labels, 5, 4, seed=1)
    assert np.random.get_state()[1].tolist() == state[1].tolist()  # global state untouched
    assert a.dtype == np.int64 and (np.diff(a) > 0).all()
    assert np.bincount(labels[a], minlength=5).tolist() == [4] * 5
    assert sample_few_shot(labels, 5, 4, seed=1).tolist() == a.tolist()
    assert sample_few_shot(list(labels), 5, 4, seed=2).tolist() != a.tolist()
    assert sample_few_shot(labels, 5, 7, seed=1).size == 35
    val = sample_val(labels, 5, 16, seed=1)
    assert np.bincount(labels[val], minlength=5).tolist() == [4] * 5
    assert np.bincount(labels[sample_val(labels, 5, 2, seed=1)], minlength=5).tolist() == [2] * 5
    few = np.array([0, 0, 0, 1])  # val keeps what there is when a class has fewer than min(K, 4)
    assert np.bincount(few[sample_val(few, 2, 16, seed=1)]).tolist() == [3, 1]


def test_sample_few_shot_errors() -> None:
    labels = np.repeat(np.arange(3), [20, 7, 16])
    pattern = r"class 'pug' \(label 1\) has 7 images but 8 shots.*in split\.json.*shots <= 7"
    with pytest.raises(DatasetError, match=pattern):
        sample_few_shot(labels, 3, 8, seed=1, classnames=["a", "pug", "c"], source="split.json")
    with pytest.raises(DatasetError, match="label 3 has 0 images"):
        sample_few_shot(labels, 4, 1, seed=1)
    with pytest.raises(DatasetError, match="shots must be a positive integer"):
        sample_few_shot(labels, 3, 0, seed=1)
    with pytest.raises(DatasetError, match="seed must be a non-negative integer"):
        sample_few_shot(labels, 3, 1, seed=-1)
    with pytest.raises(DatasetError, match=r"labels must lie in 0\.\.1"):
        sample_few_shot(labels, 2, 1, seed=1)


def test_few_shot_on_tiny_dataset_names_class_and_file(tmp_path: Path) -> None:
    split_file = make_coop_eurosat(tmp_path, tiny_split(3))
    dataset = load_dataset("eurosat", tmp_path)
    index = make_few_shot_index(dataset, 2, seed=1)
    assert len(index.train_indices) == 4 and len(index.val_indices) == 4
    with pytest.raises(DatasetError) as info:
        make_few_shot_index(dataset, 4, seed=1)
    message = str(info.value)
    assert "'Annual Crop Land'" in message and "has 3 images but 4 shots" in message
    assert str(split_file) in message and "shots <= 3" in message
    assert few_shot_union(dataset, [1, 2, 3], [1, 2]).tolist() == list(range(6))


def test_index_file_errors(tmp_path: Path) -> None:
    make_coop_eurosat(tmp_path, tiny_split(3))
    dataset = load_dataset("eurosat", tmp_path)
    with pytest.raises(MissingFileError, match=r"few-shot index .*none\.json not found"):
        FewShotIndex.load(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    with pytest.raises(DatasetError, match=r"bad\.json has the wrong format"):
        FewShotIndex.load(bad)
    path = make_few_shot_index(dataset, 1, seed=1).save(tmp_path / "idx.json")
    raw = json.loads(path.read_text())
    raw["train_indices"] = ["0"]
    bad.write_text(json.dumps(raw))
    with pytest.raises(DatasetError, match=r"bad\.json has the wrong format"):
        FewShotIndex.load(bad)
    # the dataset's train list changes: the index no longer fits
    changed = tiny_split(3)
    changed["train"] = changed["train"][1:]
    make_coop_eurosat(tmp_path, changed, images=False)
    with pytest.raises(DatasetError, match=r"idx\.json: the train list of eurosat changed"):
        FewShotIndex.load(path).check_dataset(load_dataset("eurosat", tmp_path), source=str(path))
    with pytest.raises(DatasetError, match="is for dataset 'eurosat', not 'other'"):
        FewShotIndex.load(path).check_dataset(Dataset("other", tmp_path, ("a",), "{}"))


def test_missing_shared_data_skips_or_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import require_data

    assert require_data(tmp_path, "x") == tmp_path
    monkeypatch.delenv("COOPIPE_REQUIRE_DATA", raising=False)
    with pytest.raises(pytest.skip.Exception, match="COOPIPE_REQUIRE_DATA=1"):
        require_data(tmp_path / "absent", "shared data")
    monkeypatch.setenv("COOPIPE_REQUIRE_DATA", "1")
    with pytest.raises(pytest.fail.Exception, match=r"shared data not found at .*absent"):
        require_data(tmp_path / "absent", "shared data")


def test_each_adapter_declares_its_label_kind_for_the_names_stores_carry():
    """A job that holds only a store or a run record knows the label kind from the adapter that built it: its
    registered name, an alias, or the name with a qualifier (``agemanifest-faces``); an unregistered name is a class
    dataset."""
    registry = default_registry()
    assert [n for n in registry.names() if registry.label_kind(n) == "ordinal"] == ["utkface", "morph", "agemanifest"]
    assert registry.label_kind("agemanifest-faces") == registry.label_kind("MORPH2") == "ordinal"
    assert registry.label_kind("imagefolder-pets") == registry.label_kind("toy") == registry.label_kind("eurosat") == "class"
    with pytest.raises(ValueError, match="label_kind"):
        DatasetRegistry().register("ranks", lambda root: None, "", label_kind="rank")

"""Age datasets (UTKFace, MORPH lists, numeric manifests), their label errors, and the sparse-age few-shot rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import require_data
from coopipe.datasets import (
    is_age_dataset,
    load_dataset,
    make_few_shot_index,
    rank_values,
    read_age_split_file,
    sample_few_shot,
)
from coopipe.errors import DatasetError


def _utk(root: Path, ages: list[int]) -> Path:
    images = root / "utkface" / "images"
    images.mkdir(parents=True)
    for i, age in enumerate(ages):
        (images / f"{age}_0_{i % 4}_2017010{i:04d}.jpg.chip.jpg").write_bytes(b"")
    return root


def test_utkface_ages_from_names_and_seeded_stratified_split(tmp_path: Path) -> None:
    root = _utk(tmp_path, [20] * 10 + [40] * 10 + [75] * 2)
    ds = load_dataset("utkface", root)
    assert ds.classnames[0] == "0" and ds.classnames[-1] == "100" and ds.num_classes == 101
    assert ds.prompts()[20] == "a photo of a 20 year old person."
    ages = {name: sorted({int(rank_values(ds.classnames)[y]) for y in s.labels}) for name, s in ds.splits.items()}
    assert ages["train"] == ages["test"] == [20, 40, 75] and ages["val"] == [20, 40]  # per age, by the ratios
    assert sum(len(s) for s in ds.splits.values()) == 22
    assert is_age_dataset(ds)
    again = load_dataset("utkface", root)
    assert again.splits == ds.splits  # seeded
    assert load_dataset("utkface", root, seed=1).splits != ds.splits


def test_utkface_split_is_recorded_and_read_back(tmp_path: Path) -> None:
    root = _utk(tmp_path, [30] * 6 + [31] * 6)
    split = tmp_path / "split.json"
    ds = load_dataset("utkface", root, record_split=split)
    pinned = load_dataset("utkface", root, split_file=split, seed=5)
    assert pinned.splits == ds.splits
    shifted = read_age_split_file(split, min_age=10, max_age=90)  # ages are stored in years
    assert shifted["train"].labels[0] == ds.splits["train"].labels[0] - 10


def test_rank_range_is_a_parameter(tmp_path: Path) -> None:
    ds = load_dataset("utkface", _utk(tmp_path, [16, 16, 77, 77]), min_age=16, max_age=77, template="age {}.")
    assert ds.num_classes == 62 and ds.classnames[0] == "16" and ds.prompts()[0] == "age 16."


@pytest.mark.parametrize(
    ("name", "message"),
    [("abc_0_0_1.jpg.chip.jpg", r"age 'abc' is not a whole number"), ("120_0_0_1.jpg.chip.jpg", r"outside the rank range 0\.\.100")],
)
def test_utkface_bad_names_name_the_file(tmp_path: Path, name: str, message: str) -> None:
    root = _utk(tmp_path, [20])
    (root / "utkface" / "images" / name).write_bytes(b"")
    with pytest.raises(DatasetError, match=message) as info:
        load_dataset("utkface", root)
    assert name in str(info.value) and "\n" not in str(info.value)


def test_empty_rank_range_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="rank range 50..10 is empty"):
        load_dataset("utkface", _utk(tmp_path, [20]), min_age=50, max_age=10)


def _morph(root: Path, train: str, val: str) -> Path:
    lists = root / "MORPH" / "data_list"
    lists.mkdir(parents=True)
    (lists / "ET_proto_train.txt").write_text(train)
    (lists / "ET_proto_val.txt").write_text(val)
    for line in (train + val).splitlines():
        if line.split():
            (root / "MORPH" / line.split()[0]).write_bytes(b"")
    return root


def test_morph_lists_val_doubles_as_test(tmp_path: Path) -> None:
    root = _morph(tmp_path, "a.jpg 20\nb.jpg 33\n\n", "c.jpg 45\n")
    ds = load_dataset("morph", root)
    assert ds.splits["train"].paths == ("a.jpg", "b.jpg") and ds.splits["train"].labels == (20, 33)
    assert ds.splits["test"] == ds.splits["val"] and "doubles as test" in ds.source
    other = tmp_path / "test.txt"
    other.write_text("a.jpg 21\n")
    assert load_dataset("morph", root, test_list=other).splits["test"].labels == (21,)


def test_morph_bad_label_names_file_and_line(tmp_path: Path) -> None:
    root = _morph(tmp_path, "a.jpg 20\nb.jpg twenty\n", "c.jpg 45\n")
    with pytest.raises(DatasetError, match=r"ET_proto_train.txt, line 2: age 'twenty' is not a whole number"):
        load_dataset("morph", root)
    root2 = _morph(tmp_path / "x", "a.jpg 20\nb.jpg\n", "c.jpg 45\n")
    with pytest.raises(DatasetError, match=r"line 2: 'b.jpg' has no age"):
        load_dataset("morph", root2)


def test_age_manifest_numeric_label_column(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / name).write_bytes(b"")
    manifest = tmp_path / "faces.csv"
    manifest.write_text("path,age,split\na.jpg,20,train\nb.jpg,21.0,val\nc.jpg,99,test\n")
    ds = load_dataset("agemanifest", manifest)
    assert is_age_dataset(ds)
    assert ds.name == "agemanifest-faces" and ds.splits["val"].labels == (21,) and ds.splits["test"].labels == (99,)
    manifest.write_text("path,age\na.jpg,20\nb.jpg,20.5\n")
    with pytest.raises(DatasetError, match=r"faces.csv, line 3: age '20.5' is not a whole number"):
        load_dataset("agemanifest", manifest)
    manifest.write_text("path,age\na.jpg,-1\n")
    with pytest.raises(DatasetError, match=r"line 2: age -1 is outside the rank range"):
        load_dataset("agemanifest", manifest)


def test_age_few_shot_keeps_all_of_a_sparse_age_and_nests() -> None:
    labels = np.array([20] * 9 + [21] * 2 + [50] * 5)  # age 21 has fewer than K = 4
    draw = sample_few_shot(labels, 101, 4, seed=1, strict=False)
    counts = np.bincount(labels[draw], minlength=101)
    assert counts[20] == 4 and counts[21] == 2 and counts[50] == 4 and counts.sum() == 10
    assert set(sample_few_shot(labels, 101, 2, seed=1, strict=False)) <= set(draw)  # nested: K=2 inside K=4
    assert set(draw) <= set(sample_few_shot(labels, 101, 8, seed=1, strict=False))
    assert np.array_equal(draw, sample_few_shot(labels, 101, 4, seed=1, strict=False))  # explicit generators
    assert not np.array_equal(draw, sample_few_shot(labels, 101, 4, seed=2, strict=False))


def test_age_few_shot_index_on_utkface(shared_data: Path) -> None:
    require_data(shared_data / "utkface" / "images", "UTKFace images")
    ds = load_dataset("utkface", shared_data)
    index = make_few_shot_index(ds, 16, seed=1)
    train = np.asarray(ds.splits["train"].labels)[index.train_array()]
    counts = np.bincount(train, minlength=101)
    full = np.bincount(ds.splits["train"].labels, minlength=101)
    assert np.array_equal(counts, np.minimum(full, 16))
    index.check_dataset(ds)

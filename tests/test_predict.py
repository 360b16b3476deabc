"""`coopipe predict` on real EuroSAT images with a small run trained through the CLI: it agrees with `coopipe eval`
on the same images (same top-1 per image, same accuracy and confusion), from the images and from the store."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_eurosat_folder
from coopipe.cli import app
from coopipe.features import select_store
from coopipe.predict import predict, resolve_inputs
from typer.testing import CliRunner

CLASSES = ("Forest", "SeaLake", "Highway", "Residential")
PER_CLASS = 10
NAME = "imagefolder-eurosat4"


@pytest.fixture(scope="module")
def trained(eurosat_root: Path, tmp_path_factory) -> dict[str, Path]:
    """A 4-class image folder, its cache (default bf16 / float16 encode) and a 3-epoch run, all through the CLI."""
    base = tmp_path_factory.mktemp("predict")
    folder = copy_eurosat_folder(eurosat_root, base / "eurosat4", CLASSES, PER_CLASS)
    cache, run = base / "cache", base / "run"
    runner = CliRunner()
    res = runner.invoke(app, ["encode", "--dataset", "imagefolder", "--data-root", str(folder), "--cache", str(cache),
                              "--views", "2", "--shots", "2", "--seeds", "1", "--no-progress", "--batch-size", "32",
                              "--pretrained", "none"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train", "--features", str(cache), "--dataset", NAME, "--shots", "2", "--seed", "1",
                              "--out", str(run), "--epochs", "3", "--n-ctx", "4", "--no-progress"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["eval", str(run), "--features", str(cache)])
    assert res.exit_code == 0, res.output
    return {"folder": folder, "cache": cache, "run": run}


def _test_images(trained: dict[str, Path]) -> tuple[list[Path], list[int], object]:
    meta = json.loads((trained["run"] / "prompt.json").read_text())
    store = select_store(trained["cache"], NAME, "test", model=meta["model"], weights=meta["weights"])
    paths = [trained["folder"] / str(p) for p in store.paths()]
    return paths, [int(v) for v in store.labels()], store


def test_predict_agrees_with_eval(trained: dict[str, Path], tmp_path: Path):
    paths, labels, store = _test_images(trained)
    manifest = tmp_path / "images.csv"  # unlabelled manifest: only a path column
    with open(manifest, "w", newline="") as fh:
        csv.writer(fh).writerows([["path"]] + [[str(p)] for p in paths])
    out = tmp_path / "pred.json"
    res = CliRunner().invoke(app, ["predict", str(trained["run"]), str(manifest), "--topk", "2", "--out", str(out),
                                   "--batch-size", "32"])
    assert res.exit_code == 0, res.output
    preds = json.loads(out.read_text())["predictions"]
    assert [p["path"] for p in preds] == [str(p) for p in paths]
    assert all(len(p["top"]) == 2 and p["top"][0]["prob"] >= p["top"][1]["prob"] for p in preds)

    metrics = json.loads((trained["run"] / "metrics.json").read_text())
    classnames = store.classnames()
    predicted = [classnames.index(p["label"]) for p in preds]
    confusion = np.zeros((len(classnames), len(classnames)), dtype=int)
    for y, p in zip(labels, predicted):
        confusion[y, p] += 1
    assert confusion.tolist() == metrics["confusion"]
    assert np.mean(np.equal(labels, predicted)) == pytest.approx(metrics["accuracy"], abs=1e-12)

    # the store's own features give the same top-1 per image (and the same probabilities up to float16 rounding)
    from_store = predict(trained["run"], store=store.path, topk=2)
    assert [p.label for p in from_store] == [p["label"] for p in preds]
    assert np.allclose([p.probs for p in from_store], [[t["prob"] for t in p["top"]] for p in preds], atol=1e-5)


def test_python_entry_point_and_inputs(trained: dict[str, Path], tmp_path: Path):
    folder = trained["folder"]
    files = resolve_inputs([folder / "Forest"])
    assert files == sorted(files) and len(files) == PER_CLASS
    # the whole class list with probabilities that sum to one, the same from files and the CLI's CSV
    preds = predict(trained["run"], [folder / "Forest"], topk=len(CLASSES))
    assert [p.path for p in preds] == [str(f) for f in files]
    assert all(abs(sum(p.probs) - 1) < 1e-5 and sorted(p.labels) == sorted(CLASSES) for p in preds)
    out = tmp_path / "p.csv"
    res = CliRunner().invoke(app, ["predict", str(trained["run"]), str(folder / "Forest"), "--topk", "4",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out.open()))
    assert [r["label_1"] for r in rows] == [p.label for p in preds]
    assert np.allclose([float(r["prob_1"]) for r in rows], [p.prob for p in preds], atol=1e-6)


def test_unreadable_image_fails_with_one_line_or_is_skipped(trained: dict[str, Path], tmp_path: Path):
    good = sorted((trained["folder"] / "SeaLake").glob("*.jpg"))[:2]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    runner = CliRunner()
    res = runner.invoke(app, ["predict", str(trained["run"]), str(good[0]), str(bad), str(good[1])])
    assert res.exit_code == 1
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0]
    res = runner.invoke(app, ["predict", str(trained["run"]), str(good[0]), str(bad), str(good[1]),
                              "--on-bad-image", "skip", "--topk", "1"])
    assert res.exit_code == 0, res.output
    printed = [line.split("\t")[0] for line in res.stdout.splitlines() if "\t" in line]
    assert printed == [str(good[0]), str(good[1])]
    res = runner.invoke(app, ["predict", str(trained["run"]), str(tmp_path / "nowhere")])
    assert res.exit_code == 1 and "does not exist" in res.output

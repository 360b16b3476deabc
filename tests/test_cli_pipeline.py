"""The whole chain through the CLI on a small image-folder dataset of real EuroSAT images:
encode (few-shot subset with augmented views) -> train -> eval -> zeroshot -> linear-probe -> interpret."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coopipe.cli import app

from conftest import copy_eurosat_folder

CLASSES = ("Forest", "SeaLake", "Highway", "Residential")
PER_CLASS = 14


@pytest.fixture(scope="module")
def folder(eurosat_root: Path, tmp_path_factory) -> Path:
    return copy_eurosat_folder(eurosat_root, tmp_path_factory.mktemp("eurosat_small") / "eurosat4", CLASSES, PER_CLASS)


@pytest.fixture(scope="module")
def cache(folder: Path, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    res = CliRunner().invoke(app, [
        "encode", "--dataset", "imagefolder", "--data-root", str(folder), "--cache", str(cache),
        "--views", "2", "--shots", "2,4", "--seeds", "1", "--no-progress", "--batch-size", "32", "--pretrained", "none",
    ])
    assert res.exit_code == 0, res.output
    assert res.output.count(" views] ") == 3  # train (few-shot subset), val (subset), test
    return cache


@pytest.mark.slow  # train, eval, baselines and interpret through the CLI: over a minute
def test_train_eval_baselines_interpret(cache: Path, tmp_path: Path):
    runner = CliRunner()
    name = "imagefolder-eurosat4"
    run = tmp_path / "run"
    args = ["train", "--features", str(cache), "--dataset", name, "--shots", "4", "--seed", "1",
            "--out", str(run), "--epochs", "3", "--n-ctx", "4", "--no-progress"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (run / "prompt.safetensors").is_file() and (run / "classifier.safetensors").is_file()
    history = (run / "history.tsv").read_text().splitlines()
    assert history[0].startswith("epoch\tlr\tloss") and len(history) == 4
    meta = json.loads((run / "prompt.json").read_text())
    assert meta["model"] == "RN50" and meta["weights"] == "random-init:seed=0" and meta["complete"]
    assert meta["stores"]["train"]["views"]["n_aug"] == 2
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "already complete" in again.output

    res = runner.invoke(app, ["eval", str(run), "--features", str(cache)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == "coop_m4" and metrics["shots"] == 4 and 0 <= metrics["accuracy"] <= 1
    assert set(metrics["per_class_accuracy"]) == {"Forest", "SeaLake", "Highway", "Residential"}

    zs = tmp_path / "zs"
    res = runner.invoke(app, ["zeroshot", "--features", str(cache), "--dataset", name, "--out", str(zs)])
    assert res.exit_code == 0, res.output
    assert json.loads((zs / "metrics.json").read_text())["templates"] == ["a photo of a {}."]

    lp = tmp_path / "lp"
    res = runner.invoke(app, ["linear-probe", "--features", str(cache), "--dataset", name, "--shots", "2",
                              "--seed", "1", "--out", str(lp)])
    assert res.exit_code == 0, res.output
    assert json.loads((lp / "metrics.json").read_text())["C"] > 0

    res = runner.invoke(app, ["interpret", str(run), "--cache", str(cache), "--topk", "3",
                              "--json", str(tmp_path / "i.json")])
    assert res.exit_code == 0, res.output
    assert "nearest-word prompt" in res.output
    slots = json.loads((tmp_path / "i.json").read_text())["contexts"][0]["slots"]
    assert len(slots) == 4 and all(len(s["neighbours"]) == 3 for s in slots)


def test_bad_requests_fail_with_one_line(cache: Path, tmp_path: Path):
    runner = CliRunner()
    name = "imagefolder-eurosat4"
    res = runner.invoke(app, ["train", "--features", str(cache), "--dataset", name, "--shots", "16",
                              "--seed", "1", "--out", str(tmp_path / "r")])
    assert res.exit_code == 1
    assert "error:" in res.output and "coopipe encode" in res.output
    res = runner.invoke(app, ["train", "--features", str(tmp_path / "empty"), "--dataset", name, "--shots", "2",
                              "--seed", "1", "--out", str(tmp_path / "r")])
    assert res.exit_code == 1 and "run `coopipe encode" in res.output
    res = runner.invoke(app, ["eval", str(tmp_path / "nothing"), "--features", str(cache)])
    assert res.exit_code == 1 and "no checkpoint" in res.output


def test_fewer_shots_train_from_the_cache_without_encoding(cache: Path, folder: Path, tmp_path: Path):
    """After a 4-shot encode, a 1-shot run needs no encode: its draw is derived from the recorded 4-shot draw (the
    draws are nested) and equals drawing it from the dataset; its rows come from the stores already there."""
    from coopipe.datasets import load_dataset
    from coopipe.datasets.fewshot import FewShotIndex, make_few_shot_index

    name = "imagefolder-eurosat4"
    stores = sorted(p.name for p in cache.rglob("*.zarr"))
    index_file = cache / name / "fewshot" / f"{name}-shots1-seed1.json"
    assert not index_file.exists()
    res = CliRunner().invoke(app, ["train", "--features", str(cache), "--dataset", name, "--shots", "1", "--seed", "1",
                                   "--out", str(tmp_path / "one"), "--epochs", "1", "--n-ctx", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in cache.rglob("*.zarr")) == stores  # nothing encoded
    derived = FewShotIndex.load(index_file)
    drawn = make_few_shot_index(load_dataset("imagefolder", folder), 1, 1)
    assert (derived.train_indices, derived.val_indices) == (drawn.train_indices, drawn.val_indices)
    assert derived.train_order == drawn.train_order and derived.val_order == drawn.val_order

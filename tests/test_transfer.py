"""Prompts on classes they were not trained on: CoCoOp's base-to-new protocol (`--classes base|new`) and
cross-dataset transfer (`coopipe eval --transfer`), on tiny stores encoded from real EuroSAT images."""

from __future__ import annotations

import json

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from coopipe.checkpoint import load_checkpoint
from coopipe.classifier import load_classifier
from coopipe.cli import app
from coopipe.errors import CheckpointError, DatasetError, ParamsError
from coopipe.evaluate import evaluate_classifier
from coopipe.features import read_split, select_store
from coopipe.jobs.evaluate import run_eval, run_zeroshot
from coopipe.jobs.train import run_train
from coopipe.transfer import ClassSubset, context_text_features, subset_ids

from conftest import copy_eurosat_folder

SOURCE = ("Forest", "SeaLake", "Highway", "Residential")  # imagefolder sorts: Forest, Highway, Residential, SeaLake
TARGET = ("AnnualCrop", "Pasture", "River")
SRC, TGT = "imagefolder-src4", "imagefolder-tgt3"
TRAIN = {"max_epoch": 2, "n_ctx": 4}


@pytest.fixture(scope="module")
def cache(eurosat_root: Path, tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("data")
    cache = tmp_path_factory.mktemp("cache")
    runner = CliRunner()
    for name, classes, per_class, extra in (("src4", SOURCE, 10, ["--views", "1", "--shots", "2", "--seeds", "1"]),
                                            ("tgt3", TARGET, 6, ["--split", "test"])):
        folder = copy_eurosat_folder(eurosat_root, data / name, classes, per_class)
        res = runner.invoke(app, ["encode", "--dataset", "imagefolder", "--data-root", str(folder), "--cache",
                                  str(cache), "--no-progress", "--batch-size", "32", "--pretrained", "none", *extra])
        assert res.exit_code == 0, res.output
    return cache


def test_class_subsets_follow_cocoop():
    assert subset_ids(5, "base") == (0, 1, 2) and subset_ids(5, "new") == (3, 4)
    assert subset_ids(4, "base") == (0, 1) and subset_ids(4, "all") == (0, 1, 2, 3)
    sub = ClassSubset.of(["a", "b", "c", "d", "e"], "new")
    keep, labels = sub.relabel(np.array([4, 0, 3, 1, 4]))
    assert keep.tolist() == [True, False, True, False, True] and labels.tolist() == [1, 0, 1]
    assert sub.classnames == ("d", "e")
    with pytest.raises(ParamsError, match="base"):
        subset_ids(4, "novel")
    with pytest.raises(DatasetError, match="no 'new' classes"):
        subset_ids(1, "new")


def test_base_to_new(cache: Path, tmp_path: Path, rn50):
    run = tmp_path / "b2n"
    res = CliRunner().invoke(app, ["train", "--features", str(cache), "--dataset", SRC, "--shots", "2", "--seed", "1",
                                   "--out", str(run), "--epochs", "2", "--n-ctx", "4", "--classes", "base",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    ckpt = load_checkpoint(run)
    assert ckpt.classnames == ["Forest", "Highway"] and ckpt.run.classes == "base"
    assert json.loads((run / "train.json").read_text())["classes"] == "base"

    base = run_eval(run, cache_dir=cache)  # default: the classes it was trained on
    assert (run / "metrics_base.json").is_file() and not (run / "metrics.json").exists()
    assert base["classes"] == "base" and set(base["per_class_accuracy"]) == {"Forest", "Highway"}

    res = CliRunner().invoke(app, ["eval", str(run), "--features", str(cache), "--classes", "new"])
    assert res.exit_code == 0, res.output
    new = json.loads((run / "metrics_new.json").read_text())
    assert new["classes"] == "new" and new["train_classes"] == "base" and "source_dataset" not in new
    assert set(new["per_class_accuracy"]) == {"Residential", "SeaLake"}
    test = ClassSubset.of(list(SOURCE), "all")  # the store's full class list (sorted folders)
    store = select_store(cache, SRC, "test", model=ckpt.model, weights=ckpt.weights)
    full = read_split(store, all_views=False)
    assert test.n_total == 4 and base["n"] + new["n"] == len(full.labels)

    # the classifier built from the context with the training names is the exported one (same text path)
    exported = load_classifier(run).text_features
    rebuilt = context_text_features(ckpt, rn50, ckpt.classnames)
    assert torch.allclose(rebuilt, exported, atol=1e-5)
    # and the new-class numbers are those of that classifier with the new names
    new_split = ClassSubset.of(full.classnames, "new").apply(full)
    text = context_text_features(ckpt, rn50, new_split.classnames)
    manual = evaluate_classifier(text, new_split.center, new_split.labels, ckpt.meta["logit_scale"])
    assert manual.accuracy == pytest.approx(new["accuracy"]) and manual.n == new["n"]

    with pytest.raises(CheckpointError, match="trained on base classes"):
        run_train(cache_dir=cache, dataset=SRC, shots=2, seed=1, out_dir=run, clip=rn50, overrides=TRAIN,
                  progress=False)
    zs = run_zeroshot(cache_dir=cache, dataset=SRC, out_dir=tmp_path / "zs", clip=rn50, classes="new")
    assert (tmp_path / "zs" / "metrics_new.json").is_file() and zs["n"] == new["n"]
    assert set(zs["per_class_accuracy"]) == {"Residential", "SeaLake"} and zs["classes"] == "new"


def test_transfer_to_another_dataset(cache: Path, tmp_path: Path, rn50):
    run = tmp_path / "src"
    run_train(cache_dir=cache, dataset=SRC, shots=2, seed=1, out_dir=run, clip=rn50, overrides=TRAIN, progress=False)
    runner = CliRunner()
    refused = runner.invoke(app, ["eval", str(run), "--features", str(cache), "--dataset", TGT])
    assert refused.exit_code == 1 and "--transfer" in refused.output

    res = runner.invoke(app, ["eval", str(run), "--features", str(cache), "--dataset", TGT, "--transfer"])
    assert res.exit_code == 0, res.output
    assert f"(trained on {SRC})" in res.output
    metrics = json.loads((run / "transfer" / TGT / "metrics.json").read_text())
    assert metrics["dataset"] == TGT and metrics["source_dataset"] == SRC and metrics["classes"] == "all"
    assert set(metrics["per_class_accuracy"]) == set(TARGET) and metrics["method"] == "coop_m4"

    target = read_split(select_store(cache, TGT, "test", model=rn50.name, weights=rn50.weights_id), all_views=False)
    text = context_text_features(load_checkpoint(run), rn50, target.classnames)
    manual = evaluate_classifier(text, target.center, target.labels, load_checkpoint(run).meta["logit_scale"])
    assert manual.accuracy == pytest.approx(metrics["accuracy"])

    # the source dataset itself through the same command: the exported classifier, plain metrics.json
    own = run_eval(run, cache_dir=cache, transfer=True)
    assert own["dataset"] == SRC and "source_dataset" not in own and (run / "metrics.json").is_file()


def test_class_specific_context_cannot_move(cache: Path, tmp_path: Path, rn50):
    run = tmp_path / "csc"
    run_train(cache_dir=cache, dataset=SRC, shots=2, seed=1, out_dir=run, clip=rn50, progress=False,
              overrides={**TRAIN, "max_epoch": 1, "csc": True}, classes="base")
    assert run_eval(run, cache_dir=cache, clip=rn50)["classes"] == "base"  # its own classes: fine
    with pytest.raises(CheckpointError, match="class-specific"):
        run_eval(run, cache_dir=cache, classes="new", clip=rn50)

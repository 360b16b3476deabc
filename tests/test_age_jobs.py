"""Age estimation through the jobs on a small real UTKFace subset (RN50, random weights):
encode (CLI, age few-shot rule) -> zero-shot / ensemble -> ridge -> rank linear probe -> CoOp train + eval -> age report.

Random weights carry no age signal, so the checks are on what the jobs compute and write (the metrics agree with
the predictions they save, the constant predictor is the median of the draw, the draws follow the age rule), not
on how good the numbers are.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from coopipe.cli import app
from typer.testing import CliRunner

AGES = range(20, 32)  # 12 ages x 4 faces: per age 2 train, 1 val, 1 test (the age-stratified split)
PER_AGE = 4


@pytest.fixture(scope="module")
def faces(shared_data: Path, tmp_path_factory) -> Path:
    """``$DATA`` with ``utkface/images`` holding the first 4 real faces of each age 20..31."""
    from conftest import copy_utkface

    return copy_utkface(shared_data, tmp_path_factory.mktemp("utk"), AGES, PER_AGE)


@pytest.fixture(scope="module")
def cache(faces: Path, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    res = CliRunner().invoke(app, [
        "encode", "--dataset", "utkface", "--data-root", str(faces), "--cache", str(cache), "--pretrained", "none",
        "--views", "0", "--shots", "1,2", "--seeds", "1", "--no-progress", "--workers", "0", "--batch-size", "32",
    ])
    assert res.exit_code == 0, res.output
    return cache


def _predictions(folder: Path) -> dict[str, np.ndarray]:
    with open(folder / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in ("true_age", "pred_exp", "pred_max")}


def _check_age_metrics(folder: Path, n_test: int) -> dict:
    metrics = json.loads((folder / "metrics.json").read_text())
    pred = _predictions(folder)
    assert pred["true_age"].size == n_test
    err_exp, err_max = np.abs(pred["pred_exp"] - pred["true_age"]), np.abs(pred["pred_max"] - pred["true_age"])
    assert metrics["mae_exp"] == pytest.approx(err_exp.mean(), abs=1e-3)  # the file's numbers are its predictions'
    assert metrics["mae_max"] == pytest.approx(err_max.mean(), abs=1e-9)
    assert metrics["cs_max"]["5"] == pytest.approx((err_max <= 5).mean())
    assert metrics["within_3_max"] == pytest.approx((err_max <= 3).mean())
    cs = [metrics["cs_exp"][str(t)] for t in range(1, 11)]
    assert cs == sorted(cs) and 0 <= metrics["accuracy"] <= 1
    assert metrics["constant_mae"] == pytest.approx(np.abs(pred["true_age"] - metrics["constant_median"]).mean())
    return metrics


@pytest.mark.slow  # encodes real faces and runs every age job: over a minute on 2 cores
def test_age_jobs_end_to_end(cache: Path, faces: Path, tmp_path: Path, rn50) -> None:
    from coopipe.datasets import load_dataset, make_few_shot_index, rank_values
    from coopipe.datasets.fewshot import FewShotIndex
    from coopipe.jobs.age_eval import age_templates, describe_age_metrics
    from coopipe.jobs.age_report import run_age_report
    from coopipe.jobs.evaluate import run_eval, run_fit, run_zeroshot
    from coopipe.jobs.train import run_train
    from coopipe.lookup import fewshot_index_path
    from coopipe.methods import MethodSpec
    from coopipe.regression import AGE_TEMPLATES

    data = load_dataset("utkface", faces)
    n_test = len(data.split("test"))
    index = FewShotIndex.load(fewshot_index_path(cache, "utkface", 2, 1))
    drawn = make_few_shot_index(data, 2, 1)
    assert index.train_indices == drawn.train_indices and index.train_order is not None
    assert len(index.train_indices) == 2 * len(AGES)  # 2 per present age; the 89 empty ranks are no error
    draw_ages = rank_values(data.classnames)[np.asarray(data.split("train").labels)[list(index.train_indices)]]

    runs = tmp_path / "runs" / "utkface"
    zs = run_zeroshot(cache_dir=cache, dataset="utkface", out_dir=runs / "zeroshot", clip=rn50)
    assert zs["templates"] == ["a photo of a {} year old person."] and zs["shots"] == 0
    _check_age_metrics(runs / "zeroshot", n_test)
    assert age_templates(None, ensemble=True) == list(AGE_TEMPLATES)  # --ensemble: every age prompt
    ens = run_zeroshot(cache_dir=cache, dataset="utkface", out_dir=runs / "zeroshot_ensemble", clip=rn50,
                       ensemble=True, templates=AGE_TEMPLATES[:2])  # two prompts keep the text pass short
    assert ens["method"] == "zeroshot_ensemble" and ens["templates"] == list(AGE_TEMPLATES[:2])

    ridge = run_fit(MethodSpec("ridge"), cache_dir=cache, dataset="utkface", shots=2, seed=1,
                    out_dir=runs / "ridge" / "shots2_seed1")
    assert ridge["method"] == "ridge" and ridge["alpha"] > 0
    assert _check_age_metrics(runs / "ridge" / "shots2_seed1", n_test)["constant_median"] == np.median(draw_ages)
    res = CliRunner().invoke(app, ["linear-probe", "--features", str(cache), "--dataset", "utkface", "--shots", "2",
                                   "--seed", "1", "--out", str(runs / "linear_probe" / "shots2_seed1")])
    assert res.exit_code == 0, res.output  # through the CLI: its printer reads the age metrics file unchanged
    probe = _check_age_metrics(runs / "linear_probe" / "shots2_seed1", n_test)
    assert probe["method"] == "linear_probe" and probe["C"] > 0 and probe["val_mae"] >= 0

    run = runs / "coop_m2" / "shots1_seed1"  # the 1-shot draw: derived from the 2-shot one, nothing encoded
    run_train(cache_dir=cache, dataset="utkface", shots=1, seed=1, out_dir=run, clip=rn50, progress=False,
              overrides={"max_epoch": 1, "n_ctx": 2})
    assert FewShotIndex.load(fewshot_index_path(cache, "utkface", 1, 1)).train_indices == \
        make_few_shot_index(data, 1, 1).train_indices
    run_eval(run, cache_dir=cache)
    metrics = _check_age_metrics(run, n_test)
    assert metrics["method"] == "coop_m2" and metrics["shots"] == 1 and "1-shot train draw" in metrics["constant_from"]
    assert len(metrics["per_class_accuracy"]) == 101 and "confusion" not in metrics  # the CLI's printer reads it
    assert describe_age_metrics(metrics)[0].startswith(f"  MAE {metrics['mae_exp']:.2f} years")

    summary = run_age_report(tmp_path / "runs", tmp_path / "report")["utkface"]
    out = tmp_path / "report" / "utkface"
    table = (out / "age_table.md").read_text()
    assert "| CoOp (M=2) |" in table and "| Ridge probe |" in table and "constant (train median)" in table
    assert "VGG-16" in table and "RANDOM" in table
    assert f"{ridge['mae_exp']:.2f}" in table  # one seed: no ±
    assert (out / "cs_curves.png").stat().st_size > 1000 and (out / "mae_vs_shots.png").is_file()
    assert (out / "predicted_vs_true_ridge_shots2.png").is_file()
    assert summary["runs"] == 5 and (tmp_path / "report" / "age_report.md").is_file()


def test_lookup_draws_the_age_rule_from_a_full_store(tmp_path: Path) -> None:
    """Without a recorded index, the lookup draws from full train/val stores: the age rule for an age dataset
    (sparse ages keep all, empty ranks are fine), equal to the dataset's draw and with its draw order (so fewer
    shots derive from it); CoOp's strict rule for any other dataset."""
    from conftest import make_store
    from coopipe.datasets import make_few_shot_index
    from coopipe.datasets.ages import rank_classnames
    from coopipe.datasets.base import Dataset, Split
    from coopipe.errors import DatasetError
    from coopipe.lookup import fewshot_index, fewshot_index_path
    from coopipe.store import open_store

    train_labels = np.array([20] * 5 + [21] + [40] * 3 + [20, 40])  # age 21: one face; ranks 0..19 etc.: none
    val_labels = np.array([20, 21, 40, 40])
    names = list(rank_classnames())
    stores = {}
    for split, labels in (("train", train_labels), ("val", val_labels)):
        feats = np.random.default_rng(0).normal(size=(labels.size, 1, 8)).astype(np.float32)
        for dataset in ("utkface", "toy"):
            stores[dataset, split] = open_store(make_store(tmp_path, model="RN50", weights="w", classnames=names,
                                                           feats=feats, labels=labels, dataset=dataset, split=split))
    index = fewshot_index(tmp_path, "utkface", 4, 1, stores["utkface", "train"])
    splits = {"train": Split(tuple(f"img{i}.jpg" for i in range(train_labels.size)), tuple(train_labels.tolist())),
              "val": Split(tuple(f"img{i}.jpg" for i in range(val_labels.size)), tuple(val_labels.tolist()))}
    drawn = make_few_shot_index(Dataset("utkface", tmp_path, tuple(names), "{}", splits, label_kind="ordinal"), 4, 1)
    assert len(index.train_indices) == 4 + 1 + 4  # K = 4 of age 20, the single face of 21, all 4 of age 40
    assert (index.train_indices, index.val_indices, index.train_order, index.val_order) == \
        (drawn.train_indices, drawn.val_indices, drawn.train_order, drawn.val_order)
    assert fewshot_index_path(tmp_path, "utkface", 4, 1).is_file()
    one = fewshot_index(tmp_path, "utkface", 1, 1, None)  # derived from the recorded 4-shot draw
    assert one.train_indices == make_few_shot_index(Dataset("utkface", tmp_path, tuple(names), "{}", splits, label_kind="ordinal"), 1, 1).train_indices
    with pytest.raises(DatasetError, match="has 0 images but 4 shots"):
        fewshot_index(tmp_path, "toy", 4, 1, stores["toy", "train"])


def test_zeroshot_on_a_test_only_cache(cache: Path, tmp_path: Path, rn50) -> None:
    """A cross-dataset target caches only its test split: zero-shot still scores it, with no constant predictor."""
    import shutil

    from coopipe.jobs.evaluate import run_zeroshot
    from coopipe.store import find_stores

    target = tmp_path / "target_cache" / "utkface"
    target.mkdir(parents=True)
    test_store = find_stores(cache, "utkface", "test")[0].path
    shutil.copytree(test_store, target / test_store.name)
    out = tmp_path / "zs"
    metrics = run_zeroshot(cache_dir=target.parent, dataset="utkface", out_dir=out, clip=rn50)
    assert metrics["constant_mae"] is None and metrics["constant_from"] is None
    full = run_zeroshot(cache_dir=cache, dataset="utkface", out_dir=tmp_path / "zs_full", clip=rn50)
    assert metrics["mae_exp"] == pytest.approx(full["mae_exp"]) and full["constant_mae"] is not None

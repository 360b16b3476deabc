"""A run folder is safe to kill, to share and to trust: diverged training is never complete, a classifier is bound
to its run, every kill point after the final save is completed on re-run, and one writer holds a run at a time."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_toy_cache

from coopipe.baselines import fit_linear_probe
from coopipe.checkpoint import load_checkpoint
from coopipe.checkpoint_files import CLASSIFIER_FILE, META_FILE
from coopipe.classifier import export_classifier, load_classifier
from coopipe.checkpoint_check import record_digest
from coopipe.errors import CheckpointError, LockedError, TrainingDivergedError
from coopipe.jobs.evaluate import run_eval
from coopipe.jobs.train import RUN_LOCK, run_train
from coopipe.locks import exclusive_lock

CLASSES = ["cat", "dog", "sea or lake"]
QUICK = {"max_epoch": 2, "n_ctx": 2, "batch_size": 4}


@pytest.fixture(scope="module")
def cache(rn50, tmp_path_factory) -> Path:
    """Full train (2 views), val and test stores of a 3-class toy dataset with class-dependent features."""
    torch.set_num_threads(1)
    return make_toy_cache(tmp_path_factory.mktemp("cache"), rn50, CLASSES, {"train": (6, 2), "val": (4, 1), "test": (5, 1)})


def _train(cache: Path, out: Path, rn50, **overrides) -> dict:
    return run_train(cache_dir=cache, dataset="toy", shots=2, seed=overrides.pop("seed", 1), out_dir=out,
                     overrides={**QUICK, **overrides}, progress=False, clip=rn50)


def test_diverged_training_stops_and_is_never_marked_complete(cache, rn50, tmp_path):
    run = tmp_path / "nan"
    with pytest.raises(TrainingDivergedError, match=r"diverged at epoch \d .*lower --lr"):
        _train(cache, run, rn50, lr=1e30, max_epoch=4)
    with pytest.raises(TrainingDivergedError, match=r"diverged .*lower --lr"):
        _train(cache, tmp_path / "nan2", rn50, lr=1e30)  # the last step overflows: caught on the final prompt
    assert not (run / META_FILE).exists() or not load_checkpoint(run).complete
    assert not (run / CLASSIFIER_FILE).exists()


def test_classifier_is_bound_to_its_run_and_must_be_finite(cache, rn50, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _train(cache, a, rn50)
    _train(cache, b, rn50, seed=2)
    assert run_eval(a, cache_dir=cache, clip=rn50)["n"] == 15
    shutil.copy(b / CLASSIFIER_FILE, a / CLASSIFIER_FILE)  # same shape, classes and model: another run's
    with pytest.raises(CheckpointError, match="not the classifier of run"):
        run_eval(a, cache_dir=cache, clip=rn50)
    nan = export_classifier(tmp_path / "nan.safetensors", torch.full((3, rn50.embed_dim), float("nan")),
                            classnames=CLASSES, model="RN50", weights=rn50.weights_id, logit_scale=4.6)
    with pytest.raises(CheckpointError, match="non-finite"):
        load_classifier(nan)


def test_every_kill_point_after_the_final_save_is_completed_on_rerun(cache, rn50, tmp_path):
    run = tmp_path / "run"
    first = _train(cache, run, rn50)
    clf = load_classifier(run).text_features
    tsv, summary = (run / "history.tsv").read_text(), json.loads((run / "train.json").read_text())
    # killed after prompt.json, before history.tsv / train.json (or before the classifier was re-exported)
    for lost in (CLASSIFIER_FILE, "history.tsv", "train.json"):
        (run / lost).unlink()
        again = _train(cache, run, rn50)
        assert again["skipped"] and again["final_loss"] == first["final_loss"]
        assert (run / lost).is_file()
    assert torch.allclose(load_classifier(run).text_features, clf, atol=1e-6)
    assert (run / "history.tsv").read_text() == tsv
    assert json.loads((run / "train.json").read_text())["final_loss"] == summary["final_loss"]
    assert run_eval(run, cache_dir=cache, clip=rn50)["n"] == 15


def test_one_writer_per_run_folder(cache, rn50, tmp_path):
    run = tmp_path / "busy"
    with exclusive_lock(run / RUN_LOCK, "test"):  # another `coopipe train --out busy` in progress
        with pytest.raises(LockedError, match="being written by another process"):
            _train(cache, run, rn50)
    assert not (run / META_FILE).exists()
    _train(cache, run, rn50)  # released: the run goes ahead
    assert load_checkpoint(run).complete


def test_degenerate_linear_probe_warns(caplog):
    x = np.ones((12, 8), dtype=np.float32)  # identical features: no C can do better than the majority class
    y = np.repeat(np.arange(3), 4)
    with caplog.at_level(logging.WARNING, logger="coopipe.baselines"):
        probe = fit_linear_probe(x, y, x, y, n_classes=3)
    assert probe.val_accuracy == pytest.approx(1 / 3)
    assert "linear probe is degenerate" in caplog.text and "random weights?" in caplog.text


def test_an_incomplete_run_is_never_evaluated_as_a_result(cache, rn50, tmp_path):
    from coopipe.cli import app
    from coopipe.sweep.plan import RunTask
    from typer.testing import CliRunner

    run = tmp_path / "killed"
    _train(cache, run, rn50, max_epoch=3)
    meta = json.loads((run / META_FILE).read_text())
    meta.update(complete=False, epoch=1)  # what a kill after the first epoch's save leaves
    meta["record_sha256"] = record_digest(meta)
    (run / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"incomplete \(trained 1 of 3 epochs.*re-run the same `coopipe train`"):
        run_eval(run, cache_dir=cache, clip=rn50)
    assert not (run / "metrics.json").exists()
    res = CliRunner().invoke(app, ["eval", str(run), "--features", str(cache)])
    assert res.exit_code == 1 and "incomplete" in res.output and len(res.output.strip().splitlines()) == 1
    task = RunTask("coop", "toy", str(run), "coop toy", (str(run / "metrics.json"),), 1.0)
    try:
        metrics = run_eval(run, cache_dir=cache, clip=rn50, allow_incomplete=True)
    except CheckpointError as exc:  # an incomplete run may hold no classifier bound to it: also never a result
        assert "classifier" in str(exc)
    else:
        assert metrics["incomplete"] is True and json.loads((run / "metrics.json").read_text())["incomplete"]
    assert not task.finished()  # a sweep runs it again

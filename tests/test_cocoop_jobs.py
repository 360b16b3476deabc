"""CoCoOp through the jobs: train, resume/skip, evaluate (batched per-image text passes), base-to-new and transfer,
on a toy cache; CSC prompts cannot transfer (a clear error)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_toy_cache

from coopipe.checkpoint import load_checkpoint
from coopipe.checkpoint_files import CLASSIFIER_FILE
from coopipe.errors import CheckpointError
from coopipe.jobs.evaluate import run_eval
from coopipe.jobs.train import run_train

CLASSES = ["cat", "dog", "sea or lake", "forest"]


@pytest.fixture(scope="module")
def cache(rn50, tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_toy_cache(tmp_path_factory.mktemp("cache"), rn50, CLASSES, {"train": (4, 2), "val": (2, 1), "test": (3, 1)})


def _train(cache, out, rn50, **kw):
    classes = kw.pop("classes", "all")
    return run_train(cache_dir=cache, dataset="toy", shots=2, seed=1, out_dir=out, progress=False, clip=rn50,
                     classes=classes, overrides={"max_epoch": 2, "batch_size": 4, **kw})


def test_cocoop_trains_resumes_and_evaluates(cache, rn50, tmp_path):
    run = tmp_path / "cocoop"
    summary = _train(cache, run, rn50, method="cocoop")
    ckpt = load_checkpoint(run)
    assert summary["method"] == "cocoop" and ckpt.method.image_conditional and ckpt.complete
    assert set(ckpt.learner_tensors) >= {"ctx", "meta_net.linear1.weight", "meta_net.linear2.bias"}
    assert not (run / CLASSIFIER_FILE).exists()  # image-conditional: no single classifier
    assert _train(cache, run, rn50, method="cocoop")["skipped"]
    metrics = run_eval(run, cache_dir=cache, clip=rn50)
    assert metrics["method"] == "cocoop" and metrics["n"] == 12 and metrics["epochs"] == 2
    assert metrics["paper_epochs"] == 10 and "2 epochs (paper 10)" in metrics["departures"]


def test_base_to_new_and_transfer_for_unified_prompts_only(cache, rn50, tmp_path):
    for method in ("cocoop", "coop"):
        run = tmp_path / method
        _train(cache, run, rn50, method=method, classes="base", n_ctx=2)
        base = run_eval(run, cache_dir=cache, clip=rn50)
        new = run_eval(run, cache_dir=cache, classes="new", clip=rn50)
        assert (base["classes"], base["n"], new["classes"], new["n"]) == ("base", 6, "new", 6)
        assert set(new["per_class_accuracy"]) == {"sea or lake", "forest"}
    csc = tmp_path / "csc"
    _train(cache, csc, rn50, csc=True, n_ctx=2, classes="base")
    with pytest.raises(CheckpointError, match="class-specific context"):
        run_eval(csc, cache_dir=cache, classes="new", clip=rn50)

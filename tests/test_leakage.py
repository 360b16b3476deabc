"""No method's fit reads the test split, by construction: every registered method (whatever developers add to the
registry is covered) trains through the job (:func:`coopipe.jobs.train.run_train`) to the very same tensors,
history and validation accuracies on a cache whose test store is intact, poisoned (NaN features, every label
wrong) or absent; and what a method's ``prepare`` sees (:class:`coopipe.learners.FitData`) holds the training
and few-shot validation splits only."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_store, make_toy_cache

from coopipe.checkpoint import load_checkpoint
from coopipe.learners import FitData
from coopipe.methods import get_method, method_names

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["20", "30", "40"]  # ranks, so that ordinal methods train too
SIZES = {"train": (3, 2), "val": (2, 1)}


@pytest.fixture(scope="module")
def caches(rn50, tmp_path_factory) -> dict[str, Path]:
    """The same training and validation stores with the test store intact, poisoned, or absent."""
    root = tmp_path_factory.mktemp("leak")
    absent = make_toy_cache(root / "absent", rn50, CLASSES, SIZES)
    intact = root / "intact"
    shutil.copytree(absent, intact)
    make_toy_cache(intact, rn50, CLASSES, {"test": (2, 1)})
    poisoned = root / "poisoned"
    shutil.copytree(absent, poisoned)
    n = 2 * len(CLASSES)
    make_store(poisoned, model=rn50.name, weights=rn50.weights_id, classnames=CLASSES,
               feats=np.full((n, 1, rn50.embed_dim), np.nan, dtype=np.float32),
               labels=(np.repeat(np.arange(len(CLASSES)), 2) + 1) % len(CLASSES), split="test")  # every label wrong
    return {"intact": intact, "poisoned": poisoned, "absent": absent}


def _train(cache: Path, out: Path, method: str, clip) -> None:
    from coopipe.jobs.train import run_train
    from coopipe.methods import get_method

    epochs = {"max_epoch": 1} if get_method(method).trains else {}  # a training-free method has 0 epochs
    run_train(cache_dir=cache, dataset="toy", shots=2, seed=1, out_dir=out, progress=False, clip=clip,
              overrides={"method": method, **epochs})


def test_fit_data_holds_no_test_split():
    names = {f.name for f in dataclasses.fields(FitData)}
    assert names == {"train_feats", "train_labels", "val_feats", "val_labels", "classnames", "template", "clip",
                     "logit_scale", "dataset", "ordinal"}  # dataset: its name only (a method's per-dataset setting)
    assert not any("test" in name for name in names)


@pytest.mark.parametrize("method", method_names())
def test_training_is_blind_to_the_test_split(caches, rn50, tmp_path, monkeypatch, method):
    """One epoch per cache: about 1-3 s per method on 2 shared cores."""
    definition = get_method(method)
    seen: list[FitData] = []
    prepare = definition.prepare

    def spy(learner, data: FitData) -> None:
        seen.append(data)
        prepare(learner, data)

    monkeypatch.setattr(definition, "prepare", spy)
    runs = {}
    for name, cache in caches.items():
        _train(cache, tmp_path / name, method, rn50)
        runs[name] = load_checkpoint(tmp_path / name)
    reference = runs["intact"]
    assert reference.complete and (not definition.trains or reference.history[-1].val_acc is not None)  # 0 epochs: none
    for name, ckpt in runs.items():
        assert ckpt.learner_tensors.keys() == reference.learner_tensors.keys(), name
        for key, tensor in reference.learner_tensors.items():
            assert torch.equal(tensor, ckpt.learner_tensors[key]), (name, key)
        assert [(r.loss, r.train_acc, r.val_acc) for r in ckpt.history] == [
            (r.loss, r.train_acc, r.val_acc) for r in reference.history], name
    assert len(seen) == len(caches)
    for data in seen:  # the few-shot training draw (2 per class) and the validation split, nothing else
        if not definition.fewshot:  # zero-shot CLIP reads no image at all, only the class names
            assert data.train_feats.shape[0] == 0 and data.val_feats is None
            continue
        assert data.train_feats.shape[0] == 2 * len(CLASSES) and bool(torch.isfinite(data.train_feats).all())
        assert data.val_feats is not None and data.val_feats.shape[0] == SIZES["val"][0] * len(CLASSES)
        assert int(data.train_labels.max()) < len(CLASSES) and int(data.val_labels.max()) < len(CLASSES)

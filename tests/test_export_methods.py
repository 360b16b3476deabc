"""`coopipe export` and `coopipe predict` of every registered method (the registry's list, so a method added later
is covered): the exported folder predicts on the test store what the run predicts and what `coopipe eval` scored
(its accuracy and loss), and its model card names the method's own paper and head, never another method's.

Each run is one epoch (none for a training-free method) on a toy cache of 3 classes with random RN50 weights."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from conftest import make_toy_cache

from coopipe.export import CARD_FILE, RECORD_FILE, export_run
from coopipe.jobs.evaluate import run_eval
from coopipe.jobs.train import run_train
from coopipe.methods import get_method, method_names
from coopipe.predict import predict
from coopipe.store import find_stores

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["cat", "dog", "sea or lake"]
RANKS = [str(a) for a in range(20, 24)]  # an ordered-label method's classes are ranks (ages)
SIZES = {"train": (2, 2), "val": (1, 1), "test": (3, 1)}


@pytest.fixture(scope="module")
def caches(rn50, tmp_path_factory) -> dict[bool, Path]:
    """A toy cache by whether its classes are ordered ranks."""
    base = tmp_path_factory.mktemp("caches")
    return {False: make_toy_cache(base / "toy", rn50, CLASSES, SIZES),
            True: make_toy_cache(base / "ranks", rn50, RANKS, SIZES)}


@pytest.mark.parametrize("name", method_names())
def test_export_predicts_what_eval_scored(name, caches, rn50, tmp_path):
    method = get_method(name)
    cache = caches[method.ordered_labels]
    run = tmp_path / "run"
    overrides = {"method": name, "max_epoch": 1 if method.trains else 0, "batch_size": 4}
    if "n_ctx" in {f.name for f in dataclasses.fields(method.options)}:
        overrides["n_ctx"] = 4  # a short context (ProGrad's template init needs 4 tokens): a cheaper text pass
    run_train(cache_dir=cache, dataset="toy", shots=2, seed=1, out_dir=run, progress=False, clip=rn50,
              overrides=overrides)
    metrics = run_eval(run, cache_dir=cache, clip=rn50)
    folder = export_run(run, tmp_path / "export", clip=rn50).path

    store = find_stores(cache, "toy", "test")[0]
    from_export = predict(folder, store=store.path, topk=len(store.classnames()), clip=rn50)
    assert from_export == predict(run, store=store.path, topk=len(store.classnames()), clip=rn50)
    labels = store.labels()
    assert len(from_export) == len(labels)
    hits = [p.indices[0] == int(y) for p, y in zip(from_export, labels)]
    assert sum(hits) / len(hits) == pytest.approx(metrics["accuracy"], abs=1e-12)
    nll = [-math.log(dict(zip(p.indices, p.probs))[int(y)]) for p, y in zip(from_export, labels)]
    if method.predicts_ages:  # the ridge probe: its logits only pick the rank nearest an age, no loss is scored
        assert metrics["loss"] is None
    else:
        assert sum(nll) / len(nll) == pytest.approx(metrics["loss"], rel=1e-5, abs=1e-6)

    record = json.loads((folder / RECORD_FILE).read_text())
    card = (folder / CARD_FILE).read_text()
    assert record["image_conditional"] == method.image_conditional
    assert (method.paper or method.title) in card and f"{method.learned} for RN50" in card
    if method.image_conditional:  # the method's own account of its head, in the record and the card
        assert record["inference"] == method.inference and method.head_tensors in card
    else:
        assert "classifier.safetensors" in record["inference"]
    assert ("Meta-Net" in card) == (name == "cocoop")
    # a method's own departures reach the card: the toy dataset has no published Tip-Adapter setting
    assert ("toy has no published setting" in card) == name.startswith("tipadapter")
    assert ("setting of configs/imagenet.yaml" in card) == name.startswith("tipadapter")  # the one it used
    listed = card.split("## Departures from the paper's setting")[1].split("## How to use it")[0].split("\n- ")[1:]
    assert "random weights" in card and len(listed) == len(set(listed))  # each departure once
    assert ("trained 1 epochs" in card) == method.trains and "=None" not in card


def test_each_method_credits_its_own_paper():
    """A method inheriting another's (KgCoOp and ProGrad are CoOp's subclasses) states its own paper and, when
    image-conditional, its own inference: no card credits or describes another method."""
    papers = [get_method(name).paper for name in method_names()]
    assert all(papers) and len(set(papers)) == len(papers)
    conditional = [get_method(name).inference for name in method_names() if get_method(name).image_conditional
                   and name != "tipadapterf"]  # Tip-Adapter-F's head is Tip-Adapter's
    assert len(set(conditional)) == len(conditional)

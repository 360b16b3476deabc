"""The baselines are methods: zero-shot CLIP, prompt ensembling, the linear probe and the ridge probe run through the
sweep as registered methods (a run folder, a checkpoint, ``eval``) and give exactly the numbers of their closed forms
computed here independently on the same cached tensors (the jobs' former code path: one template's or the
ensemble's text features, sklearn's probe with the same C search, the ridge SVD).

Toy stores (no encoding, RN50 with random weights): 3 classes of class-dependent features, and 6 ages for the age
metrics (an ``utkface`` store of ranks 20..25).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_store, make_toy_cache

from coopipe.compat import import_open_clip
from coopipe.baselines import dataset_template, fit_linear_probe, zero_shot_classifier
from coopipe.datasets.ages import AGE_TEMPLATE, rank_values
from coopipe.datasets.fewshot import FewShotIndex
from coopipe.evaluate import evaluate_classifier
from coopipe.features import read_split, select_store
from coopipe.lookup import fewshot_index_path
from coopipe.learners import FitData
from coopipe.methods import MethodSpec, get_method
from coopipe.methods.zeroshot import TEMPLATE_SEP
from coopipe.ordinal import evaluate_ages
from coopipe.regression import AGE_TEMPLATES, fit_rank_linear_probe, fit_ridge_probe
from coopipe.sweep import SweepSpec, plan_sweep, run_sweep
from coopipe.sweep.plan import RunSettings

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["cat", "dog", "sea or lake"]
AGES = [str(a) for a in range(20, 26)]


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _split(cache: Path, dataset: str, split: str, clip, positions=None):
    store = select_store(cache, dataset, split, model=clip.name, weights=clip.weights_id, positions=positions)
    return read_split(store, positions, all_views=False)


def _draw(cache: Path, dataset: str, clip, shots: int, seed: int):
    index = FewShotIndex.load(fewshot_index_path(cache, dataset, shots, seed))
    return (_split(cache, dataset, "train", clip, index.train_indices),
            _split(cache, dataset, "val", clip, index.val_indices))


def _sweep(cache: Path, runs: Path, dataset: str, **spec) -> None:
    settings = RunSettings(cache=str(cache), pretrained="none")
    plan = plan_sweep(SweepSpec(datasets=(dataset,), encode=False, runs=str(runs), settings=settings, **spec))
    out = run_sweep(plan, scheduler="inline", progress=False, jobs=1)
    assert out.count("failed") == 0, [r.detail() for r in out.results]


@pytest.mark.slow  # two sweeps (a linear probe's C search, three runs): minutes on 2 cores shared by other work
def test_classification_baselines_through_the_sweep_match_their_closed_forms(rn50, tmp_path: Path) -> None:
    cache = make_toy_cache(tmp_path / "cache", rn50, CLASSES, {"train": (4, 2), "val": (3, 1), "test": (5, 1)})
    runs = tmp_path / "runs"
    _sweep(cache, runs, "toy", fewshot=False, zeroshot=True, linear_probe=True, shots=(2,), seeds=(1,))
    test = _split(cache, "toy", "test", rn50)
    scale = rn50.model.logit_scale.detach().cpu()

    zero = _metrics(runs / "toy" / "zeroshot")
    text = zero_shot_classifier(rn50, test.classnames, dataset_template("toy"))
    expected = evaluate_classifier(text, test.center, test.labels, scale)
    assert zero["method"] == "zeroshot" and zero["shots"] == 0 and zero["seed"] is None and zero["epochs"] == 0
    assert zero["accuracy"] == expected.accuracy and zero["templates"] == ["a photo of a {}."]
    assert zero["per_class_accuracy"] == expected.to_dict(test.classnames)["per_class_accuracy"]

    probe = _metrics(runs / "toy" / "linear_probe" / "shots2_seed1")
    train, val = _draw(cache, "toy", rn50, 2, 1)
    fitted = fit_linear_probe(train.center, train.labels, val.center, val.labels, n_classes=len(CLASSES))
    assert probe["method"] == "linear_probe" and probe["epochs"] == 0 and (probe["shots"], probe["seed"]) == (2, 1)
    assert probe["C"] == fitted.C and probe["val_accuracy"] == fitted.val_accuracy
    assert probe["accuracy"] == fitted.evaluate(test.center, test.labels).accuracy
    assert (runs / "toy" / "linear_probe" / "shots2_seed1" / "prompt.json").is_file()  # a run like any method's

    # base-to-new: zero-shot's head is rebuilt for the new classes from the dataset's template
    _sweep(cache, runs, "toy", fewshot=False, base2new=True, zeroshot=True, shots=(2,), seeds=(1,))
    half = json.loads((runs / "toy" / "base2new" / "zeroshot" / "metrics_new.json").read_text())
    new = test.classnames[2:]  # the sorted classes' second half
    rows = test.labels >= 2
    expected_new = evaluate_classifier(zero_shot_classifier(rn50, new, dataset_template("toy")), test.center[rows],
                                       test.labels[rows] - 2, scale)
    assert half["accuracy"] == expected_new.accuracy and half["classes"] == "new"


def test_methods_all_runs_each_baseline_once(tmp_path: Path) -> None:
    """``--methods all --zeroshot --linear-probe`` (methods_grid.sh): each baseline once; ``--no-zeroshot`` and no
    ``--linear-probe`` leave them out; a baseline named in --methods and asked by its flag runs once too."""
    spec = SweepSpec(datasets=("eurosat",), all_methods=True, methods=(), zeroshot=True, linear_probe=True,
                     shots=(1, 2), seeds=(1, 2), encode=False, runs=str(tmp_path))
    runs = [t.run_dir for t in plan_sweep(spec).tasks]
    assert len(runs) == len(set(runs))
    methods = [t.method.label() for t in plan_sweep(spec).tasks]
    assert methods.count("zeroshot") == 1 and methods.count("linear_probe") == 4 and "ridge" not in methods
    assert "coop" in methods and "tipadapter" in methods
    bare = [t.method.method for t in plan_sweep(dataclasses.replace(spec, zeroshot=False, linear_probe=False)).tasks]
    assert "zeroshot" not in bare and "linear_probe" not in bare
    named = SweepSpec(datasets=("eurosat",), methods=(MethodSpec("linear_probe"), MethodSpec("zeroshot")),
                      linear_probe=True, zeroshot=True, shots=(1,), seeds=(1,), encode=False, runs=str(tmp_path))
    assert sorted(t.label for t in plan_sweep(named).tasks) == ["linear_probe eurosat 1-shot seed 1",
                                                                "zeroshot eurosat"]
    assert MethodSpec.parse("zeroshot_ensemble") == MethodSpec.of("zeroshot", ensemble=True)


@pytest.mark.slow  # a 7-prompt ensemble and three fits: about 15 s on 2 busy cores
def test_age_baselines_through_the_sweep_match_their_closed_forms(rn50, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    g = np.random.default_rng(1)
    means = g.normal(size=(len(AGES), rn50.embed_dim)).astype(np.float32)
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        labels = np.repeat(np.arange(len(AGES)), n)
        feats = means[labels][:, None] + 0.8 * g.normal(size=(len(labels), 1, rn50.embed_dim)).astype(np.float32)
        make_store(cache, model=rn50.name, weights=rn50.weights_id, classnames=AGES, feats=feats, labels=labels,
                   dataset="utkface", split=split)
    runs = tmp_path / "runs"
    _sweep(cache, runs, "utkface", fewshot=False, zeroshot=True, linear_probe=True, ridge=True, shots=(2,), seeds=(1,))
    test = _split(cache, "utkface", "test", rn50)
    values = rank_values(AGES)
    scale = rn50.model.logit_scale.detach().cpu()
    all_train = _split(cache, "utkface", "train", rn50)

    for folder, templates in (("zeroshot", [AGE_TEMPLATE]), ("zeroshot_ensemble", list(AGE_TEMPLATES))):
        got = _metrics(runs / "utkface" / folder)
        text = zero_shot_classifier(rn50, AGES, templates)
        logits = torch.nn.functional.normalize(test.center, dim=-1) @ text.t() * scale.exp()
        expected = evaluate_ages(logits, test.labels, values)
        assert got["method"] == folder and got["templates"] == templates
        assert got["accuracy"] == evaluate_classifier(text, test.center, test.labels, scale).accuracy
        assert got["mae_exp"] == pytest.approx(expected.mae_exp, abs=1e-5) and got["mae_max"] == expected.mae_max
        assert got["constant_median"] == np.median(values[all_train.labels.numpy()])  # every cached train image

    train, val = _draw(cache, "utkface", rn50, 2, 1)
    rank = fit_rank_linear_probe(train.center, train.labels, val.center, val.labels, values)
    probe = _metrics(runs / "utkface" / "linear_probe" / "shots2_seed1")
    expected = rank.evaluate(test.center, test.labels)
    assert probe["C"] == rank.C and probe["val_mae"] == rank.val_mae
    assert probe["mae_exp"] == pytest.approx(expected.mae_exp, abs=1e-9) and probe["mae_max"] == expected.mae_max
    assert probe["constant_median"] == np.median(values[train.labels.numpy()])  # the draw's

    ridge = fit_ridge_probe(train.center, values[train.labels.numpy()], val.center, values[val.labels.numpy()],
                            age_range=(float(values.min()), float(values.max())))
    got = _metrics(runs / "utkface" / "ridge" / "shots2_seed1")
    expected = ridge.evaluate(test.center, values[test.labels.numpy()])
    assert got["alpha"] == ridge.alpha and got["val_mae"] == ridge.val_mae
    assert got["mae_exp"] == expected.mae_exp and got["mae_max"] == expected.mae_max
    rounded = np.searchsorted(values, expected.pred_max)
    assert got["accuracy"] == float((rounded == test.labels.numpy()).mean())


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -logits.log_softmax(dim=-1)[torch.arange(len(labels)), labels].mean()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_baseline_logits_and_loss_follow_their_closed_forms(rn50) -> None:
    """In float64: zero-shot's head is CLIP's text features of the prompts (one prompt, or each prompt's normalised
    features averaged and renormalised) and its logits CLIP's scaled cosine; the linear probe's logits are sklearn's
    decision scores of its chosen C; the ridge probe's are minus each rank's distance to the rounded clipped age.
    The references are written here from open_clip's text tower, sklearn's classifier and the ridge's coefficients."""
    g = torch.Generator().manual_seed(3)
    dim, names = int(rn50.embed_dim), CLASSES
    image = torch.randn(6, dim, generator=g, dtype=torch.float64)
    y = torch.arange(6) % len(names)
    scale = rn50.model.logit_scale.detach().double()

    def fit_data(feats, labels, val, classnames, *, ordinal=False) -> FitData:
        return FitData(train_feats=feats, train_labels=labels, val_feats=val[0], val_labels=val[1],
                       classnames=tuple(classnames), template="a photo of a {}.", clip=rn50,
                       logit_scale=rn50.model.logit_scale.detach(), ordinal=ordinal)

    for templates in (["a photo of a {}."], ["a photo of a {}.", "a sketch of the {}."]):
        spec = MethodSpec.of("zeroshot", templates=TEMPLATE_SEP.join(templates) if len(templates) > 1 else None)
        learner = spec.build_learner(rn50, names, generator=None)
        spec.definition.prepare(learner, fit_data(image[:0, None], y[:0], (None, None), names))
        with torch.no_grad():
            text = rn50.model.encode_text(import_open_clip().tokenize([t.format(c) for t in templates for c in names])).double()
        text = F.normalize(F.normalize(text, dim=-1).view(len(templates), len(names), dim).mean(0), dim=-1)
        torch.testing.assert_close(learner.head.double(), text, atol=2e-6, rtol=0)  # a float32 head
        learner = learner.double()
        logits = learner.logits(None, image, scale)
        ref = scale.exp() * F.normalize(image, dim=-1) @ learner.head.t()
        torch.testing.assert_close(logits, ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(learner.loss(logits, y), _cross_entropy(ref, y), atol=1e-12, rtol=1e-12)

    means = torch.randn(len(names), dim, generator=g)
    train_labels, val_labels = torch.arange(9) % len(names), torch.arange(6) % len(names)
    train = means[train_labels] + torch.randn(9, dim, generator=g)
    val = means[val_labels] + torch.randn(6, dim, generator=g)
    learner = MethodSpec.of("linear_probe").build_learner(rn50, names, generator=None)
    get_method("linear_probe").finish(learner, fit_data(train[:, None], train_labels, (val, val_labels), names))
    fitted = fit_linear_probe(train, train_labels, val, val_labels, n_classes=len(names))
    assert float(learner.C) == fitted.C
    ref = torch.from_numpy(fitted.classifier.decision_function(_unit(train.double().numpy())))  # sklearn's scores
    logits = learner.logits(None, train, scale)
    torch.testing.assert_close(logits, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(learner.loss(logits, train_labels), _cross_entropy(ref, train_labels), atol=1e-12,
                               rtol=1e-12)

    values = rank_values(AGES).astype(np.float64)
    ranks = torch.randn(len(AGES), dim, generator=g)
    train_labels, val_labels = torch.arange(12) % len(AGES), torch.arange(6) % len(AGES)
    train = ranks[train_labels] + torch.randn(12, dim, generator=g)
    val = ranks[val_labels] + torch.randn(6, dim, generator=g)
    learner = MethodSpec.of("ridge").build_learner(rn50, AGES, generator=None)
    get_method("ridge").finish(learner, fit_data(train[:, None], train_labels, (val, val_labels), AGES, ordinal=True))
    ridge = fit_ridge_probe(train, values[train_labels.numpy()], val, values[val_labels.numpy()],
                            age_range=(values.min(), values.max()))
    assert float(learner.alpha) == ridge.alpha
    ages = np.clip(_unit(image.numpy()) @ ridge.coef + ridge.intercept, values.min(), values.max())
    ref = torch.from_numpy(-np.abs(values[None, :] - np.floor(ages + 0.5)[:, None]))
    labels = torch.arange(6) % len(AGES)
    logits = learner.logits(None, image, scale)
    np.testing.assert_allclose(learner.predict_ages(image), ages, atol=1e-12, rtol=0)
    torch.testing.assert_close(logits, ref, atol=0, rtol=0)
    torch.testing.assert_close(learner.loss(logits, labels), _cross_entropy(ref, labels), atol=1e-12, rtol=1e-12)

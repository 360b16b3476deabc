"""Age estimation in the evaluation jobs: MAE (both decodings), CS(1..10), accuracy within +-1/3/5 years, the
constant predictor beside every number, predictions for the predicted-vs-true plot, and the age baselines.

Why a module of its own: the classification jobs (:mod:`coopipe.jobs.evaluate`) stay as they are and call in here
with a one-line ``if is_age_dataset(...)`` branch; everything that knows about ages lives here.

Every age ``metrics.json`` keeps the classification fields (accuracy = exact-age accuracy) and adds
``mae_exp``/``mae_max``, ``cs_exp``/``cs_max``, ``within_{1,3,5}_{exp,max}``, ``constant_mae`` (the MAE of the
constant predictor answering the median age of the train images the method saw: the few-shot draw for a
few-shot method, every cached train image for zero-shot), ``constant_median`` and ``constant_from``, and a
``predictions.csv`` (path, true age, both decodings) beside it.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coopipe.baselines import zero_shot_classifier
from coopipe.datasets.ages import AGE_TEMPLATE, rank_values
from coopipe.datasets.fewshot import FewShotIndex
from coopipe.errors import StoreError
from coopipe.evaluate import Evaluation, classifier_logits, evaluate_predictions
from coopipe.features import SplitFeatures, read_split, select_store
from coopipe.atomic import write_json, write_text
from coopipe.lookup import fewshot_index, infer_model
from coopipe.models import LoadedClip
from coopipe.ordinal import AgeEvaluation, evaluate_ages, median_predictor_mae
from coopipe.regression import AGE_TEMPLATES, fit_rank_linear_probe, fit_ridge_probe
from coopipe.store import FeatureStore, find_stores

logger = logging.getLogger(__name__)

__all__ = [
    "PREDICTIONS_FILE",
    "age_fields",
    "age_templates",
    "constant_fields",
    "describe_age_metrics",
    "run_age_linear_probe",
    "run_age_zeroshot",
    "run_ridge_probe",
    "train_draw_ages",
    "write_predictions",
]

PREDICTIONS_FILE = "predictions.csv"


# ---------------------------------------------------------------- pieces every age job shares
def age_fields(evaluation: AgeEvaluation) -> dict[str, Any]:
    """The age metrics of ``evaluation`` for a metrics file (its ``n``/``loss`` are the classification ones)."""
    data = evaluation.to_dict()
    data.pop("n", None)
    data.pop("loss", None)
    return data


def constant_fields(train_ages: np.ndarray, test_ages: np.ndarray, source: str) -> dict[str, Any]:
    """``constant_mae`` (the train-median predictor's MAE on the test ages), the median and where it came from."""
    return {
        "constant_mae": median_predictor_mae(train_ages, test_ages),
        "constant_median": float(np.median(train_ages)),
        "constant_from": source,
    }


def write_predictions(path: str | os.PathLike[str], paths: Sequence[str], evaluation: AgeEvaluation) -> Path:
    """``path,true_age,pred_exp,pred_max`` per test image (atomic): the data of the predicted-vs-true plot."""
    path = Path(path)
    if len(paths) != evaluation.n:
        raise StoreError(f"{len(paths)} image paths but {evaluation.n} predictions; re-encode the test store")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["path", "true_age", "pred_exp", "pred_max"])
    for p, t, e, m in zip(paths, evaluation.true, evaluation.pred_exp, evaluation.pred_max):
        writer.writerow([p, f"{t:g}", f"{e:.4f}", f"{m:g}"])
    return write_text(path, buf.getvalue())


def split_paths(test: SplitFeatures) -> list[str]:
    """Image paths of the rows ``read_split(store)`` read (every valid row, in store order)."""
    store = test.store
    return [str(p) for p in store.paths()[np.flatnonzero(store.valid())]]


NO_CONSTANT: dict[str, Any] = {"constant_mae": None, "constant_median": None, "constant_from": None}  # not computable


def train_draw_ages(cache_dir: str | os.PathLike[str], index: FewShotIndex, *, model: str, weights: str,
                    classnames: Sequence[str]) -> np.ndarray:
    """Ages (years) of a few-shot draw's train images, read from a train store holding them (no features read)."""
    store = select_store(cache_dir, index.dataset, "train", model=model, weights=weights, positions=index.train_indices)
    return rank_values(classnames)[store.labels()[store.rows_for(index.train_indices)]]


def cached_train_ages(cache_dir: str | os.PathLike[str], dataset: str, *, model: str, weights: str,
                      classnames: Sequence[str]) -> tuple[np.ndarray, str]:
    """Ages of every cached train image of ``dataset`` (the store holding most rows) and its description."""
    stores = find_stores(cache_dir, dataset, "train", model=model, weights=weights)
    if not stores:
        raise StoreError(f"no train features of {dataset} under {cache_dir} for the constant predictor; "
                         f"run `coopipe encode --dataset {dataset} ...` first")
    store: FeatureStore = max(stores, key=lambda s: int(s.valid().sum()))
    labels = store.labels()[store.valid()]
    what = "all train images" if store.provenance.get("rows", "all") == "all" else "the cached train images"
    return rank_values(classnames)[labels], f"{what} ({labels.size}, {store.path.name})"


def age_templates(templates: Sequence[str] | None, ensemble: bool) -> list[str]:
    """The zero-shot prompts of an age dataset: given ones, else :data:`AGE_TEMPLATES` (ensemble) or the age prompt."""
    if templates:
        return list(templates)
    return list(AGE_TEMPLATES) if ensemble else [AGE_TEMPLATE]


def _classification(logits: torch.Tensor | np.ndarray, labels: torch.Tensor, n_classes: int) -> Evaluation:
    """Exact-age accuracy and friends from rank logits (kept beside the age metrics)."""
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64) if isinstance(logits, np.ndarray) else logits)
    return evaluate_predictions(labels, z.argmax(dim=-1), n_classes)


def _write(out_dir: Path, metrics: dict[str, Any], paths: Sequence[str], evaluation: AgeEvaluation,
           filename: str = "metrics.json") -> dict[str, Any]:
    write_predictions(out_dir / PREDICTIONS_FILE, paths, evaluation)
    write_json(out_dir / filename, metrics)
    constant = metrics.get("constant_mae")
    logger.info("%s: MAE %.2f (exp) / %.2f (max) years, constant predictor %s", out_dir, metrics["mae_exp"],
                metrics["mae_max"], "n/a" if constant is None else f"{constant:.2f}")
    return metrics


def _class_metrics(evaluation: Evaluation, classnames: Sequence[str]) -> dict[str, Any]:
    data = evaluation.to_dict(classnames)
    data.pop("confusion", None)  # 101 x 101 ranks: not for a metrics file
    return data


def describe_age_metrics(metrics: dict[str, Any]) -> list[str]:
    """Lines a command prints for age metrics (none for other metrics): MAE both ways, CS(5), constant."""
    if "mae_exp" not in metrics:
        return []
    within = ", ".join(f"{100 * metrics[f'within_{y}_exp']:.1f}%" for y in (1, 3, 5))
    lines = [f"  MAE {metrics['mae_exp']:.2f} years (expectation) / {metrics['mae_max']:.2f} (arg-max); within "
             + f"±1/3/5 years {within}"]
    if metrics.get("constant_mae") is not None:
        lines.append(f"  constant predictor (median {metrics['constant_median']:g} of {metrics['constant_from']}): "
                     f"MAE {metrics['constant_mae']:.2f} years")
    return lines


# ---------------------------------------------------------------- run_eval's age branch
def trained_run_age_metrics(
    *,
    cache_dir: str | os.PathLike[str],
    dataset: str,
    shots: int | None,
    seed: int | None,
    logits: torch.Tensor,
    test: SplitFeatures,
    model: str,
    weights: str,
) -> tuple[dict[str, Any], AgeEvaluation, list[str]]:
    """Age metrics of a trained prompt's logits (N, K) on ``test``; the constant from the run's few-shot draw."""
    evaluation = evaluate_ages(logits, test.labels, rank_values(test.classnames))
    try:
        if shots is None or seed is None:
            raise StoreError("the run records no few-shot draw")
        index = fewshot_index(Path(cache_dir), dataset, shots, seed, None)
        train_ages = train_draw_ages(cache_dir, index, model=model, weights=weights, classnames=test.classnames)
        source = f"the {shots}-shot train draw, seed {seed} ({train_ages.size} images)"
    except StoreError as exc:  # the draw is not cached here: fall back on every cached train image
        logger.warning("constant predictor: %s; using the cached train images", exc)
        try:
            train_ages, source = cached_train_ages(cache_dir, dataset, model=model, weights=weights,
                                                   classnames=test.classnames)
        except StoreError as again:  # e.g. a store given explicitly, no cache: the metrics stand without it
            logger.warning("no constant predictor beside the metrics: %s", again)
            return ({**age_fields(evaluation), **NO_CONSTANT},
                    evaluation, split_paths(test))
    fields = {**age_fields(evaluation), **constant_fields(train_ages, evaluation.true, source)}
    return fields, evaluation, split_paths(test)


# ---------------------------------------------------------------- zero-shot
def run_age_zeroshot(
    *,
    cache_dir: str | os.PathLike[str],
    dataset: str,
    out_dir: str | os.PathLike[str],
    clip: LoadedClip,
    ensemble: bool = False,
    templates: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Zero-shot age estimation (the age prompt) or prompt ensembling over :data:`AGE_TEMPLATES` on the test store."""
    store = select_store(cache_dir, dataset, "test", model=clip.name, weights=clip.weights_id)
    test = read_split(store, all_views=False)
    chosen = age_templates(templates, ensemble)
    weights = zero_shot_classifier(clip, test.classnames, chosen)  # (K, D)
    logits = classifier_logits(weights, test.center, clip.model.logit_scale.detach().cpu())  # (N, K)
    evaluation = evaluate_ages(logits, test.labels, rank_values(test.classnames))
    try:
        train_ages, source = cached_train_ages(cache_dir, dataset, model=clip.name, weights=clip.weights_id,
                                               classnames=test.classnames)
        constant = constant_fields(train_ages, evaluation.true, source)
    except StoreError as exc:  # only the test split is cached (a cross-dataset target): the metrics stand without it
        logger.warning("no constant predictor beside the zero-shot metrics: %s", exc)
        constant = dict(NO_CONSTANT)
    metrics = {
        "method": "zeroshot_ensemble" if len(chosen) > 1 else "zeroshot", "dataset": dataset, "shots": 0,
        "seed": None, "model": clip.name, "weights": clip.weights_id, "templates": chosen, "store": str(store.path),
        "classes": "all", **_class_metrics(_classification(logits, test.labels, len(test.classnames)), test.classnames),
        **age_fields(evaluation), **constant,
    }
    return _write(Path(out_dir), metrics, split_paths(test), evaluation)


# ---------------------------------------------------------------- probes on the few-shot features
def _probe_data(cache_dir: Path, dataset: str, shots: int, seed: int, model: str | None,
                weights: str | None) -> tuple[str, str, SplitFeatures, SplitFeatures, SplitFeatures, FewShotIndex]:
    """(model, weights, train, val, test) centre-view features of the (shots, seed) draw; no model is loaded."""
    if model is None:
        model, weights = infer_model(cache_dir, dataset)
    elif weights is None:  # the weights of this model's cached features (one set, or say which to pick)
        found = sorted({s.provenance["weights"] for s in find_stores(cache_dir, dataset, "train", model=model)})
        if len(found) != 1:
            raise StoreError(f"{cache_dir} holds {len(found)} sets of {model} train features for {dataset} "
                             f"({', '.join(found) or 'none'}); " + ("pick one with --pretrained" if found else
                             f"run `coopipe encode --dataset {dataset} --model {model} ...` first"))
        weights = found[0]
    def store(split: str, positions: tuple[int, ...] | None = None) -> FeatureStore:
        return select_store(cache_dir, dataset, split, model=model, weights=weights, positions=positions)

    full = [s for s in find_stores(cache_dir, dataset, "train", model=model, weights=weights)
            if s.provenance.get("rows", "all") == "all"]
    index = fewshot_index(cache_dir, dataset, shots, seed, full[0] if full else None)
    train = read_split(store("train", index.train_indices), index.train_indices, all_views=False)
    if not index.val_indices:
        raise StoreError(f"the age probes choose their regularisation on validation; {dataset} has no validation "
                         f"images in the {shots}-shot draw (seed {seed}): give the dataset a val split")
    val = read_split(store("val", index.val_indices), index.val_indices, all_views=False)
    test = read_split(store("test"), all_views=False)
    return model, weights, train, val, test, index


def _probe_info(method: str, dataset: str, shots: int, seed: int, model: str, weights: str,
                test: SplitFeatures, train_ages: np.ndarray, evaluation: AgeEvaluation) -> dict[str, Any]:
    return {
        "method": method, "dataset": dataset, "shots": shots, "seed": seed, "model": model, "weights": weights,
        "store": str(test.store.path), **age_fields(evaluation),
        **constant_fields(train_ages, evaluation.true, f"the {shots}-shot train draw, seed {seed} "
                                                       f"({train_ages.size} images)"),
    }


def run_age_linear_probe(
    *,
    cache_dir: str | os.PathLike[str],
    dataset: str,
    shots: int,
    seed: int,
    out_dir: str | os.PathLike[str],
    model: str | None = None,
    weights: str | None = None,
) -> dict[str, Any]:
    """The rank linear probe (logistic regression over ranks, expectation decoding, C on validation MAE)."""
    model, weights, train, val, test, _ = _probe_data(Path(cache_dir), dataset, shots, seed, model, weights)
    values = rank_values(train.classnames)
    probe = fit_rank_linear_probe(train.center, train.labels, val.center, val.labels, values)
    log_probs = probe.log_probs(test.center)  # (N, K)
    evaluation = evaluate_ages(log_probs, test.labels, values)
    metrics = {
        **_probe_info("linear_probe", dataset, shots, seed, model, weights, test, values[train.labels.numpy()],
                      evaluation),
        **_class_metrics(_classification(log_probs, test.labels, values.size), train.classnames),
        "C": probe.C, "val_mae": probe.val_mae,
    }
    return _write(Path(out_dir), metrics, split_paths(test), evaluation)


def run_ridge_probe(
    *,
    cache_dir: str | os.PathLike[str],
    dataset: str,
    shots: int,
    seed: int,
    out_dir: str | os.PathLike[str],
    model: str | None = None,
    weights: str | None = None,
) -> dict[str, Any]:
    """Closed-form ridge regression of age on the few-shot centre-view features, alpha on validation MAE.

    Writes ``<out_dir>/metrics.json`` (the jobs' layout: ``runs/<dataset>/ridge/shotsK_seedS``) and
    ``predictions.csv``. Predictions are clipped to the rank range. Needs no model: only the cached features.
    """
    model, weights, train, val, test, _ = _probe_data(Path(cache_dir), dataset, shots, seed, model, weights)
    values = rank_values(train.classnames)
    y = train.labels.numpy()
    probe = fit_ridge_probe(train.center, values[y], val.center, values[val.labels.numpy()],
                            age_range=(float(values.min()), float(values.max())))
    evaluation = probe.evaluate(test.center, values[test.labels.numpy()])
    # exact-age accuracy of the rounded prediction, as the other methods' arg-max accuracy
    rounded = np.clip(np.searchsorted(values, evaluation.pred_max), 0, values.size - 1)
    metrics = {
        **_probe_info("ridge", dataset, shots, seed, model, weights, test, values[y], evaluation),
        **_class_metrics(evaluate_predictions(test.labels, rounded, values.size), train.classnames),
        "alpha": probe.alpha, "val_mae": probe.val_mae,
    }
    return _write(Path(out_dir), metrics, split_paths(test), evaluation)

"""Age estimation in the evaluation jobs: MAE (both decodings), CS(1..10), accuracy within +-1/3/5 years, the
constant predictor beside every number, and predictions for the predicted-vs-true plot.

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

from coopipe.datasets.ages import AGE_TEMPLATE, rank_values
from coopipe.datasets.fewshot import FewShotIndex
from coopipe.errors import StoreError
from coopipe.features import SplitFeatures, select_store
from coopipe.atomic import write_text
from coopipe.lookup import fewshot_index
from coopipe.ordinal import AgeEvaluation, evaluate_ages, median_predictor_mae
from coopipe.regression import evaluate_age_predictions
from coopipe.store import FeatureStore, find_stores

logger = logging.getLogger(__name__)

__all__ = [
    "PREDICTIONS_FILE",
    "age_fields",
    "age_templates",
    "constant_fields",
    "describe_age_metrics",
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
    from coopipe.methods.zeroshot import TEMPLATE_SEP, ZeroShotOptions, zero_shot_templates

    return zero_shot_templates(ZeroShotOptions(ensemble=ensemble, templates=TEMPLATE_SEP.join(templates or ())),
                               AGE_TEMPLATE)


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
    predicted: np.ndarray | None = None,
) -> tuple[dict[str, Any], AgeEvaluation, list[str]]:
    """Age metrics of a trained run's logits (N, K) on ``test`` (or of its ``predicted`` ages (N,): a regression);
    the constant from the run's few-shot draw (a run without one, zero-shot CLIP: every cached train image)."""
    values = rank_values(test.classnames)
    evaluation = (evaluate_ages(logits, test.labels, values) if predicted is None else
                  evaluate_age_predictions(predicted, values[test.labels.numpy()]))
    if not shots:
        try:
            train_ages, source = cached_train_ages(cache_dir, dataset, model=model, weights=weights,
                                                   classnames=test.classnames)
        except StoreError as exc:  # only the test split is cached (a cross-dataset target): the metrics stand without it
            logger.warning("no constant predictor beside the metrics: %s", exc)
            return {**age_fields(evaluation), **NO_CONSTANT}, evaluation, split_paths(test)
        return {**age_fields(evaluation), **constant_fields(train_ages, evaluation.true, source)}, evaluation, \
            split_paths(test)
    try:
        if seed is None:
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

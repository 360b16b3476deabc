"""Age baselines on cached image features: ridge regression, the rank linear probe, zero-shot and prompt ensembling.

- Ridge regression: the plain baseline a practitioner tries first. Closed form on L2-normalised features with an
  unpenalised intercept (features and ages centred on the train means); one SVD of the train features gives the
  solution for every alpha, ``w = V diag(s / (s^2 + alpha)) U^T y``, and alpha is the one with the lowest
  validation MAE (ties: the larger alpha). Its continuous prediction is the "exp" decoding; rounded to whole years
  it is the "max" one.
- Rank linear probe: the CLIP linear probe (multinomial logistic regression over the ranks) decoded by the
  expectation over its class probabilities; C is chosen on validation MAE (expectation decoding), not accuracy,
  since exact-age accuracy is a poor criterion for an ordinal target. Same coarse grid and log-C bisection as
  :func:`coopipe.baselines.fit_linear_probe`.
- Zero-shot with the age prompt, and prompt ensembling over :data:`AGE_TEMPLATES`, decoded both ways.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from coopipe.baselines import COARSE_C, _fit, normalized_rows
from coopipe.datasets.ages import AGE_TEMPLATE
from coopipe.errors import DatasetError, ParamsError
from coopipe.ordinal import AgeEvaluation, evaluate_ages

logger = logging.getLogger(__name__)

__all__ = [
    "AGE_TEMPLATES",
    "RIDGE_ALPHAS",
    "RankProbe",
    "RidgeProbe",
    "evaluate_age_predictions",
    "fit_rank_linear_probe",
    "fit_ridge_probe",
]

RIDGE_ALPHAS: tuple[float, ...] = tuple(10.0**k for k in np.arange(-4.0, 4.01, 0.5))
# Age prompts for ensembling (ours: CLIP ships none for ages); the first is the zero-shot prompt.
AGE_TEMPLATES: tuple[str, ...] = (
    AGE_TEMPLATE,
    "a photo of a person who is {} years old.",
    "a face of a {} year old person.",
    "a close-up photo of the face of a {} year old.",
    "age estimation: the age of the person is {}.",
    "a {} year old man or woman.",
    "a portrait of someone aged {}.",
)

Array = torch.Tensor | np.ndarray


def _ages(values: Array | Sequence[float], what: str) -> np.ndarray:
    arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    arr = arr.astype(np.float64).reshape(-1)
    if not np.isfinite(arr).all():
        raise DatasetError(f"{what} ages hold NaN/inf values")
    return arr


def evaluate_age_predictions(pred: Array | Sequence[float], true: Array | Sequence[float]) -> AgeEvaluation:
    """Metrics of a direct age prediction: "exp" = the prediction, "max" = it rounded to whole years."""
    p, t = _ages(pred, "predicted"), _ages(true, "true")
    if p.shape != t.shape:
        raise DatasetError(f"{p.size} predictions but {t.size} true ages")
    return AgeEvaluation.of(p, np.floor(p + 0.5), t)


# ---------------------------------------------------------------- ridge regression
@dataclass
class RidgeProbe:
    """``age = clip(x_n @ coef + intercept)`` on L2-normalised features x_n, alpha chosen on validation MAE."""

    alpha: float
    coef: np.ndarray  # (D,)
    intercept: float
    val_mae: float
    age_range: tuple[float, float] | None = None
    search: list[tuple[float, float]] = field(default_factory=list)  # (alpha, val MAE)

    def predict(self, features: Array) -> np.ndarray:
        pred = normalized_rows(features, "ridge") @ self.coef + self.intercept  # (N,)
        return np.clip(pred, *self.age_range) if self.age_range is not None else pred

    def evaluate(self, features: Array, true_ages: Array | Sequence[float]) -> AgeEvaluation:
        return evaluate_age_predictions(self.predict(features), true_ages)


def fit_ridge_probe(
    train_features: Array,
    train_ages: Array | Sequence[float],
    val_features: Array,
    val_ages: Array | Sequence[float],
    *,
    alphas: Sequence[float] = RIDGE_ALPHAS,
    age_range: tuple[float, float] | None = None,
) -> RidgeProbe:
    """Closed-form ridge regression of ages on (N, D) features; ``age_range`` clips predictions (e.g. (0, 100))."""
    x, y = normalized_rows(train_features, "train"), _ages(train_ages, "train")
    xv, yv = normalized_rows(val_features, "validation"), _ages(val_ages, "validation")
    if x.shape[0] != y.size or xv.shape[0] != yv.size or x.shape[0] < 2:
        raise DatasetError("ridge probe: need >= 2 train rows and as many ages as feature rows")
    if xv.shape[1] != x.shape[1]:
        raise DatasetError(f"train ({x.shape[1]}) and validation ({xv.shape[1]}) feature sizes differ")
    grid = sorted(float(a) for a in alphas)
    if not grid or grid[0] <= 0:
        raise ParamsError("ridge alphas must be positive")
    mean_x, mean_y = x.mean(axis=0), float(y.mean())
    u, s, vt = np.linalg.svd(x - mean_x, full_matrices=False)  # (N, r), (r,), (r, D)
    uty = u.T @ (y - mean_y)  # (r,)
    best: RidgeProbe | None = None
    search = []
    for alpha in grid:
        coef = vt.T @ (s / (s**2 + alpha) * uty)  # (D,)
        probe = RidgeProbe(alpha, coef, mean_y - float(mean_x @ coef), 0.0, age_range)
        probe.val_mae = float(np.abs(probe.predict(xv) - yv).mean())
        search.append((alpha, probe.val_mae))
        if best is None or probe.val_mae <= best.val_mae:  # ties: the larger alpha
            best = probe
    assert best is not None
    best.search = search
    logger.info("ridge probe: alpha=%.3g (val MAE %.3f)", best.alpha, best.val_mae)
    return best


# ---------------------------------------------------------------- rank linear probe
@dataclass
class RankProbe:
    """Logistic regression over ranks, decoded by expectation and arg-max; C chosen on validation MAE."""

    C: float
    val_mae: float
    classifier: LogisticRegression
    values: np.ndarray  # (K,) age of each rank
    search: list[tuple[float, float]] = field(default_factory=list)  # (C, val MAE of the expectation)

    def log_probs(self, features: Array) -> np.ndarray:
        """(N, K) log class probabilities; ranks absent from training get -inf."""
        proba = self.classifier.predict_proba(normalized_rows(features, "probe"))
        full = np.full((proba.shape[0], self.values.size), -np.inf)
        with np.errstate(divide="ignore"):
            full[:, self.classifier.classes_] = np.log(proba)
        return full

    def evaluate(self, features: Array, labels: Array | Sequence[int]) -> AgeEvaluation:
        return evaluate_ages(self.log_probs(features), labels, self.values)


def fit_rank_linear_probe(
    train_features: Array,
    train_labels: Array | Sequence[int],
    val_features: Array,
    val_labels: Array | Sequence[int],
    values: Sequence[float] | np.ndarray,
    *,
    c_grid: Sequence[float] = COARSE_C,
    refine_steps: int = 4,
    max_iter: int = 1000,
    blas_threads: int | None = 1,
) -> RankProbe:
    """Fit the rank probe on (N, D) features and rank labels; ``values`` are the ranks' ages (K,)."""
    x, y = normalized_rows(train_features, "train"), np.asarray(train_labels, dtype=np.int64).reshape(-1)
    xv, yv = normalized_rows(val_features, "validation"), np.asarray(val_labels, dtype=np.int64).reshape(-1)
    v = np.asarray(values, dtype=np.float64)
    if x.shape[0] != y.size or xv.shape[0] != yv.size:
        raise DatasetError("rank probe: feature rows and labels differ in number")
    if np.unique(y).size < 2:
        raise DatasetError("rank probe needs training images of at least two ages")
    grid = sorted(float(c) for c in c_grid)
    if not grid or grid[0] <= 0:
        raise ParamsError("c_grid must hold positive values")
    fitted: dict[float, tuple[float, LogisticRegression]] = {}
    search: list[tuple[float, float]] = []

    def score(c: float) -> float:
        if c not in fitted:
            clf = _fit(x, y, c, max_iter)
            probe = RankProbe(c, 0.0, clf, v)
            fitted[c] = (probe.evaluate(xv, yv).mae_exp, clf)
            search.append((c, fitted[c][0]))
        return fitted[c][0]

    with threadpool_limits(limits=blas_threads, user_api="blas") if blas_threads else contextlib.nullcontext():
        maes = [score(c) for c in grid]
        low = int(np.argmin(maes))
        lo, hi = grid[max(low - 1, 0)], grid[min(low + 1, len(grid) - 1)]
        mae_lo, mae_hi = score(lo), score(hi)
        for _ in range(refine_steps if hi > lo else 0):
            mid = math.sqrt(lo * hi)
            if mae_lo > mae_hi:
                lo, mae_lo = mid, score(mid)
            else:
                hi, mae_hi = mid, score(mid)
    best_c = min(fitted, key=lambda c: (fitted[c][0], c))
    logger.info("rank probe: C=%.4g (val MAE %.3f, %d fits)", best_c, fitted[best_c][0], len(fitted))
    return RankProbe(best_c, fitted[best_c][0], fitted[best_c][1], v, search)


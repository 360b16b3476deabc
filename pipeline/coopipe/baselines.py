"""The baselines CoOp is compared with: zero-shot CLIP, prompt ensembling, and a linear probe.

- Zero-shot CLIP classifies with the text features of one hand-crafted prompt per class (the dataset's
  template, e.g. ``a centered satellite photo of {}.`` for EuroSAT).
- Prompt ensembling (CLIP's ImageNet notebook): for each class, the normalised text features of every template
  are averaged and the mean is renormalised. :data:`IMAGENET_TEMPLATES` are CLIP's 80 ImageNet templates.
- Linear probe (CLIP paper / CoOp's ``lpclip``): L2-regularised multinomial logistic regression (sklearn, lbfgs)
  on L2-normalised image features, with C picked on the validation split by a coarse log-spaced sweep from
  1e-6 to 1e6 followed by a bisection in log C around the best value. lbfgs is deterministic, so the same
  features give the same C and classifier.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from coopipe.datasets.common import DEFAULT_TEMPLATE
from coopipe.errors import DatasetError, ParamsError
from coopipe.evaluate import Evaluation, evaluate_classifier, evaluate_predictions
from coopipe.models import LoadedClip
from coopipe.text_encoder import PromptTextEncoder

logger = logging.getLogger(__name__)

__all__ = [
    "COARSE_C",
    "DEFAULT_TEMPLATE",
    "IMAGENET_TEMPLATES",
    "LinearProbe",
    "clean_classname",
    "normalized_rows",
    "dataset_template",
    "fit_linear_probe",
    "zero_shot",
    "zero_shot_classifier",
]

COARSE_C: tuple[float, ...] = tuple(10.0**k for k in range(-6, 7))  # 1e-6 .. 1e6, one decade apart
REFINE_STEPS = 8

# CLIP's 80 prompt templates for ImageNet ("Prompt_Engineering_for_ImageNet.ipynb"), in CLIP's order.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    'a bad photo of a {}.',
    'a photo of many {}.',
    'a sculpture of a {}.',
    'a photo of the hard to see {}.',
    'a low resolution photo of the {}.',
    'a rendering of a {}.',
    'graffiti of a {}.',
    'a bad photo of the {}.',
    'a cropped photo of the {}.',
    'a tattoo of a {}.',
    'the embroidered {}.',
    'a photo of a hard to see {}.',
    'a bright photo of a {}.',
    'a photo of a clean {}.',
    'a photo of a dirty {}.',
    'a dark photo of the {}.',
    'a drawing of a {}.',
    'a photo of my {}.',
    'the plastic {}.',
    'a photo of the cool {}.',
    'a close-up photo of a {}.',
    'a black and white photo of the {}.',
    'a painting of the {}.',
    'a painting of a {}.',
    'a pixelated photo of the {}.',
    'a sculpture of the {}.',
    'a bright photo of the {}.',
    'a cropped photo of a {}.',
    'a plastic {}.',
    'a photo of the dirty {}.',
    'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.',
    'a photo of the {}.',
    'a good photo of the {}.',
    'a rendering of the {}.',
    'a {} in a video game.',
    'a photo of one {}.',
    'a doodle of a {}.',
    'a close-up photo of the {}.',
    'a photo of a {}.',
    'the origami {}.',
    'the {} in a video game.',
    'a sketch of a {}.',
    'a doodle of the {}.',
    'a origami {}.',
    'a low resolution photo of a {}.',
    'the toy {}.',
    'a rendition of the {}.',
    'a photo of the clean {}.',
    'a photo of a large {}.',
    'a rendition of a {}.',
    'a photo of a nice {}.',
    'a photo of a weird {}.',
    'a blurry photo of a {}.',
    'a cartoon {}.',
    'art of a {}.',
    'a sketch of the {}.',
    'a embroidered {}.',
    'a pixelated photo of a {}.',
    'itap of the {}.',
    'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.',
    'a plushie {}.',
    'a photo of the nice {}.',
    'a photo of the small {}.',
    'a photo of the weird {}.',
    'the cartoon {}.',
    'art of the {}.',
    'a drawing of the {}.',
    'a photo of the large {}.',
    'a black and white photo of a {}.',
    'the plushie {}.',
    'a dark photo of a {}.',
    'itap of a {}.',
    'graffiti of the {}.',
    'a toy {}.',
    'itap of my {}.',
    'a photo of a cool {}.',
    'a photo of a small {}.',
    'a tattoo of the {}.',
)


def clean_classname(name: str) -> str:
    """CoOp's prompt form of a class name: underscores become spaces, whitespace collapsed."""
    return " ".join(str(name).replace("_", " ").split())


def dataset_template(dataset: str) -> str:
    """The hand-crafted zero-shot prompt of a CoOp dataset name (or alias), the age prompt of an age dataset;
    ``a photo of a {}.`` otherwise.

    For user datasets (``imagefolder``, ``manifest``) pass the :class:`~coopipe.datasets.base.Dataset`'s own
    ``template`` instead: it is not recoverable from the name.
    """
    from coopipe.datasets import default_registry, is_age_dataset
    from coopipe.datasets.ages import AGE_TEMPLATE
    from coopipe.datasets.coop import COOP_SPECS_BY_NAME
    from coopipe.errors import UnknownDatasetError

    if is_age_dataset(dataset):
        return AGE_TEMPLATE

    try:
        name = default_registry().resolve(dataset)
    except UnknownDatasetError:
        return DEFAULT_TEMPLATE
    spec = COOP_SPECS_BY_NAME.get(name)
    return spec.template if spec is not None else DEFAULT_TEMPLATE


def _check_template(template: str) -> str:
    if template.count("{}") != 1:
        raise ParamsError(f"prompt template {template!r} must contain exactly one '{{}}' for the class name")
    return template


@torch.no_grad()
def zero_shot_classifier(
    clip: LoadedClip,
    classnames: Sequence[str],
    templates: str | Sequence[str],
    *,
    encoder: PromptTextEncoder | None = None,
    dtype: torch.dtype | None = torch.float32,
) -> torch.Tensor:
    """(K, D) L2-normalised text classifier on the CPU, from one template or an ensemble of templates.

    With several templates each class's normalised features are averaged over templates, then renormalised
    (CLIP's prompt ensembling). Templates are encoded one at a time, so memory grows with K, not K x T. ``dtype``:
    float32 by default; None keeps the text tower's precision (at least float32: a float64 tower in the exactness
    tests of the methods that regularise towards these features).
    """
    template_list = [templates] if isinstance(templates, str) else list(templates)
    if not template_list:
        raise ParamsError("give at least one prompt template")
    if isinstance(classnames, str) or not classnames:
        raise ParamsError("classnames must be a non-empty list of class names")
    encoder = encoder or PromptTextEncoder(clip)
    names = [clean_classname(c) for c in classnames]
    total: torch.Tensor | None = None
    for template in template_list:
        feats = encoder.encode_texts([_check_template(template).format(n) for n in names])  # (K, D)
        feats = feats.to(torch.promote_types(feats.dtype, torch.float32) if dtype is None else dtype).cpu()
        total = feats if total is None else total + feats
    assert total is not None
    return torch.nn.functional.normalize(total / len(template_list), dim=-1)  # (K, D)


def zero_shot(
    clip: LoadedClip,
    classnames: Sequence[str],
    templates: str | Sequence[str],
    image_features: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    *,
    encoder: PromptTextEncoder | None = None,
) -> Evaluation:
    """Zero-shot (one template) or prompt-ensemble (several) evaluation on raw image features (N, D)."""
    weights = zero_shot_classifier(clip, classnames, templates, encoder=encoder)  # (K, D)
    return evaluate_classifier(weights, image_features, labels, clip.model.logit_scale.detach().cpu())


def normalized_rows(features: torch.Tensor | np.ndarray, what: str) -> np.ndarray:
    """(N, D) float64 features, each row L2-normalised (the probes' input); ``what`` names them in errors."""
    arr = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    arr = arr.astype(np.float64)
    if arr.ndim != 2:
        raise DatasetError(f"{what} features must be (N, D) (one view), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise DatasetError(f"{what} features hold NaN/inf values; re-encode the store")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return arr / np.maximum(norms, 1e-12)


def _labels(labels: torch.Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return arr.astype(np.int64).reshape(-1)


@dataclass
class LinearProbe:
    """A logistic-regression probe with the C chosen on validation; predicts from raw features."""

    C: float
    val_accuracy: float
    classifier: LogisticRegression
    n_classes: int
    search: list[tuple[float, float]] = field(default_factory=list)  # (C, val accuracy) in evaluation order

    def logits(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        """(N, K) decision scores over all ``n_classes`` (classes absent from training get -inf)."""
        scores = self.classifier.decision_function(normalized_rows(features, "probe"))
        if scores.ndim == 1:  # binary problem: sklearn returns the positive-class margin only
            scores = np.stack([-scores, scores], axis=1)
        full = np.full((scores.shape[0], self.n_classes), -np.inf)
        full[:, self.classifier.classes_] = scores
        return full

    def predict(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        return self.logits(features).argmax(axis=1)

    def evaluate(
        self, features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | Sequence[int]
    ) -> Evaluation:
        return evaluate_predictions(_labels(labels), self.predict(features), self.n_classes)


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int) -> LogisticRegression:
    clf = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x, y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        logger.debug("logistic regression with C=%g stopped at max_iter=%d before converging", c, max_iter)
    return clf


def fit_linear_probe(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray | Sequence[int],
    val_features: torch.Tensor | np.ndarray,
    val_labels: torch.Tensor | np.ndarray | Sequence[int],
    *,
    n_classes: int | None = None,
    c_grid: Sequence[float] = COARSE_C,
    refine_steps: int = REFINE_STEPS,
    max_iter: int = 1000,
    blas_threads: int | str | None = "auto",
) -> LinearProbe:
    """Fit the linear probe on (N, D) train features, choosing C by validation accuracy.

    Search: every C of ``c_grid`` (log-spaced), then ``refine_steps`` bisections in log C between the best
    grid value's neighbours, each step replacing the worse end by the geometric midpoint (CoOp's ``lpclip``
    bisects the same way, in linear C). The chosen C is the best evaluated one; ties go to the smaller C
    (stronger regularisation). The returned classifier is the one fitted on the train features with that C.

    ``blas_threads`` caps numpy's BLAS threads during the search: an int, None (leave them as they are) or
    ``auto`` (one thread for few-shot sized problems, N x D x K < 5e7, else unchanged). A small probe is far
    faster on one thread: lbfgs makes thousands of tiny BLAS calls, and with several threads each call waits for
    its threads to get a core (one fit on 2 busy cores: 0.7 s on one thread, 108 s on two).
    """
    if blas_threads == "auto":
        n, d = np.shape(train_features)[0], np.shape(train_features)[-1]
        k = n_classes if n_classes is not None else int(_labels(train_labels).max(initial=1)) + 1
        blas_threads = 1 if n * d * k < 5e7 else None
    if blas_threads is None:
        return _search_probe(train_features, train_labels, val_features, val_labels, n_classes=n_classes,
                             c_grid=c_grid, refine_steps=refine_steps, max_iter=max_iter)
    if isinstance(blas_threads, bool) or not isinstance(blas_threads, int) or blas_threads < 1:
        raise ParamsError(f"blas_threads must be a positive integer, None or 'auto', got {blas_threads!r}")
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        return _search_probe(train_features, train_labels, val_features, val_labels, n_classes=n_classes,
                             c_grid=c_grid, refine_steps=refine_steps, max_iter=max_iter)


def _search_probe(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray | Sequence[int],
    val_features: torch.Tensor | np.ndarray,
    val_labels: torch.Tensor | np.ndarray | Sequence[int],
    *,
    n_classes: int | None,
    c_grid: Sequence[float],
    refine_steps: int,
    max_iter: int,
) -> LinearProbe:
    x_train, y_train = normalized_rows(train_features, "train"), _labels(train_labels)
    x_val, y_val = normalized_rows(val_features, "validation"), _labels(val_labels)
    if x_train.shape[0] != y_train.size or x_val.shape[0] != y_val.size:
        raise DatasetError("linear probe: feature rows and labels differ in number")
    if x_val.shape[1] != x_train.shape[1]:
        raise DatasetError(f"train ({x_train.shape[1]}) and validation ({x_val.shape[1]}) feature sizes differ")
    if np.unique(y_train).size < 2:
        raise DatasetError("linear probe needs training images of at least two classes")
    grid = sorted(float(c) for c in c_grid)
    if not grid or grid[0] <= 0:
        raise ParamsError("c_grid must hold positive values")
    k = n_classes if n_classes is not None else int(max(y_train.max(), y_val.max())) + 1
    fitted: dict[float, tuple[float, LogisticRegression]] = {}
    search: list[tuple[float, float]] = []

    def score(c: float) -> float:
        if c not in fitted:
            clf = _fit(x_train, y_train, c, max_iter)
            fitted[c] = (float((clf.predict(x_val) == y_val).mean()), clf)
            search.append((c, fitted[c][0]))
            logger.debug("linear probe: C=%.3g val acc %.4f", c, fitted[c][0])
        return fitted[c][0]

    accs = [score(c) for c in grid]
    peak = int(np.argmax(accs))  # first maximum = smallest C among ties
    lo, hi = grid[max(peak - 1, 0)], grid[min(peak + 1, len(grid) - 1)]
    acc_lo, acc_hi = score(lo), score(hi)
    for _ in range(refine_steps if hi > lo else 0):
        mid = math.sqrt(lo * hi)
        if acc_lo < acc_hi:
            lo, acc_lo = mid, score(mid)
        else:
            hi, acc_hi = mid, score(mid)
    best_c = min(fitted, key=lambda c: (-fitted[c][0], c))
    best_acc, best_clf = fitted[best_c]
    chance = float(np.bincount(y_val, minlength=k).max()) / max(y_val.size, 1)  # majority-class accuracy
    if len({round(a, 9) for a in accs}) == 1 and best_acc <= chance + 1e-9:
        logger.warning(
            "linear probe is degenerate: every C scores %.2f%% on validation, the majority-class rate (%.2f%%); "
            "the features do not separate the classes (random weights?), so C=%.3g is arbitrary and the probe "
            "likely predicts one class", 100 * best_acc, 100 * chance, best_c,
        )
    logger.info("linear probe: C=%.4g (val acc %.4f, %d fits)", best_c, best_acc, len(fitted))
    return LinearProbe(C=best_c, val_accuracy=best_acc, classifier=best_clf, n_classes=k, search=search)

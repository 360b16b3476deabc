"""Classification metrics and the evaluation of a K x D text classifier against cached image features.

Why numpy and not sklearn: the metrics are a few lines over the confusion matrix, computed once for every
number the pipeline reports, and they must agree with sklearn's definitions (the tests check that):
``macro_f1`` averages over the classes present in the labels or the predictions, with F1 = 0 for a class
that is never predicted correctly (sklearn's ``zero_division=0``). Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from coopipe.errors import CheckpointError, DatasetError

logger = logging.getLogger(__name__)

__all__ = [
    "Evaluation",
    "accuracy",
    "classifier_logits",
    "confusion_matrix",
    "evaluate_classifier",
    "evaluate_predictions",
    "macro_f1",
    "per_class_accuracy",
]


def _as_labels(x: torch.Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return arr.astype(np.int64).reshape(-1)


def confusion_matrix(
    labels: torch.Tensor | np.ndarray | Sequence[int],
    predictions: torch.Tensor | np.ndarray | Sequence[int],
    n_classes: int,
) -> np.ndarray:
    """(K, K) int64 counts: row = true class, column = predicted class (sklearn's convention)."""
    y, p = _as_labels(labels), _as_labels(predictions)
    if y.shape != p.shape:
        raise ValueError(f"{y.size} labels but {p.size} predictions")
    if y.size and (min(y.min(), p.min()) < 0 or max(y.max(), p.max()) >= n_classes):
        raise DatasetError(f"labels and predictions must lie in 0..{n_classes - 1} for {n_classes} classes")
    return np.bincount(y * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def accuracy(
    labels: torch.Tensor | np.ndarray | Sequence[int], predictions: torch.Tensor | np.ndarray | Sequence[int]
) -> float:
    """Fraction of correct predictions (0.0 for no samples)."""
    y, p = _as_labels(labels), _as_labels(predictions)
    return float((y == p).mean()) if y.size else 0.0


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """(K,) recall of each class (diagonal / row sum); NaN for classes without samples."""
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan)


def macro_f1(confusion: np.ndarray) -> float:
    """Unweighted mean F1 over the classes that occur as a label or a prediction (as sklearn's average='macro')."""
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    present = (support + predicted) > 0
    if not present.any():
        return 0.0
    denom = support + predicted  # 2TP + FP + FN
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(f1[present].mean())


@dataclass
class Evaluation:
    """Metrics of one classifier on one labelled feature set."""

    accuracy: float
    macro_f1: float
    per_class_accuracy: np.ndarray  # (K,), NaN for absent classes
    confusion: np.ndarray  # (K, K)
    predictions: np.ndarray  # (N,)
    n: int
    loss: float | None = None  # mean cross-entropy, when logits were available

    @property
    def mean_per_class_accuracy(self) -> float:
        return float(np.nanmean(self.per_class_accuracy)) if np.isfinite(self.per_class_accuracy).any() else 0.0

    def to_dict(self, classnames: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-able summary; per-class accuracies keyed by class name when names are given."""
        per_class = [None if np.isnan(a) else float(a) for a in self.per_class_accuracy]
        keys = list(classnames) if classnames is not None else [str(i) for i in range(len(per_class))]
        return {
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "mean_per_class_accuracy": self.mean_per_class_accuracy,
            "n": self.n,
            "loss": self.loss,
            "per_class_accuracy": dict(zip(keys, per_class)),
            "confusion": self.confusion.tolist(),
        }


def evaluate_predictions(
    labels: torch.Tensor | np.ndarray | Sequence[int],
    predictions: torch.Tensor | np.ndarray | Sequence[int],
    n_classes: int,
    *,
    loss: float | None = None,
) -> Evaluation:
    """Every metric from integer labels and predictions."""
    y, p = _as_labels(labels), _as_labels(predictions)
    cm = confusion_matrix(y, p, n_classes)
    return Evaluation(
        accuracy=accuracy(y, p),
        macro_f1=macro_f1(cm),
        per_class_accuracy=per_class_accuracy(cm),
        confusion=cm,
        predictions=p,
        n=int(y.size),
        loss=loss,
    )


@torch.no_grad()
def check_finite_logits(logits: torch.Tensor, logit_scale: float | torch.Tensor, what: str) -> None:
    """Refuse non-finite logits (a damaged ``logit_scale`` such as 1e4 overflows ``exp``): never ``nan%``."""
    if not bool(torch.isfinite(logits).all()):
        raise CheckpointError(
            f"{what} gives non-finite logits (logit_scale {float(logit_scale):g}; CLIP's is at most ln 100 = 4.61, "
            f"or the class features hold NaN/inf): the file is damaged; re-run `coopipe train` with the same "
            f"options to regenerate it"
        )


def classifier_logits(
    text_features: torch.Tensor | np.ndarray,
    image_features: torch.Tensor | np.ndarray,
    logit_scale: float | torch.Tensor,
    *,
    batch_size: int = 65536,
) -> torch.Tensor:
    """CLIP logits ``exp(logit_scale) * cos(image, text)``: text (K, D), images (N, D) raw -> (N, K) float32.

    ``logit_scale`` is CLIP's log scale (``model.logit_scale``), as in :func:`coopipe.text_encoder.coop_logits`.
    Both sides are L2-normalised here; images are processed in batches to bound memory.
    """
    text = F.normalize(torch.as_tensor(text_features).float(), dim=-1)  # (K, D)
    images = torch.as_tensor(image_features).float()  # (N, D)
    if images.ndim != 2 or images.shape[1] != text.shape[1]:
        raise ValueError(f"image features {tuple(images.shape)} do not match text features {tuple(text.shape)}")
    scale = float(torch.as_tensor(logit_scale).float().exp())
    parts = [
        scale * F.normalize(images[i : i + batch_size], dim=-1) @ text.t()  # (b, K)
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, text.shape[0])  # (N, K)


def evaluate_classifier(
    text_features: torch.Tensor | np.ndarray,
    image_features: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    logit_scale: float | torch.Tensor,
) -> Evaluation:
    """Evaluate a K x D classifier (CoOp prompt, zero-shot or ensemble text features) on raw image features (N, D)."""
    logits = classifier_logits(text_features, image_features, logit_scale)  # (N, K)
    y = torch.as_tensor(_as_labels(labels))
    loss = float(F.cross_entropy(logits, y)) if len(y) else None
    return evaluate_predictions(y, logits.argmax(dim=-1), logits.shape[1], loss=loss)

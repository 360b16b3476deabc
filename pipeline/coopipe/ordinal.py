"""Ordinal (age) decoding, metrics and OrdinalCLIP's loss.

Decoding (OrdinalCLIP's ``convert_logits_to_predicions``): from the softmax over the K ranks, the expectation
``sum_r p(r) * value(r)`` ("exp") and the value of the arg-max rank ("max"); ``value(r)`` is the rank's age
(:func:`coopipe.datasets.ages.rank_values`). Metrics: the mean absolute error (MAE, years) of each decoding, the
cumulative score CS(t) = fraction of images with absolute error <= t years for t = 1..10, and the accuracy within
+-1, +-3, +-5 years (the same fraction, named as age papers report it).

Loss (OrdinalCLIP's ``runner.py``): cross-entropy plus a KL term computed rank-wise over the batch: for every rank
present in the batch, the target is a softmax over the batch of 10 x (one-hot of the images of that rank), the
prediction the log-softmax over the batch of that rank's logits column; KL summed and divided by the number of
ranks present. Weights 1 and 1 as in its config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from coopipe.errors import DatasetError

__all__ = [
    "CS_THRESHOLDS",
    "WITHIN_YEARS",
    "AgeEvaluation",
    "cumulative_scores",
    "decode_argmax",
    "decode_expectation",
    "evaluate_ages",
    "median_predictor_mae",
    "ordinal_kl_loss",
    "rank_loss",
]

CS_THRESHOLDS: tuple[int, ...] = tuple(range(1, 11))
WITHIN_YEARS: tuple[int, ...] = (1, 3, 5)
KL_TARGET_SCALE = 10.0  # OrdinalCLIP: (one_hot * 10).softmax over the batch


def check_ordered_labels(classnames: Sequence[str], dataset: str, method: str) -> None:
    """Refuse an ordinal method on classes that are not ranks (increasing numbers, such as ages).

    Why: rank prompts interpolate embeddings between neighbouring classes; on unordered classes (EuroSAT's land
    uses) that order is meaningless and the run would train without complaint on nonsense.
    """
    try:
        values = [float(name) for name in classnames]
    except ValueError:
        values = []
    if len(values) < 2 or any(b <= a for a, b in zip(values, values[1:])):
        shown = ", ".join(list(classnames)[:3])
        raise DatasetError(
            f"--method {method} needs ordered labels (ranks such as ages: class names that are increasing numbers); "
            f"{dataset}'s classes ({shown}, ...) are not; train coop or cocoop on it, or use an age dataset"
        )


def _array(x: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    return (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.float64)


def _probabilities(logits: torch.Tensor | np.ndarray) -> np.ndarray:
    """Row softmax of (N, K) logits in float64 (-inf logits, e.g. absent probe classes, get probability 0)."""
    z = _array(logits)
    if z.ndim != 2:
        raise DatasetError(f"logits must be (N, K), got shape {z.shape}")
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def decode_expectation(probs: torch.Tensor | np.ndarray, values: Sequence[float] | np.ndarray) -> np.ndarray:
    """``sum_r p(r) * values[r]`` of (N, K) probabilities: (N,) float64."""
    p, v = _array(probs), _array(values)
    if p.ndim != 2 or p.shape[1] != v.size:
        raise DatasetError(f"probabilities {p.shape} do not match {v.size} rank values")
    return p @ v


def decode_argmax(probs: torch.Tensor | np.ndarray, values: Sequence[float] | np.ndarray) -> np.ndarray:
    """``values[argmax_r p(r)]`` of (N, K) probabilities (or logits: same arg-max): (N,) float64."""
    p, v = _array(probs), _array(values)
    if p.ndim != 2 or p.shape[1] != v.size:
        raise DatasetError(f"probabilities {p.shape} do not match {v.size} rank values")
    return v[p.argmax(axis=1)]


def cumulative_scores(errors: np.ndarray, thresholds: Sequence[int] = CS_THRESHOLDS) -> dict[int, float]:
    """CS(t): the fraction of absolute errors <= t, for each t (0.0 for no samples)."""
    e = np.abs(_array(errors))
    return {int(t): float((e <= t).mean()) if e.size else 0.0 for t in thresholds}


@dataclass
class AgeEvaluation:
    """Age metrics of one predictor on one labelled set (ages in years)."""

    mae_exp: float
    mae_max: float
    cs_exp: dict[int, float]  # t -> CS(t), expectation decoding
    cs_max: dict[int, float]  # t -> CS(t), arg-max decoding
    pred_exp: np.ndarray  # (N,)
    pred_max: np.ndarray  # (N,)
    true: np.ndarray  # (N,)
    n: int
    loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, pred_exp: np.ndarray, pred_max: np.ndarray, true: np.ndarray, *, loss: float | None = None) -> AgeEvaluation:
        """Every metric from the two decodings' predictions and the true ages (N,)."""
        n = int(true.size)
        return cls(
            mae_exp=float(np.abs(pred_exp - true).mean()) if n else 0.0,
            mae_max=float(np.abs(pred_max - true).mean()) if n else 0.0,
            cs_exp=cumulative_scores(pred_exp - true),
            cs_max=cumulative_scores(pred_max - true),
            pred_exp=pred_exp,
            pred_max=pred_max,
            true=true,
            n=n,
            loss=loss,
        )

    @property
    def mae(self) -> float:
        """The headline MAE: expectation decoding (OrdinalCLIP's reported "exp")."""
        return self.mae_exp

    def within(self, years: int, decoding: str = "exp") -> float:
        """Accuracy within +-``years`` (fraction with |error| <= years)."""
        pred = self.pred_exp if decoding == "exp" else self.pred_max
        return float((np.abs(pred - self.true) <= years).mean()) if self.n else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "mae_exp": self.mae_exp,
            "mae_max": self.mae_max,
            "cs_exp": {str(t): v for t, v in self.cs_exp.items()},
            "cs_max": {str(t): v for t, v in self.cs_max.items()},
            **{f"within_{y}_exp": self.within(y, "exp") for y in WITHIN_YEARS},
            **{f"within_{y}_max": self.within(y, "max") for y in WITHIN_YEARS},
            "n": self.n,
            "loss": self.loss,
            **self.extra,
        }


def evaluate_ages(
    logits: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    values: Sequence[float] | np.ndarray,
) -> AgeEvaluation:
    """Decode (N, K) rank logits both ways and score them against rank labels (N,) (ages = ``values[labels]``)."""
    probs = _probabilities(logits)
    v = _array(values)
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64).reshape(-1)
    if y.size != probs.shape[0]:
        raise DatasetError(f"{y.size} labels but {probs.shape[0]} rows of logits")
    if y.size and (y.min() < 0 or y.max() >= v.size):
        raise DatasetError(f"rank labels must lie in 0..{v.size - 1}")
    true = v[y]
    pred_exp, pred_max = decode_expectation(probs, v), decode_argmax(probs, v)
    n = int(y.size)
    with np.errstate(divide="ignore"):
        loss = float(-np.log(probs[np.arange(n), y]).mean()) if n else None
    return AgeEvaluation.of(pred_exp, pred_max, true, loss=loss)


def median_predictor_mae(train_ages: Sequence[float] | np.ndarray, test_ages: Sequence[float] | np.ndarray) -> float:
    """MAE of the constant predictor that answers the train median (the MAE-optimal constant): the floor to beat."""
    train, test = _array(train_ages), _array(test_ages)
    if not train.size or not test.size:
        raise DatasetError("the constant predictor needs train and test ages")
    return float(np.abs(test - np.median(train)).mean())


def ordinal_kl_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """OrdinalCLIP's rank-wise KL term for (B, K) logits and (B,) rank labels (a scalar tensor)."""
    n_ranks = logits.shape[1]
    onehot_t = F.one_hot(labels, n_ranks).t().to(logits.dtype)  # (K, B)
    present = onehot_t.sum(dim=1) > 0  # (K,)
    target = (onehot_t * KL_TARGET_SCALE).softmax(dim=1) * present.unsqueeze(1)  # (K, B), rows of absent ranks 0
    log_pred = F.log_softmax(logits.t(), dim=1)  # (K, B)
    return F.kl_div(log_pred, target, reduction="sum") / present.sum()


def rank_loss(logits: torch.Tensor, labels: torch.Tensor, *, ce_weight: float = 1.0,
              kl_weight: float = 1.0) -> torch.Tensor:
    """Cross-entropy plus OrdinalCLIP's KL term, weights 1 and 1 by default."""
    loss = ce_weight * F.cross_entropy(logits, labels)
    if kl_weight:
        loss = loss + kl_weight * ordinal_kl_loss(logits, labels)
    return loss


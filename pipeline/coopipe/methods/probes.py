"""The linear probe and the ridge probe as methods: closed-form fits on the few-shot centre-view features.

- Linear probe (``linear_probe``; CLIP paper / CoOp's ``lpclip``): L2-regularised multinomial logistic regression
  on L2-normalised features, C searched on the few-shot validation split (:func:`coopipe.baselines.fit_linear_probe`:
  accuracy; on ordered labels such as ages :func:`coopipe.regression.fit_rank_linear_probe`: the MAE of the
  expectation over the ranks). Its logits are the regression's decision scores ``x_n W^T + b``.
- Ridge probe (``ridge``, ordered labels only): ridge regression of the rank's value (an age) on the L2-normalised
  features, alpha searched on validation MAE (:func:`coopipe.regression.fit_ridge_probe`); it predicts ages
  directly (``predicts_ages``), rounded to the nearest rank for its exact-age accuracy.

Why methods: they then run where every method runs (``coopipe train``, the sweep, ``eval``, ``predict``, the report)
instead of on a track of their own. Nothing is trained (0 epochs, no optimiser): :meth:`Method.finish` fits the
closed form once from :class:`~coopipe.learners.FitData` (train and few-shot validation splits only), and the fit is
held in frozen float64 parameters, so the checkpoint reproduces it and the scores are computed in float64 with the
same numpy products as the fitted sklearn/numpy objects. Neither probe has a (K, D) text classifier (a bias, no
cosine): the learners are image-conditional in the loop's sense and score images themselves. Their weights are one
per training class: no base-to-new, no transfer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from coopipe.baselines import fit_linear_probe, normalized_rows
from coopipe.datasets.ages import rank_values
from coopipe.errors import DatasetError, ParamsError
from coopipe.learners import FitData, StepInputs
from coopipe.methods.feature_space import learner_device
from coopipe.methods.registry import Method, NoOptions
from coopipe.models import LoadedClip
from coopipe.regression import fit_rank_linear_probe, fit_ridge_probe
from coopipe.text_encoder import PromptTextEncoder

logger = logging.getLogger(__name__)

__all__ = ["LinearProbe", "LinearProbeLearner", "Ridge", "RidgeLearner"]


UNSEEN_SCORE = -1e300  # a class the fit never saw (an empty rank): exp underflows to 0, so probabilities and arg-max
# are sklearn's; finite, since non-finite logits mean a diverged run to the evaluation


def _frozen64(*shape: int, device: torch.device) -> nn.Parameter:
    """A float64 parameter of zeros the optimiser never moves (the fit fills it; the checkpoint stores it)."""
    return nn.Parameter(torch.zeros(shape, dtype=torch.float64, device=device), requires_grad=False)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _need_validation(data: FitData, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if data.val_feats is None or data.val_labels is None:
        raise DatasetError(f"the {what} chooses its regularisation on the few-shot validation split, and this run has "
                           f"none: give the dataset a val split")
    return data.val_feats, data.val_labels


class ProbeLearner(nn.Module):
    """What both probes share: image-conditional (they score images themselves), a loss never used (no epochs), batched
    float64 scores without gradients, no (K, D) classifier."""

    image_conditional = True

    def __init__(self, clip: LoadedClip, classnames: Sequence[str], *, method: str) -> None:
        super().__init__()
        self.classnames, self.n_cls, self.method = list(classnames), len(classnames), method
        self.device, self.dim = learner_device(clip), int(clip.embed_dim)

    def scores(self, features: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def logits(self, encoder: PromptTextEncoder | None, image_features: torch.Tensor, logit_scale: torch.Tensor,
               **_: Any) -> torch.Tensor:
        return torch.from_numpy(self.scores(_numpy(image_features)))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, step: StepInputs | None = None) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits, labels)

    def predict_logits(self, encoder: PromptTextEncoder | None, image_features: torch.Tensor,
                       logit_scale: torch.Tensor, *, batch_size: int = 256, image_chunk: int | None = None,
                       progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Logits (M, K) float64 on the CPU, in one product (the scores of the fitted objects, to the bit)."""
        logits = torch.from_numpy(self.scores(_numpy(torch.as_tensor(image_features))))
        if progress is not None:
            progress(logits.shape[0])
        return logits

    def class_text_features(self, encoder: PromptTextEncoder) -> torch.Tensor:
        raise ParamsError(f"{self.method} scores images with a bias and without CLIP's cosine: there is no (K, D) text "
                          f"classifier; score images through the learner (logits, predict_logits)")

    def config(self) -> dict[str, Any]:
        return {"method": self.method, "classnames": self.classnames}


class LinearProbeLearner(ProbeLearner):
    """Logistic regression ``weight`` (K, D), ``bias`` (K,), ``present`` (K,) (1 for a class the fit saw: the others
    score :data:`UNSEEN_SCORE`, as sklearn knows only its ``classes_``), the chosen ``C`` and its validation score
    ``val_score``."""

    def __init__(self, clip: LoadedClip, classnames: Sequence[str], *, method: str) -> None:
        super().__init__(clip, classnames, method=method)
        self.weight = _frozen64(self.n_cls, self.dim, device=self.device)
        self.bias = _frozen64(self.n_cls, device=self.device)
        self.present = _frozen64(self.n_cls, device=self.device)
        self.C = _frozen64(device=self.device)
        self.val_score = _frozen64(device=self.device)
        self.ordinal = _frozen64(device=self.device)  # 1: C was chosen by validation MAE (ranks), 0: by accuracy

    @torch.no_grad()
    def hold(self, clf: LogisticRegression, c: float, val_score: float, *, ordinal: bool) -> None:
        """Hold the fitted regression (a binary one's single margin ``s`` as the scores ``(-s, s)``)."""
        coef, intercept = np.asarray(clf.coef_, dtype=np.float64), np.asarray(clf.intercept_, dtype=np.float64)
        if coef.shape[0] == 1:
            coef, intercept = np.concatenate([-coef, coef]), np.concatenate([-intercept, intercept])
        classes = torch.as_tensor(np.asarray(clf.classes_, dtype=np.int64))
        for param, value in ((self.weight, coef), (self.bias, intercept)):
            param.zero_()
            param[classes] = torch.from_numpy(value).to(param.device)
        self.present.zero_()
        self.present[classes] = 1.0
        self.C.fill_(c)
        self.val_score.fill_(val_score)
        self.ordinal.fill_(float(ordinal))

    def scores(self, features: np.ndarray) -> np.ndarray:
        present = _numpy(self.present).astype(bool)
        scores = np.full((features.shape[0], self.n_cls), UNSEEN_SCORE)
        scores[:, present] = normalized_rows(features, "probe") @ _numpy(self.weight)[present].T + _numpy(self.bias)[present]
        return scores


class LinearProbe(Method):
    name = "linear_probe"
    title = "Linear probe CLIP"
    paper = ("CLIP's linear probe (Radford et al., Learning Transferable Visual Models From Natural Language "
             "Supervision, ICML 2021; CoOp's lpclip)")
    learned = "linear probe"
    head_tensors = "class weights and biases, the classes the fit saw, the chosen C and its validation score"
    inference = (
        "Image-conditional head (linear probe): its classifier is not CLIP's scaled cosine against K class text "
        "features. For the L2-normalised image feature f, logit_k = weight_k . f + bias_k in float64 (the logistic "
        "regression's decision scores), with weight (K, D) and bias (K,); a class the fit never saw (present_k 0) "
        "scores -1e300."
    )
    image_conditional = True  # no (K, D) text classifier: the learner scores images
    trains = False

    def train_setting(self, shots: int, dataset: str | None = None) -> dict[str, Any]:
        return {**super().train_setting(shots, dataset), "views": "center"}

    def transferable(self, options: NoOptions) -> bool:
        return False

    def transfer_refusal(self, options: NoOptions) -> str:
        return "its weights are one per training class"

    def finish(self, learner: LinearProbeLearner, data: FitData) -> None:  # type: ignore[override]
        val_feats, val_labels = _need_validation(data, "linear probe")
        train = data.train_feats[:, 0]  # the centre view, as CLIP's probe
        if data.ordinal:  # C on the validation MAE of the expectation over the ranks (exact-age accuracy is a poor criterion)
            rank = fit_rank_linear_probe(train, data.train_labels, val_feats, val_labels, rank_values(data.classnames))
            learner.hold(rank.classifier, rank.C, rank.val_mae, ordinal=True)
        else:
            probe = fit_linear_probe(train, data.train_labels, val_feats, val_labels, n_classes=len(data.classnames))
            learner.hold(probe.classifier, probe.C, probe.val_accuracy, ordinal=False)

    def record_fields(self, options: NoOptions, tensors: Mapping[str, torch.Tensor], template: str) -> dict[str, Any]:
        score = "val_mae" if float(tensors["ordinal"]) else "val_accuracy"
        return {"C": float(tensors["C"]), score: float(tensors["val_score"])}

    def build_learner(self, options: NoOptions, clip: LoadedClip, classnames: Sequence[str], *,
                      generator: torch.Generator | None) -> LinearProbeLearner:
        return LinearProbeLearner(clip, classnames, method=self.name)


class RidgeLearner(ProbeLearner):
    """``age = clip(x_n @ coef + intercept, ages of the first and last rank)``: ``coef`` (D,), ``intercept``, the
    chosen ``alpha`` and its validation MAE ``val_mae``; ``values`` (K,) are the ranks' ages."""

    def __init__(self, clip: LoadedClip, classnames: Sequence[str], *, method: str) -> None:
        super().__init__(clip, classnames, method=method)
        self.coef = _frozen64(self.dim, device=self.device)
        self.intercept = _frozen64(device=self.device)
        self.alpha = _frozen64(device=self.device)
        self.val_mae = _frozen64(device=self.device)
        self.values = rank_values(classnames).astype(np.float64)

    def predict_ages(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        """Ages (N,) of raw features (N, D)."""
        x = _numpy(torch.as_tensor(features))
        pred = normalized_rows(x, "ridge") @ _numpy(self.coef) + float(self.intercept)
        return np.clip(pred, self.values.min(), self.values.max())

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Logits whose arg-max is the rank nearest the rounded age (0 there, minus the distance in years elsewhere)."""
        rounded = np.floor(self.predict_ages(features) + 0.5)  # (N,)
        return -np.abs(self.values[None, :] - rounded[:, None])


class Ridge(Method):
    name = "ridge"
    title = "Ridge probe"
    paper = "the ridge probe (closed-form ridge regression of the age on L2-normalised CLIP image features)"
    learned = "ridge regression"
    head_tensors = "coefficients, intercept, the chosen alpha and its validation MAE"
    inference = (
        "Image-conditional head (ridge probe): it predicts an age, not class scores. For the L2-normalised image "
        "feature f, age = clip(f . coef + intercept, first rank's age, last rank's age) in float64, with coef (D,); "
        "logit_k = -|age_k - round(age)| over the ranks' ages age_k, so the arg-max is the rank nearest the "
        "rounded age."
    )
    image_conditional = True
    trains = False
    ordered_labels = True
    predicts_ages = True

    def train_setting(self, shots: int, dataset: str | None = None) -> dict[str, Any]:
        return {**super().train_setting(shots, dataset), "views": "center"}

    def transferable(self, options: NoOptions) -> bool:
        return False

    def transfer_refusal(self, options: NoOptions) -> str:
        return "it regresses the training dataset's ages"

    @torch.no_grad()
    def finish(self, learner: RidgeLearner, data: FitData) -> None:  # type: ignore[override]
        val_feats, val_labels = _need_validation(data, "ridge probe")
        values = learner.values
        probe = fit_ridge_probe(data.train_feats[:, 0], values[_numpy(data.train_labels)], val_feats,
                                values[_numpy(val_labels)], age_range=(float(values.min()), float(values.max())))
        learner.coef.copy_(torch.from_numpy(probe.coef))
        learner.intercept.fill_(probe.intercept)
        learner.alpha.fill_(probe.alpha)
        learner.val_mae.fill_(probe.val_mae)

    def record_fields(self, options: NoOptions, tensors: Mapping[str, torch.Tensor], template: str) -> dict[str, Any]:
        return {"alpha": float(tensors["alpha"]), "val_mae": float(tensors["val_mae"])}

    def build_learner(self, options: NoOptions, clip: LoadedClip, classnames: Sequence[str], *,
                      generator: torch.Generator | None) -> RidgeLearner:
        return RidgeLearner(clip, classnames, method=self.name)

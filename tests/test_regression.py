"""Age baselines: closed-form ridge (against sklearn), the rank linear probe on ordered synthetic features, and
zero-shot / ensembling over age templates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from coopipe.datasets.ages import rank_classnames
from coopipe.models import LoadedClip
from coopipe.ordinal import median_predictor_mae
from coopipe.regression import (
    AGE_TEMPLATES,
    evaluate_age_predictions,
    fit_rank_linear_probe,
    fit_ridge_probe,
)
from coopipe.baselines import zero_shot_classifier
from coopipe.datasets.ages import rank_values
from coopipe.evaluate import classifier_logits
from coopipe.ordinal import evaluate_ages
from sklearn.linear_model import Ridge


def _normalized(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ridge_is_sklearns_ridge_and_learns_a_linear_age() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=32) * 40

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(size=(n, 32))
        return x * 3.0, _normalized(x) @ w + 40 + rng.normal(size=n)  # raw features: the probe normalises

    (x, y), (xv, yv), (xt, yt) = draw(200), draw(100), draw(300)
    probe = fit_ridge_probe(x, y, xv, yv)
    reference = Ridge(alpha=probe.alpha).fit(_normalized(x), y)
    np.testing.assert_allclose(probe.coef, reference.coef_, rtol=1e-8, atol=1e-8)
    assert probe.intercept == pytest.approx(reference.intercept_, rel=1e-10)
    assert probe.val_mae == min(mae for _, mae in probe.search)
    result = probe.evaluate(xt, yt)
    assert result.mae_exp < 0.2 * median_predictor_mae(y, yt)
    clipped = fit_ridge_probe(x, y, xv, yv, age_range=(30.0, 50.0)).predict(xt)
    assert clipped.min() >= 30.0 and clipped.max() <= 50.0


def test_direct_predictions_are_decoded_as_value_and_rounded() -> None:
    ev = evaluate_age_predictions([20.4, 31.6], [20, 30])
    assert ev.mae_exp == pytest.approx(1.0) and ev.mae_max == pytest.approx(1.0)
    assert list(ev.pred_max) == [20.0, 32.0] and ev.cs_exp[1] == 0.5


def test_rank_probe_expectation_on_ordered_features() -> None:
    rng = np.random.default_rng(1)
    ends = rng.normal(size=(2, 24))
    ages = np.arange(20, 31)  # ranks 20..30 of 0..100

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.choice(ages, size=n)
        t = ((y - 20) / 10.0)[:, None]
        return (1 - t) * ends[0] + t * ends[1] + 0.05 * rng.normal(size=(n, 24)), y

    (x, y), (xv, yv), (xt, yt) = draw(110), draw(60), draw(200)
    probe = fit_rank_linear_probe(x, y, xv, yv, np.arange(101.0))
    logp = probe.log_probs(xt)
    assert logp.shape == (200, 101) and np.isneginf(logp[:, 0]).all()
    np.testing.assert_allclose(np.exp(logp).sum(axis=1), 1.0)
    result = probe.evaluate(xt, yt)
    assert result.mae_exp < 0.5 * median_predictor_mae(y, yt)


def zero_shot_ages(clip, names, templates, features, labels):
    """Zero-shot (one template) or prompt-ensemble (several) age estimation, as the age zero-shot job computes it."""
    weights = zero_shot_classifier(clip, names, templates)  # (K, D)
    logits = classifier_logits(weights, features, clip.model.logit_scale.detach().cpu())  # (N, K)
    return evaluate_ages(logits, labels, rank_values(names))


def test_zero_shot_and_ensemble_over_age_templates(rn50: LoadedClip) -> None:
    names = rank_classnames(20, 24)
    features = torch.randn(6, rn50.embed_dim, generator=torch.Generator().manual_seed(0))
    labels = [0, 1, 2, 3, 4, 0]
    single = zero_shot_ages(rn50, names, AGE_TEMPLATES[0], features, labels)
    again = zero_shot_ages(rn50, names, [AGE_TEMPLATES[0]], features, labels)
    np.testing.assert_allclose(single.pred_exp, again.pred_exp, rtol=1e-6)
    assert ((single.pred_exp >= 20) & (single.pred_exp <= 24)).all() and set(single.pred_max) <= set(range(20, 25))
    ensemble = zero_shot_ages(rn50, names, AGE_TEMPLATES[:3], features, labels)
    assert ensemble.n == 6 and not np.allclose(ensemble.pred_exp, single.pred_exp)

"""Age decoding, MAE / CS metrics and OrdinalCLIP's KL loss, checked against hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from coopipe.errors import DatasetError
from coopipe.evaluate import classifier_logits
from coopipe.ordinal import (
    cumulative_scores,
    evaluate_ages,
    median_predictor_mae,
    ordinal_kl_loss,
    rank_loss,
)

VALUES = np.array([20.0, 21.0, 22.0])  # ages of the three ranks
PROBS = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3], [0.5, 0.0, 0.5]])
LABELS = np.array([0, 2, 1])  # true ages 20, 22, 21


def test_decodings_and_metrics_match_hand_computation() -> None:
    # expectations: 4 + 10.5 + 6.6 = 21.1; 12 + 2.1 + 6.6 = 20.7; 10 + 11 = 21.0
    # arg-max ages: 21, 20, 20 (first maximum); absolute errors exp 1.1, 1.3, 0.0; max 1, 2, 1
    with np.errstate(divide="ignore"):
        logits = np.log(PROBS)  # log(0) = -inf: probability 0
    ev = evaluate_ages(logits, LABELS, VALUES)
    np.testing.assert_allclose(ev.pred_exp, [21.1, 20.7, 21.0])
    np.testing.assert_allclose(ev.pred_max, [21.0, 20.0, 20.0])
    assert ev.mae_exp == pytest.approx((1.1 + 1.3 + 0.0) / 3)
    assert ev.mae_max == pytest.approx((1 + 2 + 1) / 3)
    assert ev.cs_exp[1] == pytest.approx(1 / 3) and ev.cs_exp[2] == pytest.approx(1.0)
    assert ev.cs_max[1] == pytest.approx(2 / 3) and ev.cs_max[2] == pytest.approx(1.0)
    assert sorted(ev.cs_exp) == list(range(1, 11))
    assert ev.within(1, "max") == pytest.approx(2 / 3) and ev.within(5) == 1.0
    d = ev.to_dict()
    assert d["within_1_exp"] == pytest.approx(1 / 3) and d["mae_max"] == pytest.approx(4 / 3)


def test_logits_are_softmaxed_before_decoding() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = 0.25, 0.75
    ev = evaluate_ages(logits, torch.tensor([0]), [10.0, 30.0])
    assert ev.pred_exp[0] == pytest.approx(25.0) and ev.pred_max[0] == 30.0 and ev.mae_exp == pytest.approx(15.0)


def test_cumulative_score_counts_errors_at_or_below_t() -> None:
    cs = cumulative_scores(np.array([0.0, -1.0, 2.5, 10.0, 11.0]))
    assert cs[1] == pytest.approx(2 / 5) and cs[2] == pytest.approx(2 / 5) and cs[3] == pytest.approx(3 / 5)
    assert cs[10] == pytest.approx(4 / 5)


def test_median_predictor() -> None:
    assert median_predictor_mae([20, 30, 40], [30, 35, 25]) == pytest.approx(10 / 3)


def test_bad_shapes_are_clear_errors() -> None:
    with pytest.raises(DatasetError, match="rank values"):
        evaluate_ages(np.zeros((2, 3)), [0, 1], [1.0, 2.0])
    with pytest.raises(DatasetError, match="0..2"):
        evaluate_ages(np.zeros((1, 3)), [3], VALUES)


def test_kl_term_matches_a_hand_loop() -> None:
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.5], [1.5, 0.2, -0.3, 0.0], [0.1, 0.9, -2.0, 1.2]], dtype=torch.float64)
    labels = torch.tensor([1, 1, 3])
    expected, present = 0.0, 0
    for r in range(4):
        members = [j for j in range(3) if labels[j] == r]
        if not members:
            continue
        present += 1
        weights = [math.exp(10.0) if j in members else 1.0 for j in range(3)]
        q = [w / sum(weights) for w in weights]
        column = [float(logits[j, r]) for j in range(3)]
        log_norm = math.log(sum(math.exp(c) for c in column))
        expected += sum(q[j] * (math.log(q[j]) - (column[j] - log_norm)) for j in range(3))
    expected /= present
    assert float(ordinal_kl_loss(logits, labels)) == pytest.approx(expected, rel=1e-12)
    ce = float(torch.nn.functional.cross_entropy(logits, labels))
    assert float(rank_loss(logits, labels)) == pytest.approx(ce + expected, rel=1e-12)


def test_age_classifier_uses_clip_logits() -> None:
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    images = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # cosines (1, 0) and (0.707, 0.707)
    ev = evaluate_ages(classifier_logits(text, images, math.log(2.0)), [0, 1], [30.0, 40.0])  # what eval computes
    p = math.exp(2.0) / (math.exp(2.0) + 1.0)  # scale 2: logits (2, 0)
    assert ev.pred_exp[0] == pytest.approx(30 * p + 40 * (1 - p)) and ev.pred_exp[1] == pytest.approx(35.0)

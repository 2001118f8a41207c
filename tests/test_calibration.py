"""Answer calibration of zero-shot answers (model/calibration.py)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from bids_fmrilm.model.calibration import apply_calibration, fit_calibration


def _biased(n=600, prior=(0.0, 2.5, 0.0), signal=1.5, seed=0):
    """Three-answer probabilities whose ranking is informative but whose prior favours answer 1
    (a language model that says 'typical' too often), true answers balanced."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = signal * np.eye(3)[y] + rng.normal(0, 1, (n, 3)) + np.asarray(prior)
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True), y


def test_calibration_moves_thresholds_and_improves_balanced_accuracy_on_new_runs():
    p_fit, y_fit = _biased(seed=0)
    p_new, y_new = _biased(seed=1)
    cal = fit_calibration(p_fit, y_fit, ["lower", "typical", "higher"])
    assert cal["answers"] == ["lower", "typical", "higher"] and cal["n"] == 600
    assert cal["bias"][0] == 0.0 and cal["bias"][1] < -1.5  # the 'typical' prior is taken back
    before = balanced_accuracy_score(y_new, p_new.argmax(1))
    after = balanced_accuracy_score(y_new, apply_calibration(p_new, cal).argmax(1))
    assert before < 0.50 and after > before + 0.15
    q = apply_calibration(p_new, cal)
    assert np.allclose(q.sum(1), 1.0) and (q >= 0).all()


def test_calibration_of_a_calibrated_model_is_near_identity_and_keeps_binary_auroc():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 1.5, (2000, 3))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in p])  # answers drawn from the probabilities: calibrated
    cal = fit_calibration(p, y)
    assert abs(cal["scale"] - 1.0) < 0.25 and max(abs(b) for b in cal["bias"]) < 0.25
    # two answers: calibration is monotone in p(positive), so the AUROC cannot change
    rng = np.random.default_rng(3)
    y2 = rng.integers(0, 2, 300)
    s = 0.8 * y2 + rng.normal(0, 1, 300) - 2.0
    p2 = np.stack([1 / (1 + np.exp(s)), 1 / (1 + np.exp(-s))], 1)
    cal2 = fit_calibration(p2, y2)
    q2 = apply_calibration(p2, cal2)
    assert roc_auc_score(y2, q2[:, 1]) == roc_auc_score(y2, p2[:, 1])
    assert balanced_accuracy_score(y2, q2.argmax(1)) > balanced_accuracy_score(y2, p2.argmax(1))


def test_calibration_applies_only_to_its_own_answers():
    p, y = _biased(seed=4)
    cal = fit_calibration(p, y, ["lower", "typical", "higher"])
    assert np.array_equal(apply_calibration(p, None), p)
    assert np.array_equal(apply_calibration(p, cal, ["higher", "typical", "lower"]), p)  # another order
    assert np.array_equal(apply_calibration(p[:, :2] / p[:, :2].sum(1, keepdims=True), cal),
                          p[:, :2] / p[:, :2].sum(1, keepdims=True))  # another number of answers
    assert not np.allclose(apply_calibration(p, cal, ["lower", "typical", "higher"]), p)

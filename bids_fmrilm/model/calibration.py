"""Answer calibration: the zero-shot answer probabilities of a task, re-weighted on training runs.

A language model's constrained answers rank runs well before its thresholds are right: after a
few hundred instruction steps the fMRI-LM orders runs by their mean within-network FC with a
one-vs-rest AUROC above 0.9 and still answers "typical" for most of them, because the answer's
prior (most runs are typical) outweighs the evidence. Calibration fits, per task, one temperature
and one offset per answer on the model's own log-probabilities of training runs
(Zhao et al. 2021, *Calibrate before use*; Guo et al. 2017's vector scaling restricted to a
shared slope), with each class weighted by the inverse of its frequency so that the decision
targets balanced accuracy, the figure the information gates read::

    p'(a | run) = softmax_a( scale * log p(a | run) + bias_a )      bias of the first answer = 0

The fit is convex (a multinomial logistic regression with one input per answer, the slope shared),
solved with L-BFGS and a small ridge on the parameters so that a task the model cannot separate
stays close to the identity. Calibration never changes the order of runs for a two-answer task
(its AUROC is unchanged); it moves the thresholds. It is stored in the checkpoint's
``fmrilm.json`` (``calibration``, keyed by task name) and applied to zero-shot answers only
(few-shot prompts carry their own evidence).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

RIDGE = 1e-2  # penalty on (scale - 1) and the biases, relative to the class-balanced mean loss


def fit_calibration(proba: np.ndarray, y: np.ndarray, answers: Sequence[str] | None = None,
                    ridge: float = RIDGE) -> dict[str, object]:
    """Fit one task's calibration.

    Parameters
    ----------
    proba : ndarray of shape (n_runs, n_answers)
        Uncalibrated answer probabilities of training runs.
    y : ndarray of shape (n_runs,)
        Index of each run's true answer.
    answers : sequence of str, optional
        The task's answers, recorded so that the calibration applies to this answer list only.
    ridge : float
        Penalty on ``(scale - 1)**2 + sum(bias**2)``.

    Returns
    -------
    dict
        ``scale`` (float, > 0), ``bias`` (list, one per answer, the first 0), ``answers``,
        ``n`` (runs used) and ``class_counts``.
    """
    from scipy.optimize import minimize

    logp = np.log(np.clip(np.asarray(proba, np.float64), 1e-12, 1.0))
    y = np.asarray(y, dtype=int)
    n, A = logp.shape
    counts = np.bincount(y, minlength=A).astype(np.float64)
    present = counts > 0
    w = np.where(present, 1.0 / np.maximum(counts, 1.0), 0.0)[y] / present.sum()  # class-balanced weights

    def loss(theta):
        log_scale, b = theta[0], np.concatenate([[0.0], theta[1:]])
        scale = np.exp(log_scale)
        z = scale * logp + b
        z = z - z.max(1, keepdims=True)
        lse = np.log(np.exp(z).sum(1))
        p = np.exp(z - lse[:, None])
        nll = float(np.sum(w * (lse - z[np.arange(n), y])))
        g = p.copy()
        g[np.arange(n), y] -= 1.0
        g *= w[:, None]  # d nll / d z
        d_log_scale = float(np.sum(g * logp)) * scale
        d_b = g.sum(0)[1:]
        pen = ridge * ((scale - 1.0) ** 2 + np.sum(theta[1:] ** 2))
        d_pen_scale = ridge * 2.0 * (scale - 1.0) * scale
        return nll + pen, np.concatenate([[d_log_scale + d_pen_scale], d_b + 2.0 * ridge * theta[1:]])

    res = minimize(loss, np.zeros(A), jac=True, method="L-BFGS-B", bounds=[(-4.0, 4.0)] + [(-20.0, 20.0)] * (A - 1))
    theta = res.x
    return {"scale": float(np.exp(theta[0])), "bias": [0.0] + [float(v) for v in theta[1:]],
            "answers": None if answers is None else [str(a) for a in answers], "n": int(n),
            "class_counts": [int(c) for c in counts]}


def apply_calibration(proba: np.ndarray, calibration: Mapping | None,
                      answers: Sequence[str] | None = None) -> np.ndarray:
    """Calibrated probabilities (n_runs, n_answers) of a task whose answers are ``answers``;
    unchanged without a calibration, or when the calibration was fitted on another answer list
    (e.g. a group-level label that shares a task's name)."""
    p = np.asarray(proba, np.float64)
    if not calibration or len(calibration.get("bias", ())) != p.shape[1]:
        return p
    if answers is not None and calibration.get("answers") is not None \
            and [str(a) for a in answers] != list(calibration["answers"]):
        return p
    z = float(calibration["scale"]) * np.log(np.clip(p, 1e-12, 1.0)) + np.asarray(calibration["bias"], np.float64)
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)

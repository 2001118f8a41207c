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

Readout evidence (late fusion). A checkpoint with a run readout (:mod:`~bids_fmrilm.model.readout`)
carries, among the readout's values, its own linear score for most tasks: each phenotype class's
indicator, the age, every descriptor's z-score. After stage 3 the LLM's answer follows that
score only loosely (held-out diagnosis: LLM answer AUROC 0.61, the readout's score 0.73, their
correlation 0.40 on ABIDE), and the two carry partly independent evidence (correlation 0.30 on
training runs, where neither is memorised: the readout's scores of training runs are cross-fitted
across sites). So the calibration adds the task's readout score with one fitted weight::

    p'(a | run) = softmax_a( scale * log p(a | run) + bias_a + weight * e_a(run) )

where ``e_a`` is the score of the class answer ``a`` stands for (class indicators) or, for ordered
answers (age bins, descriptor levels), the value score times the answer's centred rank. Which
readout values and how they map to answers (:func:`task_evidence`) is stored with the fit; the
held-out evaluation reports the LLM's answers calibrated alone and the readout score calibrated
alone (both fitted on the same training runs, stored under ``parts`` and never applied) beside
the fused answer, so what each part carries stays visible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

RIDGE = 1e-2  # penalty on (scale - 1), the biases and the evidence weight, relative to the class-balanced mean loss


def task_evidence(task, names: Sequence[str]) -> dict[str, list] | None:
    """The readout values that speak for ``task``'s answers, or None.

    Parameters
    ----------
    task : Task
        A checkpoint task (its ``source``, ``answers``, ``bins`` and ``value_map`` are read).
    names : sequence of str
        The readout's value names (:attr:`~bids_fmrilm.model.readout.Readout.names`).

    Returns
    -------
    dict or None
        ``columns`` (readout value names) and ``design`` (one row per column, one entry per
        answer): the evidence of answer ``a`` is ``sum_c readout[c] * design[c][a]``. Descriptor
        questions read ``z:<key>`` and binned phenotypes ``<task>:value``, both with the answers'
        centred ranks; class phenotypes read each ``<task>:<class>`` indicator for the answer that
        class maps to.
    """
    where, _, key = task.source.partition(":")
    A = len(task.answers)
    ranks = [a - (A - 1) / 2.0 for a in range(A)]
    value = f"z:{key}" if where == "descriptor" else f"{task.name}:value" if where == "phenotype" and task.bins else None
    if value is not None:
        return {"columns": [value], "design": [ranks]} if value in names else None
    if where != "phenotype":
        return None
    cols, design = [], []
    for n in names:
        head, _, cls = n.partition(":")
        answer = (task.value_map or {}).get(cls.strip().lower()) if head == task.name and cls != "value" else None
        if answer in task.answers:
            cols.append(n)
            design.append([1.0 if a == answer else 0.0 for a in task.answers])
    return {"columns": cols, "design": design} if cols else None


def evidence_matrix(spec: Mapping, readouts: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Evidence (n_runs, n_answers) of a :func:`task_evidence` ``spec`` from run readouts (n_runs, S)
    whose values are ``names``."""
    idx = [list(names).index(c) for c in spec["columns"]]
    return np.asarray(readouts, np.float64)[:, idx] @ np.asarray(spec["design"], np.float64)


def fit_calibration(proba: np.ndarray, y: np.ndarray, answers: Sequence[str] | None = None,
                    ridge: float = RIDGE, evidence: np.ndarray | None = None,
                    evidence_spec: Mapping | None = None, prior: Mapping | None = None) -> dict[str, object]:
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
        Penalty on ``(scale - 1)**2 + sum(bias**2) + weight**2`` (with a ``prior``, on the
        distances to its scale, biases and weight instead).
    evidence : ndarray of shape (n_runs, n_answers), optional
        Readout evidence of the same runs (:func:`evidence_matrix`; cross-fitted readouts for
        training runs); fits the evidence ``weight`` too.
    evidence_spec : mapping, optional
        The :func:`task_evidence` that made ``evidence``, stored with the fit.
    prior : mapping, optional
        A calibration of the same task the fit starts from and is pulled towards
        (:func:`refit_calibration`).

    Returns
    -------
    dict
        ``scale`` (float, > 0), ``bias`` (list, one per answer, the first 0), ``answers``,
        ``n`` (runs used) and ``class_counts``; with evidence also ``evidence`` (the spec) and
        ``weight``.
    """
    from scipy.optimize import minimize

    logp = np.log(np.clip(np.asarray(proba, np.float64), 1e-12, 1.0))
    y = np.asarray(y, dtype=int)
    n, A = logp.shape
    counts = np.bincount(y, minlength=A).astype(np.float64)
    present = counts > 0
    w = np.where(present, 1.0 / np.maximum(counts, 1.0), 0.0)[y] / present.sum()  # class-balanced weights

    E = None if evidence is None else np.asarray(evidence, np.float64)
    n_b = A - 1
    # the centre of the penalty (and the start): identity, or the prior calibration
    centre = np.zeros(1 + n_b + (E is not None))
    if prior is not None:
        centre[0] = np.log(float(prior["scale"]))
        centre[1:1 + n_b] = np.asarray(prior["bias"], np.float64)[1:]
        if E is not None:
            centre[-1] = float(prior.get("weight") or 0.0)
    s0 = float(np.exp(centre[0]))

    def loss(theta):
        log_scale, b = theta[0], np.concatenate([[0.0], theta[1:1 + n_b]])
        scale = np.exp(log_scale)
        z = scale * logp + b
        if E is not None:
            z = z + theta[-1] * E
        z = z - z.max(1, keepdims=True)
        lse = np.log(np.exp(z).sum(1))
        p = np.exp(z - lse[:, None])
        nll = float(np.sum(w * (lse - z[np.arange(n), y])))
        g = p.copy()
        g[np.arange(n), y] -= 1.0
        g *= w[:, None]  # d nll / d z
        d_log_scale = float(np.sum(g * logp)) * scale
        grad = np.concatenate([[d_log_scale], g.sum(0)[1:]] + ([[float(np.sum(g * E))]] if E is not None else []))
        pen = ridge * ((scale - s0) ** 2 + np.sum((theta[1:] - centre[1:]) ** 2))
        d_pen = 2.0 * ridge * (theta - centre)
        d_pen[0] = ridge * 2.0 * (scale - s0) * scale
        return nll + pen, grad + d_pen

    bounds = [(-4.0, 4.0)] + [(-20.0, 20.0)] * n_b + ([(-20.0, 20.0)] if E is not None else [])
    start = np.clip(centre, [b[0] for b in bounds], [b[1] for b in bounds])
    res = minimize(loss, start, jac=True, method="L-BFGS-B", bounds=bounds)
    theta = res.x
    out: dict[str, object] = {"scale": float(np.exp(theta[0])), "bias": [0.0] + [float(v) for v in theta[1:1 + n_b]],
                              "answers": None if answers is None else [str(a) for a in answers], "n": int(n),
                              "class_counts": [int(c) for c in counts]}
    if E is not None:
        out["weight"] = float(theta[-1])
        out["evidence"] = None if evidence_spec is None else {k: list(v) for k, v in evidence_spec.items()}
    return out


REFIT_RIDGES = (1.0, 0.1, 0.01)
"""Penalties (towards the checkpoint's calibration) that :func:`refit_calibration` tries."""


def balanced_log_loss(proba: np.ndarray, y: np.ndarray) -> float:
    """Log loss with each present class weighted equally (the objective of :func:`fit_calibration`)."""
    p = np.clip(np.asarray(proba, np.float64)[np.arange(len(y)), y], 1e-12, 1.0)
    classes = np.unique(y)
    return float(np.mean([-np.log(p[y == c]).mean() for c in classes]))


PROBE_CS = (0.01, 0.1)
"""Inverse L2 penalties of the shots' readout probe (:func:`fit_probe`) that :func:`refit_calibration`
tries (on standardised readout values)."""

PROBE_RIDGE = 0.1
"""Penalty of the calibration fitted around a readout probe (towards the prior's slope and biases
and an evidence weight of 1: the probe's scores are log-odds)."""


def fit_probe(readouts: np.ndarray, y: np.ndarray, n_answers: int, names: Sequence[str], C: float,
              seed: int = 0) -> tuple[dict[str, list], np.ndarray]:
    """A class-balanced L2 logistic regression of the answers on standardised readout values.

    The probe is what a few labelled participants can add to a checkpoint: a new linear read of
    the run readout (its principal components and every score), for a label the readout has no
    score of or one the user's sites see differently. It is returned in the form of
    :func:`task_evidence`, so that a calibration applies it like the checkpoint's own evidence.

    Parameters
    ----------
    readouts : ndarray of shape (n_runs, S)
        The runs' readouts.
    y : ndarray of shape (n_runs,)
        Index of each run's answer (at least two distinct).
    n_answers : int
        Number of answers of the task.
    names : sequence of str
        The readout's value names (``columns`` of the spec).
    C : float
        Inverse penalty of the logistic regression.
    seed : int
        Random state of the solver.

    Returns
    -------
    spec : dict
        ``columns`` (every readout value) and ``design`` (S rows, one entry per answer: the
        log-odds weights on the raw readout values; answers without runs get 0).
    constant : ndarray of shape (n_answers,)
        What the probe adds to each answer whatever the run (intercepts and the standardisation's
        centre); :func:`probe_evidence` includes it, a calibration's biases absorb it.
    """
    from sklearn.linear_model import LogisticRegression

    X = np.asarray(readouts, np.float64)
    mu, sd = X.mean(0), X.std(0)
    sd = np.where(sd > 1e-8, sd, 1.0)
    clf = LogisticRegression(C=C, class_weight="balanced", max_iter=2000, random_state=seed)
    clf.fit((X - mu) / sd, y)
    W = np.zeros((n_answers, X.shape[1]))
    b = np.zeros(n_answers)
    if len(clf.classes_) == 2:  # one decision function: the log-odds of the second class
        W[clf.classes_[1]], b[clf.classes_[1]] = clf.coef_[0], clf.intercept_[0]
    else:
        W[clf.classes_], b[clf.classes_] = clf.coef_, clf.intercept_
    design = (W / sd).T  # (S, A) on the raw values
    constant = b - mu @ design
    return {"columns": list(names), "design": design.tolist()}, constant


def probe_evidence(spec: Mapping, constant: np.ndarray, readouts: np.ndarray) -> np.ndarray:
    """Evidence (n_runs, n_answers) of a :func:`fit_probe`: the answers' log-odds scores."""
    return np.asarray(readouts, np.float64) @ np.asarray(spec["design"], np.float64) + constant


def _crossfit_probe(readouts: np.ndarray, y: np.ndarray, groups: np.ndarray, n_answers: int,
                    names: Sequence[str], C: float, n_folds: int, seed: int) -> np.ndarray | None:
    """Participant-grouped cross-fitted probe evidence of every run, or None when a class has
    fewer than two participants."""
    from sklearn.model_selection import StratifiedGroupKFold

    first = dict(zip(groups, y))
    counts = np.bincount(list(first.values()))
    k = min(n_folds, int(counts[counts > 0].min()))
    if k < 2 or len(set(y)) < 2:
        return None
    out = np.zeros((len(y), n_answers))
    for train, test in StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(readouts, y, groups):
        if len(set(y[train])) < 2:
            return None
        spec, const = fit_probe(readouts[train], y[train], n_answers, names, C, seed)
        out[test] = probe_evidence(spec, const, readouts[test])
    return out


def fit_probe_calibration(proba: np.ndarray, y: np.ndarray, groups: Sequence[str], prior: Mapping,
                          readouts: np.ndarray, names: Sequence[str], C: float, n_folds: int = 5,
                          seed: int = 0) -> dict[str, object] | None:
    """A calibration of the LLM's answer fused with a readout probe fitted on the same runs.

    The evidence weight is fitted on the probe's cross-fitted scores (stacking: each run scored by
    a probe that did not see its participant), then the probe is fitted on every run; the
    probe's constant goes into the biases. Slope and biases are pulled towards ``prior``'s, the
    weight towards 1 (:data:`PROBE_RIDGE`). None when a class has fewer than two participants.
    """
    y = np.asarray(y, dtype=int)
    groups = np.asarray(groups)
    A = proba.shape[1]
    crossfit = _crossfit_probe(readouts, y, groups, A, names, C, n_folds, seed)
    if crossfit is None:
        return None
    spec, const = fit_probe(readouts, y, A, names, C, seed)
    centre = {"scale": prior["scale"], "bias": prior["bias"], "weight": 1.0}
    cal = fit_calibration(proba, y, prior.get("answers"), PROBE_RIDGE, crossfit, spec, prior=centre)
    shift = float(cal["weight"]) * (const - const[0])  # the first answer's bias stays 0
    cal["bias"] = [float(b + s) for b, s in zip(cal["bias"], shift)]
    return cal


def refit_calibration(proba: np.ndarray, y: np.ndarray, groups: Sequence[str], prior: Mapping,
                      evidence: np.ndarray | None = None, ridges: Sequence[float] = REFIT_RIDGES,
                      n_folds: int = 5, seed: int = 0, readouts: np.ndarray | None = None,
                      readout_names: Sequence[str] | None = None, probe_cs: Sequence[float] = PROBE_CS
                      ) -> tuple[dict[str, object], dict[str, object]]:
    """Fit a checkpoint's calibration of one task again on a user's labelled runs, or keep it.

    The calibration's few parameters (a slope, one bias per answer, the readout evidence's weight)
    decide how much the LLM's answer and the readout's score count; on training runs the LLM has
    seen, the fit trusts the LLM more than new sites bear out. A user's own labels are runs it has
    never seen, so they can set those weights again, with a convex fit of a handful of parameters
    that a few participants per class support where LoRA's gradient steps do not. Candidates: the
    checkpoint's calibration as it is, and fits pulled towards it with each of ``ridges``; each
    is scored by participant-grouped cross-validation (class-balanced log loss of the held-out
    participants' runs), and the best is fitted again on every run; a fit must beat the
    checkpoint's calibration to replace it, and a probe the best other candidate by more than one
    standard error of the participants' paired losses. With the runs' ``readouts``, a readout probe per
    ``probe_cs`` is a candidate too (:func:`fit_probe_calibration`: a logistic regression of the
    answers on the whole readout, fused with the LLM's answer in place of the checkpoint's
    evidence), scored by the same cross-validation with the probe fitted inside each training
    fold; it reads what the checkpoint's score of the task misses (a label the checkpoint has
    no score for, an effect the user's sites show and its training sites did not).

    Parameters
    ----------
    proba : ndarray of shape (n_runs, n_answers)
        Uncalibrated answer probabilities of the labelled runs.
    y : ndarray of shape (n_runs,)
        Index of each run's true answer.
    groups : sequence of str
        Each run's participant (all runs of a participant on one side of every split).
    prior : mapping
        The checkpoint's calibration of the task.
    evidence : ndarray of shape (n_runs, n_answers), optional
        The runs' readout evidence, when ``prior`` reads it.
    ridges : sequence of float
        Penalties of the candidate fits (relative to the class-balanced mean loss).
    n_folds : int
        Cross-validation folds (fewer when a class has fewer participants).
    seed : int
        Seed of the fold assignment.
    readouts : ndarray of shape (n_runs, S), optional
        The runs' readouts; enables the probe candidates.
    readout_names : sequence of str, optional
        The readout's value names (required with ``readouts``).
    probe_cs : sequence of float
        Inverse penalties of the probe candidates (``"probe:<C>"`` in the report).

    Returns
    -------
    calibration : dict
        The chosen calibration (``prior`` itself when no fit beats it), with ``refit`` (the ridge
        of the fit, ``"probe:<C>"``, or None) added.
    report : dict
        ``cv_loss`` per candidate (``"checkpoint"``, each ridge, each probe), ``chosen``, ``folds``
        and, with probes, ``probe_margin`` (each probe's mean paired change of a participant's
        loss from the best other candidate, and its standard error).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(y, dtype=int)
    groups = np.asarray(groups)
    answers = prior.get("answers")
    spec = prior.get("evidence") if evidence is not None else None
    first = {g: c for g, c in zip(groups, y)}  # a participant's class
    per_class = np.bincount(list(first.values()), minlength=proba.shape[1])
    k = min(n_folds, int(per_class[per_class > 0].min())) if len(set(y)) > 1 else 0
    kept = {**prior, "refit": None}
    if k < 2:
        return kept, {"cv_loss": {}, "chosen": "checkpoint", "folds": 0}

    def fit(rows, ridge):
        return fit_calibration(proba[rows], y[rows], answers, ridge, None if evidence is None else evidence[rows],
                               spec, prior=prior)

    def apply(cal, rows):
        return apply_calibration_matrix(proba[rows], cal, None if evidence is None else evidence[rows])

    splits = list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(proba, y, groups))
    held = {"checkpoint": apply(prior, np.arange(len(y)))}  # candidate -> held-out probabilities
    for ridge in ridges:
        out = np.zeros(proba.shape)
        for train, test in splits:
            out[test] = apply(fit(train, ridge), test)
        held[str(ridge)] = out
    margins: dict[str, list[float]] = {}
    if readouts is not None:
        R = np.asarray(readouts, np.float64)
        names = list(readout_names or [])

        def probe(rows, C):
            return fit_probe_calibration(proba[rows], y[rows], groups[rows], prior, R[rows], names, C, n_folds, seed)

        for C in probe_cs:
            out = np.zeros(proba.shape)
            for train, test in splits:
                cal = probe(train, C)
                if cal is None:
                    break
                out[test] = apply_calibration_matrix(proba[test], cal, evidence_matrix(cal["evidence"], R[test], names))
            else:
                held[f"probe:{C:g}"] = out
    cv_loss = {c: balanced_log_loss(v, y) for c, v in held.items()}
    losses = dict(cv_loss)  # the eligible candidates
    if any(c.startswith("probe:") for c in held):
        # a probe has a hundred weights where the other candidates have a few: it must beat the
        # best of them by more than one standard error of the participants' paired losses
        base = min((c for c in held if not c.startswith("probe:")), key=lambda c: (losses[c], c != "checkpoint"))
        for c in [c for c in held if c.startswith("probe:")]:
            mean, se = _paired_change(held[c], held[base], y, groups)
            margins[c] = [round(mean, 5), round(se, 5)]
            if mean + se >= 0:
                del losses[c]
    chosen = min(losses, key=lambda c: (losses[c], c != "checkpoint"))
    report = {"cv_loss": {c: round(v, 5) for c, v in cv_loss.items()}, "chosen": chosen,
              "folds": k, **({"probe_margin": margins} if margins else {})}
    if chosen == "checkpoint":
        return kept, report
    if chosen.startswith("probe:"):
        cal = probe(np.arange(len(y)), float(chosen.split(":", 1)[1]))
        return {**cal, "refit": chosen}, report
    return {**fit(np.arange(len(y)), float(chosen)), "refit": float(chosen)}, report


def _paired_change(proba: np.ndarray, base: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """Mean change of the participants' shares of the class-balanced log loss from ``base`` to
    ``proba`` (summed over participants it is the change of :func:`balanced_log_loss`), and its
    standard error."""
    counts = np.bincount(y)
    w = 1.0 / (len(np.unique(y)) * counts[y])
    d = w * (np.log(np.clip(base[np.arange(len(y)), y], 1e-12, 1)) - np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, 1)))
    per = np.array([d[groups == g].sum() for g in np.unique(groups)])
    return float(per.mean()), float(per.std(ddof=1) / np.sqrt(len(per))) if len(per) > 1 else 0.0


def apply_calibration_matrix(proba: np.ndarray, calibration: Mapping, evidence: np.ndarray | None = None
                             ) -> np.ndarray:
    """:func:`apply_calibration` with the evidence matrix given directly (n_runs, n_answers)."""
    return _calibrated(proba, calibration, _offset(calibration, len(proba), evidence))


def applies(calibration: Mapping | None, answers: Sequence[str]) -> bool:
    """Whether ``calibration`` is fitted for a task whose answers are ``answers`` (same answers, same order)."""
    return bool(calibration) and len(calibration.get("bias", ())) == len(answers) and (
        calibration.get("answers") is None or list(calibration["answers"]) == [str(a) for a in answers])


def apply_calibration(proba: np.ndarray, calibration: Mapping | None, answers: Sequence[str] | None = None,
                      readouts: np.ndarray | None = None, readout_names: Sequence[str] | None = None) -> np.ndarray:
    """Calibrated probabilities (n_runs, n_answers) of a task whose answers are ``answers``;
    unchanged without a calibration, or when the calibration was fitted on another answer list
    (e.g. a group-level label that shares a task's name).

    A calibration with readout evidence needs the runs' readouts (n_runs, S) and the readout's
    value names (:attr:`~bids_fmrilm.model.readout.Readout.names`).

    Raises
    ------
    ValueError
        When the calibration reads readout evidence and ``readouts`` or a value it reads is missing.
    """
    p = np.asarray(proba, np.float64)
    if not calibration or len(calibration.get("bias", ())) != p.shape[1] \
            or (answers is not None and not applies(calibration, answers)):
        return p
    return _calibrated(p, calibration, calibration_offset(calibration, len(p), readouts, readout_names))


def _calibrated(proba: np.ndarray, calibration: Mapping, offset: np.ndarray) -> np.ndarray:
    """``softmax(scale * log p + offset)`` row by row."""
    z = float(calibration["scale"]) * np.log(np.clip(np.asarray(proba, np.float64), 1e-12, 1.0)) + offset
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def calibration_offset(calibration: Mapping, n_runs: int, readouts: np.ndarray | None = None,
                       readout_names: Sequence[str] | None = None) -> np.ndarray:
    """What a calibration adds to ``scale * log p`` (n_runs, n_answers): the answers' biases and,
    when it reads readout evidence, ``weight`` times the evidence of the runs' ``readouts``.

    Raises
    ------
    ValueError
        When the calibration reads readout evidence and ``readouts`` or a value it reads is missing.
    """
    spec = calibration.get("evidence")
    evidence = None
    if spec and calibration.get("weight"):
        if readouts is None or readout_names is None or not set(spec["columns"]) <= set(readout_names):
            raise ValueError(f"this answer calibration reads the run readout's {', '.join(spec['columns'])}; "
                             "pass the runs' readouts and the readout's value names")
        evidence = evidence_matrix(spec, readouts, readout_names)
    return _offset(calibration, n_runs, evidence)


def _offset(calibration: Mapping, n_runs: int, evidence: np.ndarray | None = None) -> np.ndarray:
    """The answers' biases plus, with ``evidence`` (n_runs, n_answers), ``weight`` times it."""
    offset = np.tile(np.asarray(calibration["bias"], np.float64), (n_runs, 1))
    if evidence is not None and calibration.get("weight"):
        offset = offset + float(calibration["weight"]) * np.asarray(evidence, np.float64)
    return offset


UNSEEN = "training answers the LLM never saw"
"""A calibration's ``fitted_on`` when it was fitted on answers training never showed the LLM."""

READOUT_ALONE = "the readout's score alone, every answered training run (cross-fitted by site)"
"""A calibration's ``fitted_on`` when it reads the readout's score alone: no site the LLM never
read had enough unseen answers to weigh the LLM's answer in honestly."""

LEVEL_MAP_MIN_RUNS = 20
"""Fewest training runs with a score and a z-score for a :func:`fit_level_map`."""


def fit_level_map(score: np.ndarray, z: np.ndarray, column: str, min_runs: int | None = None) -> dict | None:
    """A descriptor's z-score from the readout's score of it: least squares ``z ~ intercept +
    slope * score`` on training runs (their cross-fitted readouts), so a description can say
    *markedly* (:data:`~bids_fmrilm.descriptors.text.MARKED_Z`) where the three answers only say
    lower or higher. The readout's columns are standardised over training runs, not in z units;
    the map puts them back. The fitted line is the conditional mean of z, so stating "markedly"
    where it crosses the threshold is the more probable choice under symmetric residuals.

    Returns ``{"column", "intercept", "slope", "residual_sd", "r2", "n"}``, or None with fewer
    than ``min_runs`` (default :data:`LEVEL_MAP_MIN_RUNS`) finite pairs or a score without spread.
    """
    min_runs = LEVEL_MAP_MIN_RUNS if min_runs is None else min_runs
    s, t = np.asarray(score, np.float64), np.asarray(z, np.float64)
    ok = np.isfinite(s) & np.isfinite(t)
    if ok.sum() < min_runs or s[ok].std() < 1e-8:
        return None
    slope, intercept = np.polyfit(s[ok], t[ok], 1)
    resid = t[ok] - (intercept + slope * s[ok])
    r2 = 1.0 - resid.var() / max(t[ok].var(), 1e-12)
    return {"column": column, "intercept": float(intercept), "slope": float(slope),
            "residual_sd": float(resid.std()), "r2": float(r2), "n": int(ok.sum())}


def level_z(calibration: Mapping | None, readouts: np.ndarray | None, readout_names: Sequence[str] | None
            ) -> np.ndarray | None:
    """The z-score estimates (n_runs,) of a calibration's ``level_map`` (:func:`fit_level_map`),
    or None without a map, readouts, or the column it reads."""
    m = (calibration or {}).get("level_map")
    if not m or readouts is None or readout_names is None or m["column"] not in readout_names:
        return None
    col = list(readout_names).index(m["column"])
    return m["intercept"] + m["slope"] * np.asarray(readouts, np.float64).reshape(len(readouts), -1)[:, col]

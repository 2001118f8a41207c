"""Honest cross-validation at the group level: folds, baselines, metrics with bootstrap intervals.

Folds are grouped by participant (all runs of a participant fall on one side) and, with
``--cv-group``, by a column such as ``site`` so that whole sites are held out. Every fold asserts
that no held-out participant is in its training set. Baselines are fitted on the training folds
only (scaling included, in a scikit-learn pipeline).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, RidgeCV
from sklearn.metrics import balanced_accuracy_score, f1_score, mean_absolute_error, roc_auc_score
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..errors import DataError
from .labels import Labels


def fc_features(timeseries_files: list[Path]) -> np.ndarray:
    """Upper-triangle Fisher-z functional connectivity averaged over a participant's runs.

    ROIs without signal (``n/a`` columns) contribute zeros, so every participant has the same
    feature vector length.
    """
    mats = []
    for f in timeseries_files:
        ts = pd.read_csv(f, sep="\t", na_values=["n/a"]).to_numpy(float)
        ok = np.isfinite(ts).all(0) & (np.nanstd(ts, axis=0) > 0)
        r = np.zeros((ts.shape[1], ts.shape[1]))
        if ok.sum() > 1:
            r[np.ix_(ok, ok)] = np.corrcoef(ts[:, ok].T)
        mats.append(np.arctanh(np.clip(r, -0.999999, 0.999999)))
    m = np.mean(mats, axis=0)
    return m[np.triu_indices(m.shape[0], 1)]


@dataclass
class Folds:
    """Train/test participant indices per fold, and how they were grouped."""

    splits: list[tuple[np.ndarray, np.ndarray]]
    grouping: str


def make_folds(labels: Labels, participants: list[str], n_folds: int = 5, seed: int = 0) -> Folds:
    """Participant-grouped (and optionally site-grouped) folds, stratified for classification.

    Raises
    ------
    DataError
        When there are fewer participants (or groups) than folds.
    """
    n = len(participants)
    if n < n_folds:
        raise DataError(f"{n} labelled participants for {n_folds} folds",
                        fix="label more participants or lower --folds")
    if labels.groups is not None:
        groups = labels.groups.loc[participants].to_numpy()
        n_groups = len(set(groups))
        if n_groups < 2:
            raise DataError(f"--cv-group gives one group only ({groups[0]!r})", fix="use a column with several values")
        k = min(n_folds, n_groups)
        grouping = f"{labels.groups.name} ({n_groups} groups)"
    else:
        groups = np.asarray(participants)
        k = n_folds
        grouping = "participant"
    y = labels.values.loc[participants].to_numpy()
    if labels.task_type == "classification":
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = list(splitter.split(np.zeros(n), y, groups))
    else:
        splits = list(GroupKFold(n_splits=k).split(np.zeros(n), y, groups))
    pid = np.asarray(participants)
    for train, test in splits:
        assert not set(pid[train]) & set(pid[test]), "a held-out participant is in the training set"
        if labels.groups is not None:
            assert not set(groups[train]) & set(groups[test]), "a held-out group is in the training set"
    return Folds(splits, grouping)


def linear_baseline(task_type: str, y_train: np.ndarray, seed: int = 0, max_components: int = 100):
    """Logistic (classification) or ridge (regression) regression on standardised features (FC
    edges, fMRI-LM embeddings).

    Features can far outnumber participants, so they are first reduced to at most
    ``max_components`` principal components (fitted on the training folds, like everything else)
    and the regularisation strength is chosen by inner cross-validation (up to 3 folds, as many as
    the smallest training class allows; a fixed C=1 when it allows none).
    """
    pca = _TrainSizePCA(max_components, seed)
    if task_type == "classification":
        inner = int(min(3, pd.Series(y_train).value_counts().min()))
        clf = (LogisticRegressionCV(Cs=np.logspace(-4, 1, 6), cv=inner, max_iter=5000, random_state=seed)
               if inner >= 2 else LogisticRegression(C=1.0, max_iter=5000, random_state=seed))
        return make_pipeline(StandardScaler(), pca, clf)
    return make_pipeline(StandardScaler(), pca, RidgeCV(alphas=np.logspace(-2, 5, 15)))


class _TrainSizePCA(PCA):
    """PCA whose component count adapts to the training set size (n_samples - 1 at most)."""

    def __init__(self, max_components: int = 100, random_state: int = 0):
        self.max_components = max_components
        super().__init__(n_components=None, random_state=random_state)

    def fit_transform(self, X, y=None):
        self.n_components = int(min(self.max_components, X.shape[0] - 1, X.shape[1]))
        return super().fit_transform(X, y)

    def fit(self, X, y=None):
        self.n_components = int(min(self.max_components, X.shape[0] - 1, X.shape[1]))
        return super().fit(X, y)


def out_of_fold(model_factory, X: np.ndarray, y: np.ndarray, folds: Folds, classes: list[str] | None) -> np.ndarray:
    """Out-of-fold predictions: class probabilities (n, n_classes) or values (n,).

    ``model_factory(y_train)`` returns an unfitted estimator for one training fold.
    """
    out = np.full((len(y), len(classes)) if classes else len(y), np.nan)
    for train, test in folds.splits:
        model = model_factory(y[train])
        if classes:
            if len(set(y[train])) < 2:
                out[test] = np.mean([y[train] == c for c in classes], axis=1)
                continue
            model.fit(X[train], y[train])
            proba = np.zeros((len(test), len(classes)))
            for j, c in enumerate(model.classes_):
                proba[:, classes.index(c)] = model.predict_proba(X[test])[:, j]
            out[test] = proba
        else:
            model.fit(X[train], y[train])
            out[test] = model.predict(X[test])
    return out


def chance_baseline(y: np.ndarray, folds: Folds, classes: list[str] | None) -> np.ndarray:
    """Training-fold class frequencies (classification) or training-fold mean (regression)."""
    out = np.full((len(y), len(classes)) if classes else len(y), np.nan)
    for train, test in folds.splits:
        if classes:
            out[test] = np.array([np.mean(y[train] == c) for c in classes])[None]
        else:
            out[test] = np.mean(y[train])
    return out


def metrics(y: np.ndarray, pred: np.ndarray, classes: list[str] | None) -> dict[str, float]:
    """Balanced accuracy, AUROC, F1 (classification) or MAE, Pearson r (regression)."""
    if classes:
        hard = np.asarray(classes)[np.argmax(pred, axis=1)]
        out = {"balanced_accuracy": balanced_accuracy_score(y, hard),
               "f1": f1_score(y, hard, average="binary" if len(classes) == 2 else "macro",
                              pos_label=classes[1] if len(classes) == 2 else 1)}
        try:
            out["auroc"] = (roc_auc_score(y == classes[1], pred[:, 1]) if len(classes) == 2
                            else roc_auc_score(y, pred, multi_class="ovr", labels=classes))
        except ValueError:
            out["auroc"] = float("nan")
        return {k: float(v) for k, v in out.items()}
    r = np.corrcoef(y, pred)[0, 1] if np.std(pred) > 0 else float("nan")
    return {"mae": float(mean_absolute_error(y, pred)), "pearson_r": float(r)}


def _binary_metrics(pos: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """Balanced accuracy, F1 and AUROC of a binary problem, vectorised for the bootstrap.

    Equal to scikit-learn's (tested); sklearn's input validation costs ~10 ms a call, which a
    1000-sample bootstrap cannot afford.
    """
    hard = score > 0.5
    tp, fn = np.sum(hard & pos), np.sum(~hard & pos)
    tn, fp = np.sum(~hard & ~pos), np.sum(hard & ~pos)
    sens = tp / (tp + fn) if tp + fn else 0.0
    spec = tn / (tn + fp) if tn + fp else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    n_pos, n_neg = pos.sum(), (~pos).sum()
    ranks = rankdata(score)
    auc = (ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg) if n_pos and n_neg else np.nan
    return {"balanced_accuracy": float((sens + spec) / 2), "f1": float(f1), "auroc": float(auc)}


def bootstrap_ci(y: np.ndarray, pred: np.ndarray, classes: list[str] | None, n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of :func:`metrics` over participants."""
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    n = len(y)
    binary = bool(classes) and len(classes) == 2
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        if classes and len(set(y[idx])) < 2:
            continue
        if binary:
            # ties at p=0.5 go to classes[0], as argmax does in metrics()
            m = _binary_metrics(y[idx] == classes[1], pred[idx, 1] - 1e-12)
        elif classes:
            m = metrics(y[idx], pred[idx], classes)
        else:
            yi, pi = y[idx], pred[idx]
            m = {"mae": float(np.mean(np.abs(yi - pi))),
                 "pearson_r": float(np.corrcoef(yi, pi)[0, 1]) if np.std(pi) > 0 and np.std(yi) > 0 else np.nan}
        for k, v in m.items():
            samples.setdefault(k, []).append(v)
    a = (1 - level) / 2
    return {k: [float(np.nanpercentile(v, 100 * a)), float(np.nanpercentile(v, 100 * (1 - a)))]
            for k, v in samples.items()}


def within_fold_auroc(y: np.ndarray, pred: np.ndarray, classes: list[str] | None, folds: Folds, n_boot: int = 1000,
                      seed: int = 0, level: float = 0.95) -> tuple[float, list[float]]:
    """Mean over folds of each test fold's AUROC (binary labels), with a bootstrap interval.

    Pooled out-of-fold AUROC mixes folds whose predictions carry different offsets (a training
    fold's class prior differs from its test fold's, which site-grouped folds make large: a
    constant-per-fold "chance" predictor then scores far from 0.5). Ranking within each test fold
    removes those offsets. Folds with one class only are skipped; the interval resamples
    participants within each fold. ``(nan, [nan, nan])`` when not binary or no fold qualifies.
    """
    nan = float("nan")
    if not classes or len(classes) != 2:
        return nan, [nan, nan]
    pos = y == classes[1]
    tests = [t for _, t in folds.splits if 0 < pos[t].sum() < len(t)]
    if not tests:
        return nan, [nan, nan]

    def mean_auc(idx_per_fold) -> float:
        return float(np.nanmean([_binary_metrics(pos[i], pred[i, 1])["auroc"] for i in idx_per_fold]))

    rng = np.random.default_rng(seed)
    boots = [mean_auc([t[rng.integers(0, len(t), len(t))] for t in tests]) for _ in range(n_boot)]
    a = (1 - level) / 2
    return mean_auc(tests), [float(np.nanpercentile(boots, 100 * a)), float(np.nanpercentile(boots, 100 * (1 - a)))]

"""The run readout: what the tokenizer knows of a whole run, as a short vector for one LLM position.

The LLM reads each window's region features through learned queries, but a label such as the
diagnosis is a weak pattern spread over thousands of (region, feature) values of the whole run.
Learning that pattern end to end through a 30-layer LLM from a few hundred runs is slow and
overfits; a linear model on the same values, regularised by cross-validation, finds it. The
readout is that linear model, fitted once on the training sites and then frozen:

    run vector (G, c + 13)  per region: encoder features averaged over windows
                            (:meth:`Tokenizer.run_representation`), the log IQR of the signal
                            before scaling, and signal statistics a long-window encoder does not
                            keep (log amplitude in 6 frequency bands, lag-1 autocorrelation,
                            connectivity strength and spread, nodal degree, efficiency,
                            clustering and share of the graph's modularity), on the checkpoint's
                            reference centroids (its training atlas)
        -- affine map -->   (S,) readout:  k whitened principal components (unsupervised)
                                           + one ridge score per target: each phenotype class's
                                             indicator, age, every descriptor z-score

The scores are ridge regressions on every standardised feature (one penalty per target, by
leave-one-out), so the whole readout is one matrix and one bias. Training runs get *cross-fitted*
readouts (each site's runs scored by the models fitted without that site), so during training
the LLM sees scores as noisy as those of a site it never saw, and learns how much to trust them.
Every column is standardised over the training runs.

Atlas independence: a run of another atlas is resampled onto the reference centroids with a
Gaussian kernel on MNI distance (:func:`to_reference`); a run of the training atlas is used as is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

WEIGHTS = "readout.safetensors"
META = "readout.json"
KERNEL_MM = 6.0  # Gaussian kernel width (sigma) of the resampling onto reference centroids


BANDS_HZ = (0.0, 0.01, 0.027, 0.073, 0.12, 0.18, 0.25)
"""Edges of the frequency bands of the per-region amplitude spectrum (slow-5/slow-4 inside)."""

SIGNAL_STATS = len(BANDS_HZ) - 1 + 1 + 6
"""Per-region signal statistics after the encoder features and the log IQR: log amplitude in each
band, lag-1 autocorrelation, and connectivity strength, spread, degree, nodal efficiency,
clustering and modularity share. A readout fitted before the modularity share (36 + 1 features
per region of encoder width 23) reads the leading columns it knows (:meth:`Readout.vector`)."""


def signal_statistics(scaled: np.ndarray, tr: float) -> np.ndarray:
    """Per-region statistics (R, :data:`SIGNAL_STATS`) of a robust-scaled run (T, R) that a
    long-window encoder does not keep: the log mean amplitude spectrum in each band of
    :data:`BANDS_HZ` (the spectrum's shape; the IQR gives its level), the lag-1 autocorrelation,
    and of the region's Fisher-z connectivity row its mean (strength), its standard deviation and,
    in the binary graph of the run's strongest 15 % of positive edges (the descriptors' graph),
    its degree, nodal efficiency (mean inverse shortest-path length to the other regions; their
    mean is the graph's global efficiency) and clustering coefficient (Rubinov & Sporns 2010),
    and, in the same edges weighted by their correlation, the region's share of the modularity
    of the graph's Louvain communities (the descriptors' ``graph.modularity``, same seed):
    ``q_i = sum_j (w_ij - k_i k_j / 2m) [c_i = c_j] / 2m``, whose sum over regions is the
    modularity. Modularity is a property of the whole partition that no linear map of per-region
    connectivity statistics recovers well (held-out ABIDE sites: level balanced accuracy 0.72
    without the share, 0.94 with it). Zero-variance regions get zeros."""
    from scipy.signal import periodogram
    from scipy.sparse.csgraph import shortest_path

    from ..descriptors.features import GRAPH_DENSITY, GRAPH_SEED

    x = np.asarray(scaled, np.float64)
    T, R = x.shape
    xc = x - x.mean(0)
    sd = xc.std(0)
    ok = sd > 1e-8
    out = np.zeros((R, SIGNAL_STATS), np.float32)
    if T < 8 or not ok.any():
        return out
    freqs, psd = periodogram(xc, fs=1.0 / tr, detrend="constant", scaling="density", axis=0)
    amp = np.sqrt(psd)
    k = 0
    for lo, hi in zip(BANDS_HZ[:-1], BANDS_HZ[1:]):
        sel = (freqs > lo) & (freqs <= hi)
        if sel.any():
            out[ok, k] = np.log(amp[sel][:, ok].mean(0) + 1e-6)
        k += 1
    with np.errstate(all="ignore"):
        out[ok, k] = (xc[1:, ok] * xc[:-1, ok]).sum(0) / (xc[:, ok] ** 2).sum(0)
        c = np.corrcoef(xc[:, ok].T)
    k += 1
    z = np.arctanh(np.clip(np.nan_to_num(c), -0.999, 0.999))
    np.fill_diagonal(z, np.nan)
    n = int(ok.sum())
    if n >= 3:
        out[ok, k] = np.nanmean(z, 1)
        out[ok, k + 1] = np.nanstd(z, 1)
        iu = np.triu_indices(n, 1)
        vals = z[iu]
        keep = np.argsort(-vals, kind="stable")[: int(round(GRAPH_DENSITY * vals.size))]
        keep = keep[vals[keep] > 0]
        adj = np.zeros((n, n))
        adj[iu[0][keep], iu[1][keep]] = 1.0
        adj = adj + adj.T
        deg = adj.sum(1)
        out[ok, k + 2] = deg / max(n - 1, 1)
        with np.errstate(divide="ignore"):
            inv = 1.0 / shortest_path(adj, method="D", unweighted=True, directed=False)
        np.fill_diagonal(inv, 0.0)
        out[ok, k + 3] = inv.sum(1) / max(n - 1, 1)
        tri = np.einsum("ij,jk,ki->i", adj, adj, adj)
        with np.errstate(all="ignore"):
            out[ok, k + 4] = np.nan_to_num(tri / (deg * (deg - 1)))
        out[ok, k + 5] = modularity_shares(adj * np.tanh(np.nan_to_num(z)), GRAPH_SEED)
    return out


def modularity_shares(w: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each node's share of the modularity of the Louvain communities of a weighted undirected
    graph (symmetric ``w`` (n, n), zero diagonal; the descriptors' partition,
    :func:`~bids_fmrilm.descriptors.features.louvain_partition` with ``seed``):
    ``q_i = sum_j (w_ij - k_i k_j / 2m) [c_i = c_j] / 2m``, summing to the modularity.
    Zeros for a graph without edges."""
    from ..descriptors.features import louvain_partition

    w = np.asarray(w, np.float64)
    n = w.shape[0]
    k = w.sum(1)
    m2 = k.sum()
    if m2 <= 0:
        return np.zeros(n)
    label = np.zeros(n, dtype=int)
    for c, members in enumerate(louvain_partition(w, seed)[1]):
        label[list(members)] = c
    same = label[:, None] == label[None, :]
    return ((w - np.outer(k, k) / m2) * same).sum(1) / m2


def run_vector(features: np.ndarray, lengths: np.ndarray | None, log_scale: np.ndarray | None,
               scaled: np.ndarray | None = None, tr: float = 2.0) -> np.ndarray:
    """A run's per-region vector (R, c + 1 + :data:`SIGNAL_STATS`): encoder features (n_windows,
    R, c) averaged over windows (weighted by their real volumes, ``lengths``), the log IQR of
    each region before scaling (non-finite, e.g. a zero-variance region, replaced by the run's
    median) and the :func:`signal_statistics` of the robust-scaled series ``scaled`` (T, R) at
    repetition time ``tr`` (zeros without it)."""
    f = np.asarray(features, dtype=np.float32)
    w = np.ones(len(f)) if lengths is None else np.asarray(lengths, dtype=np.float64)[: len(f)]
    rep = np.tensordot(w / w.sum(), f, axes=1).astype(np.float32)  # (R, c)
    ls = np.zeros(rep.shape[0], np.float32) if log_scale is None else np.asarray(log_scale, np.float64).reshape(-1)
    ls = np.where(np.isfinite(ls), ls, np.nan)
    med = np.nanmedian(ls) if np.isfinite(ls).any() else 0.0
    ls = np.where(np.isfinite(ls), ls, med).astype(np.float32)
    stats = (np.zeros((rep.shape[0], SIGNAL_STATS), np.float32) if scaled is None
             else signal_statistics(scaled, tr))
    return np.concatenate([rep, ls[:, None], stats], axis=1)


def tokenized_run_vector(tokenizer, features: np.ndarray, scaled: np.ndarray,
                         log_scale: np.ndarray | None) -> np.ndarray:
    """:func:`run_vector` of a run the ``tokenizer`` encoded: its windows' lengths and its TR
    (training, the API and the group level all build the readout's input here)."""
    return run_vector(features, tokenizer.patch_lengths(len(scaled)), log_scale, scaled,
                      float(tokenizer.meta.get("tr", 2.0)))


def to_reference(vec: np.ndarray, coords: np.ndarray, ref_coords: np.ndarray, sigma: float = KERNEL_MM) -> np.ndarray:
    """Resample a per-region array (R, F) onto reference centroids (G, 3): identity when ``coords``
    are the reference's, else a Gaussian-kernel weighted mean over the regions with centroids
    (normalised per reference point, so the nearest regions dominate wherever they are)."""
    vec = np.asarray(vec, np.float32)
    coords = np.asarray(coords, np.float64).reshape(-1, 3)
    ref = np.asarray(ref_coords, np.float64).reshape(-1, 3)
    if coords.shape == ref.shape and np.allclose(np.nan_to_num(coords, nan=1e6), np.nan_to_num(ref, nan=1e6), atol=1e-3):
        return vec
    ok = np.isfinite(coords).all(1)
    if not ok.any():
        return np.zeros((len(ref), vec.shape[1]), np.float32)
    d2 = ((np.nan_to_num(ref)[:, None, :] - coords[None, ok, :]) ** 2).sum(-1)
    logits = -d2 / (2 * sigma**2)
    w = np.exp(logits - logits.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    return (w @ vec[ok]).astype(np.float32)


@dataclass
class Target:
    """One readout score: ``kind`` ``class`` (the indicator of a phenotype class, ``positive``) or
    ``value`` (a number); ``source`` is ``phenotype:<column>`` or ``descriptor:<z key>``."""

    name: str
    kind: str
    source: str
    positive: str = ""

    def values(self, phenotype: Sequence[Mapping], z: Sequence[Mapping]) -> np.ndarray:
        """Target values of runs (NaN when missing): 0/1 for a class, the number for a value."""
        where, _, key = self.source.partition(":")
        out = np.full(len(phenotype), np.nan)
        for i, (p, zz) in enumerate(zip(phenotype, z)):
            v = (zz or {}).get(key) if where == "descriptor" else (p or {}).get(key)
            if v is None or v == "":
                continue
            if self.kind == "class":
                out[i] = float(str(v).strip().lower() == self.positive.lower())
            else:
                try:
                    out[i] = float(v)
                except (TypeError, ValueError):
                    continue
        return out


def default_targets(tasks: Sequence, z: Sequence[Mapping], phenotype: Sequence[Mapping],
                    min_coverage: float = 0.8) -> list[Target]:
    """Targets for a task list: each phenotype task (classes -> one indicator per class, one for
    two classes; binned numbers -> the number), and every descriptor z-score present in at least
    ``min_coverage`` of the runs (descriptions state them)."""
    out: list[Target] = []
    for t in tasks:
        where, _, key = t.source.partition(":")
        if where != "phenotype":
            continue
        if t.bins:
            out.append(Target(f"{t.name}:value", "value", t.source))
            continue
        raw = {str(p.get(key)).strip() for p in phenotype if p.get(key) not in (None, "")}
        classes = sorted(v for v in raw if v.lower() in t.value_map)
        for c in classes[1:] if len(classes) == 2 else classes:
            out.append(Target(f"{t.name}:{c}", "class", t.source, c))
    counts: dict[str, int] = {}
    for zz in z:
        for k, v in (zz or {}).items():
            if isinstance(v, (int, float)) and np.isfinite(v):
                counts[k] = counts.get(k, 0) + 1
    out += [Target(f"z:{k}", "value", f"descriptor:{k}") for k in sorted(counts) if counts[k] >= min_coverage * len(z)]
    return out


def _affine(pipe, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(W (d, m), b (m,)) of a fitted standardise -> PCA -> linear pipeline (or its first two steps)."""
    W, b = np.eye(d), np.zeros(d)
    for _, step in pipe.steps:
        if hasattr(step, "scale_"):  # StandardScaler
            W, b = W / step.scale_, (b - step.mean_) / step.scale_
        elif hasattr(step, "components_"):  # PCA (whiten divides by the explained std)
            C = step.components_.T
            if getattr(step, "whiten", False):
                C = C / np.sqrt(step.explained_variance_)
            W, b = W @ C, (b - step.mean_) @ C
        elif hasattr(step, "coef_"):
            coef = np.atleast_2d(step.coef_)
            W, b = W @ coef.T, b @ coef.T + np.atleast_1d(step.intercept_)
    return W, b


def _fit_scores(X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Affine map (D, T) of the target scores fitted on ``X``: ridge regression on every
    standardised feature, one penalty per target chosen by leave-one-out (efficient for many
    targets); missing target values are filled with the target's mean (no pull either way).

    A class indicator is regressed too (a linear probability model): on ABIDE's training sites,
    left out one site at a time, it ranked diagnosis and sex better (AUROC 0.672 and 0.634) than
    the group level's PCA + logistic pipeline (0.629, 0.582), and a descriptor that is a mean over
    regions (global efficiency) is not blurred by a PCA step.
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    D = X.shape[1]
    if Y.shape[1] == 0:
        return np.zeros((D, 0)), np.zeros(0)
    ok = np.isfinite(Y)
    mean = np.array([Y[ok[:, j], j].mean() if ok[:, j].any() else 0.0 for j in range(Y.shape[1])])
    y = np.where(ok, Y, mean)
    pipe = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(0, 6, 13), alpha_per_target=True)).fit(X, y)
    return _affine(pipe, D)


class Readout(nn.Module):
    """The frozen affine readout (buffers only): run vectors on reference centroids -> (S,)."""

    def __init__(self, ref_coords: np.ndarray, n_features: int, names: Sequence[str], info: dict | None = None):
        super().__init__()
        G, S = len(ref_coords), len(names)
        self.names = list(names)
        self.n_features = int(n_features)
        self.info = dict(info or {})
        self.register_buffer("ref_coords", torch.as_tensor(np.asarray(ref_coords, np.float32)))
        self.register_buffer("weight", torch.zeros(G * n_features, S))
        self.register_buffer("bias", torch.zeros(S))

    @property
    def dim(self) -> int:
        return len(self.names)

    def vector(self, run_vec: np.ndarray, coords: np.ndarray) -> np.ndarray:
        """Readout (S,) of a run vector (R, F) with its ROI centroids (R, 3). A readout fitted
        on fewer signal statistics (an older checkpoint) reads the leading ``n_features``
        columns: statistics are only ever appended."""
        run_vec = np.asarray(run_vec)[:, : self.n_features]
        x = to_reference(run_vec, coords, self.ref_coords.cpu().numpy()).reshape(-1)
        if x.shape[0] != self.weight.shape[0]:
            raise ValueError(f"run vector has {x.shape[0] // max(len(self.ref_coords), 1)} features per region, "
                             f"the readout {self.n_features}")
        W, b = self.weight.cpu().numpy(), self.bias.cpu().numpy()
        return (x.astype(np.float64) @ W + b).astype(np.float32)

    # ------------------------------------------------------------------------- save / load
    def save(self, folder: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(folder / WEIGHTS), metadata={"format": "pt"})
        (folder / META).write_text(json.dumps({"names": self.names, "n_features": self.n_features,
                                               "info": self.info}, indent=2, default=str))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Readout":
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / META).read_text())
        state = load_file(str(folder / WEIGHTS))
        r = cls(state["ref_coords"].numpy(), meta["n_features"], meta["names"], meta.get("info"))
        r.load_state_dict(state)
        return r


@dataclass
class ReadoutFit:
    """A fitted readout and the cross-fitted readouts of its training runs (N, S)."""

    readout: Readout
    crossfit: np.ndarray
    targets: list[Target] = field(default_factory=list)


def _kept_components(readout: Readout, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """(W (G * n_features, k), b (k,)) of an earlier readout's principal-component columns
    (``pc*``), zero for the per-region features it was fitted without (they come last)."""
    k = sum(n.startswith("pc") for n in readout.names)
    G, F0 = len(readout.ref_coords), readout.n_features
    if n_features < F0:
        raise ValueError(f"run vectors have {n_features} features per region, the kept components {F0}")
    W = np.zeros((G, n_features, k))
    W[:, :F0] = readout.weight[:, :k].cpu().numpy().reshape(G, F0, k)
    return W.reshape(G * n_features, k), readout.bias[:k].cpu().numpy().astype(np.float64)


def _crossfit_metric(t: Target, y: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """How well a score generalises to a site it never saw: AUROC (class) or R^2 (value)."""
    from sklearn.metrics import r2_score, roc_auc_score

    ok = np.isfinite(y)
    if t.kind == "class" and len(np.unique(y[ok])) == 2:
        return {"auroc": float(roc_auc_score(y[ok], score[ok]))}
    if t.kind == "value" and ok.sum() > 2:
        return {"r2": float(r2_score(y[ok], score[ok]))}
    return {}


def fit_readout(run_vecs: Sequence[np.ndarray], coords: np.ndarray, sites: Sequence[str],
                phenotype: Sequence[Mapping], z: Sequence[Mapping], targets: Sequence[Target],
                n_components: int = 16, seed: int = 0, log: Callable[[str], None] = print,
                select_features: bool = True, components: Readout | None = None) -> ReadoutFit:
    """Fit the readout on training runs (one atlas, centroids ``coords``) and cross-fit them by site.

    Parameters
    ----------
    run_vecs : list of (R, c + 1 + :data:`SIGNAL_STATS`) arrays (:func:`run_vector`)
    sites : site of each run; each site's cross-fitted readout comes from models fitted on the
        other sites (one site: 5 folds of runs instead)
    targets : the supervised scores (:func:`default_targets`)
    n_components : whitened principal components kept beside the scores
    select_features : each score is a ridge regression on every feature or on the signal
        statistics alone (log IQR and :func:`signal_statistics`), whichever generalises better
        across the training sites (cross-fitted AUROC or R^2). A descriptor computed from the
        signal (global efficiency, modularity) is found more reliably without the thousands of
        encoder features beside it (held-out ABIDE sites, level balanced accuracy: global
        efficiency 0.84 -> 0.90, modularity 0.87 -> 0.94), a phenotype is not (diagnosis AUROC
        0.73 with them, 0.69 without). Off: every feature (readouts fitted before the choice).
    components : keep this earlier readout's principal components instead of fitting new ones
        (a readout refitted on new signal statistics for an LLM that learned to read them)
    """
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.stack([np.asarray(v, np.float32).reshape(-1) for v in run_vecs]).astype(np.float64)
    N, D = X.shape
    F = int(np.asarray(run_vecs[0]).shape[1])
    Y = np.stack([t.values(phenotype, z) for t in targets], axis=1) if targets else np.zeros((N, 0))
    if components is None:
        k = int(min(n_components, N - 1, D))
        Wp, bp = _affine(make_pipeline(StandardScaler(), PCA(k, whiten=True, random_state=seed)).fit(X), D)
    else:
        Wp, bp = _kept_components(components, F)
        k = Wp.shape[1]
    sites = np.asarray([str(s) for s in sites])
    groups = sites if len(set(sites)) > 1 else np.arange(N) % 5
    feature_sets = {"all": np.ones(D, bool)}
    n_signal = 1 + SIGNAL_STATS
    if select_features and F > n_signal:
        feature_sets["signal"] = np.tile(np.arange(F) >= F - n_signal, D // F)
    fits = {}
    for name, cols in feature_sets.items():
        cross = np.zeros((N, len(targets)))
        for g in np.unique(groups):
            test = groups == g
            W, b = _fit_scores(X[~test][:, cols], Y[~test])
            cross[test] = X[test][:, cols] @ W + b
        W, b = _fit_scores(X[:, cols], Y)
        Wd = np.zeros((D, len(targets)))
        Wd[cols] = W
        fits[name] = (Wd, b, cross, [_crossfit_metric(t, Y[:, j], cross[:, j]) for j, t in enumerate(targets)])
    W, b, cross = np.zeros((D, len(targets))), np.zeros(len(targets)), np.zeros((N, len(targets)))
    described = {"all": "every feature", "signal": "log IQR and signal statistics"}
    info: dict[str, Any] = {"n_train_runs": int(N), "n_sites": int(len(set(sites))), "n_components": k,
                            "crossfit": {}, "feature_sets": {n: described[n] for n in feature_sets}, "features": {}}
    if components is not None:
        info["components_from"] = {"n_features": components.n_features, **{
            key: components.info[key] for key in ("n_train_runs", "n_sites") if key in components.info}}
    for j, t in enumerate(targets):
        best = max(fits, key=lambda n: next(iter(fits[n][3][j].values()), -np.inf))  # ties: "all" (first)
        W[:, j], b[j], cross[:, j] = fits[best][0][:, j], fits[best][1][j], fits[best][2][:, j]
        info["features"][t.name] = best
        if fits[best][3][j]:
            info["crossfit"][t.name] = fits[best][3][j]
    # standardise every column over the training runs (cross-fitted scores: what training shows)
    Wall = np.concatenate([Wp, W], axis=1)
    ball = np.concatenate([bp, b])
    train_vals = np.concatenate([X @ Wp + bp, cross], axis=1)
    mu, sd = train_vals.mean(0), train_vals.std(0) + 1e-8
    if components is not None:  # kept as they are: the values the LLM learned to read
        mu[:k], sd[:k] = 0.0, 1.0
    names = [f"pc{i + 1}" for i in range(k)] + [t.name for t in targets]
    ro = Readout(coords, F, names, info)
    ro.weight.copy_(torch.as_tensor(Wall / sd, dtype=torch.float32))
    ro.bias.copy_(torch.as_tensor((ball - mu) / sd, dtype=torch.float32))
    crossfit = ((train_vals - mu) / sd).astype(np.float32)
    worst = sorted(info["crossfit"].items(), key=lambda kv: next(iter(kv[1].values())))[:3]
    log(f"readout: {k} components + {len(targets)} scores on {N} runs of {info['n_sites']} sites; cross-fitted "
        + ", ".join(f"{n} {m}" for n, m in ((n, " ".join(f"{a} {v:.3f}" for a, v in d.items()))
                                             for n, d in list(info["crossfit"].items())[:4])))
    if len(feature_sets) > 1:
        signal = sorted(n for n, v in info["features"].items() if v == "signal")
        log(f"readout: {len(signal)} of {len(targets)} scores read the signal statistics alone"
            + (f" ({', '.join(signal[:6])}{', ...' if len(signal) > 6 else ''})" if signal else ""))
    if worst:
        log("readout: weakest scores " + ", ".join(f"{n} {list(d.values())[0]:.3f}" for n, d in worst))
    return ReadoutFit(ro, crossfit, list(targets))

"""Imaging-derived features of one run of ROI time series.

The features are the raw material of the descriptor corpus (fMRI-LM, arXiv 2511.21760): each run
is summarised by a flat dictionary of named, scale-free numbers that are later z-scored against a
reference population (:mod:`bids_fmrilm.descriptors.reference`) and verbalised
(:mod:`bids_fmrilm.descriptors.text`).

Feature families (keys are stable across runs of the same atlas; a feature that cannot be
computed for a run is ``None``, never NaN or inf):

``fc_within.<Net>``, ``fc_within.mean``
    Mean Fisher-z of the Pearson correlations between ROIs of the same network (diagonal
    excluded); ``.mean`` pools all within-network ROI pairs.
``fc_between.<NetA>-<NetB>``, ``fc_between.mean``
    Mean Fisher-z between ROIs of two networks (names sorted); ``.mean`` pools all pairs of ROIs
    in different networks.
``fc.mean``, ``fc.segregation``
    Mean Fisher-z over all ROI pairs (unassigned ROIs included), and
    ``fc_within.mean - fc_between.mean``.
``graph.global_efficiency``, ``graph.modularity``, ``graph.clustering``, ``graph.strength``
    On the graph that keeps the strongest :data:`GRAPH_DENSITY` fraction of all possible edges
    among positive correlations (proportional threshold). Efficiency uses the binary graph; the
    modularity of Louvain communities (seed :data:`GRAPH_SEED`), the average clustering
    coefficient and the mean node strength use correlation weights.
``amplitude.<Net>``
    Mean ROI standard deviation in the network, *divided by the median ROI standard deviation of
    the run*. Sites and pipelines deliver signals in different units, so only this relative
    amplitude is comparable across datasets.
``alff.<Net>``, ``alff.mean``
    Mean spectral amplitude (square root of the periodogram) in :data:`LOW_BAND`, divided by the
    run's median ROI standard deviation (same scale-free convention as ``amplitude``).
``falff.<Net>``, ``falff.mean``
    Amplitude summed over :data:`LOW_BAND` divided by amplitude summed over all frequencies
    above 0 Hz (fractional ALFF).
``power_ratio.<Net>``, ``power_ratio.mean``
    Power in :data:`LOW_BAND` divided by power in :data:`HIGH_BAND` (upper edge clipped to the
    Nyquist frequency).
``autocorr1.<Net>``, ``autocorr1.mean``
    Lag-1 autocorrelation of the ROI series, averaged over ROIs.
``motion.fd_mean``, ``motion.fd_max``, ``motion.fd_frac_gt_0p5``
    Framewise displacement summary (mm) when ``fd_mean`` or an ``fd`` series is given.

Network features use every network of the ROI table except ``unassigned``; ROIs with no signal
(all-NaN or zero-variance columns) are excluded from every computation.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import signal as sps

GRAPH_DENSITY = 0.15
"""Fraction of all possible ROI pairs kept as edges (strongest positive correlations)."""

GRAPH_SEED = 0
"""Seed of the Louvain community detection, so modularity is deterministic."""

LOW_BAND = (0.01, 0.08)
"""Low-frequency band (Hz) for ALFF, fALFF and the numerator of ``power_ratio``."""

HIGH_BAND = (0.08, 0.25)
"""High-frequency band (Hz) for the denominator of ``power_ratio``; clipped to Nyquist."""

FD_HIGH_MM = 0.5
"""Framewise displacement (mm) above which a volume counts as high-motion."""

UNASSIGNED = "unassigned"

MIN_VOLUMES = 10
"""Fewer usable volumes than this and no feature is computed (all ``None``)."""

_R_CLIP = 1.0 - 1e-7


def _finite(value) -> float | None:
    """``float(value)`` when finite, else ``None``."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def signal_mask(ts: np.ndarray, rel_tol: float = 1e-6) -> np.ndarray:
    """Boolean mask of columns that carry a signal.

    A column has no signal when it is entirely NaN/inf (or finite in fewer than half of the
    volumes), or when its standard deviation is zero or
    below ``rel_tol`` times the median standard deviation of the other columns (round-off left by
    detrending a constant column).

    Parameters
    ----------
    ts : ndarray of shape (n_volumes, n_rois)
    rel_tol : float
        Relative tolerance on the standard deviation.

    Returns
    -------
    ndarray of bool, shape (n_rois,)
    """
    ts = np.asarray(ts, dtype=float)
    finite = np.isfinite(ts)
    has_values = finite.sum(axis=0) >= max(2, ts.shape[0] // 2)
    full_sd = np.zeros(ts.shape[1])
    if has_values.any():
        sub = np.where(finite, ts, np.nan)[:, has_values]
        full_sd[has_values] = np.nanstd(sub, axis=0)
    positive = full_sd[full_sd > 0]
    if positive.size == 0:
        return np.zeros(ts.shape[1], dtype=bool)
    tol = max(rel_tol * float(np.median(positive)), np.finfo(float).tiny)
    return has_values & (full_sd > tol)


def _usable(ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Columns with signal and rows without NaN among them (censored volumes dropped)."""
    ts = np.asarray(ts, dtype=float)
    cols = signal_mask(ts)
    sub = ts[:, cols]
    rows = np.all(np.isfinite(sub), axis=1)
    sub = sub[rows]
    # Dropping rows may leave a column constant again.
    if sub.shape[0] >= 2:
        again = signal_mask(sub)
        idx = np.flatnonzero(cols)
        cols = cols.copy()
        cols[idx[~again]] = False
        sub = sub[:, again]
    return sub, cols


def _networks(rois: pd.DataFrame) -> list[str]:
    """Sorted network names of the ROI table, ``unassigned`` and missing excluded."""
    nets = rois["network"].astype("string").fillna(UNASSIGNED)
    return sorted({str(n) for n in nets if str(n).strip() and str(n).lower() != UNASSIGNED})


def _mean_or_none(values: np.ndarray) -> float | None:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return _finite(values.mean()) if values.size else None


def _fc_features(z: np.ndarray, labels: np.ndarray, networks: list[str]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    n = z.shape[0]
    iu = np.triu_indices(n, k=1)
    assigned = np.isin(labels, networks)
    same = labels[:, None] == labels[None, :]
    both = assigned[:, None] & assigned[None, :]
    upper = np.zeros((n, n), dtype=bool)
    upper[iu] = True
    for net in networks:
        m = labels == net
        block = z[np.ix_(m, m)]
        k = block.shape[0]
        out[f"fc_within.{net}"] = _mean_or_none(block[np.triu_indices(k, 1)]) if k >= 2 else None
    for i, a in enumerate(networks):
        for b in networks[i + 1 :]:
            ma, mb = labels == a, labels == b
            out[f"fc_between.{a}-{b}"] = (
                _mean_or_none(z[np.ix_(ma, mb)].ravel()) if ma.any() and mb.any() else None
            )
    out["fc_within.mean"] = _mean_or_none(z[upper & same & both])
    out["fc_between.mean"] = _mean_or_none(z[upper & ~same & both])
    out["fc.mean"] = _mean_or_none(z[iu]) if n >= 2 else None
    w, b = out["fc_within.mean"], out["fc_between.mean"]
    out["fc.segregation"] = _finite(w - b) if w is not None and b is not None else None
    return out


def _graph_features(r: np.ndarray, density: float = GRAPH_DENSITY) -> dict[str, float | None]:
    import networkx as nx

    keys = ["graph.global_efficiency", "graph.modularity", "graph.clustering", "graph.strength"]
    out: dict[str, float | None] = dict.fromkeys(keys)
    n = r.shape[0]
    if n < 4:
        return out
    iu = np.triu_indices(n, k=1)
    vals = r[iu]
    n_keep = int(round(density * vals.size))
    order = np.argsort(-vals, kind="stable")[:n_keep]
    order = order[vals[order] > 0]
    if order.size == 0:
        return out
    w = np.zeros((n, n))
    w[iu[0][order], iu[1][order]] = vals[order]
    w = w + w.T
    out["graph.global_efficiency"] = _global_efficiency(w > 0)
    g, comms = louvain_partition(w, GRAPH_SEED)
    out["graph.modularity"] = _finite(nx.community.modularity(g, comms, weight="weight"))
    out["graph.clustering"] = _average_clustering(w)
    out["graph.strength"] = _finite(w.sum(axis=1).mean())
    return out


def louvain_partition(w: np.ndarray, seed: int = GRAPH_SEED):
    """(networkx graph, Louvain communities) of a weighted undirected graph, symmetric ``w``
    (n, n) with zero diagonal: nodes 0..n-1, edges added strongest first (ties in row-major
    order), so the descriptors (``graph.modularity``) and the run readout's modularity shares
    (:func:`~bids_fmrilm.model.readout.modularity_shares`) partition a graph identically."""
    import networkx as nx

    iu, ju = np.nonzero(np.triu(w, 1))
    order = np.argsort(-w[iu, ju], kind="stable")
    iu, ju = iu[order], ju[order]
    g = nx.Graph()
    g.add_nodes_from(range(w.shape[0]))
    g.add_weighted_edges_from(zip(iu.tolist(), ju.tolist(), w[iu, ju].tolist()))
    return g, nx.community.louvain_communities(g, weight="weight", seed=seed)


def _global_efficiency(adj: np.ndarray) -> float | None:
    """Mean inverse shortest-path length of a binary graph (as ``networkx.global_efficiency``)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import shortest_path

    n = adj.shape[0]
    if n < 2:
        return None
    d = shortest_path(csr_matrix(adj.astype(float)), method="D", unweighted=True, directed=False)
    off = ~np.eye(n, dtype=bool)
    with np.errstate(divide="ignore"):
        inv = np.where(np.isfinite(d[off]), 1.0 / d[off], 0.0)
    return _finite(inv.mean())


def _average_clustering(w: np.ndarray) -> float | None:
    """Average weighted clustering coefficient (Onnela et al. 2005, as ``networkx.average_clustering``).

    Weights are normalised by the largest weight; nodes with fewer than two neighbours count as 0.
    """
    wmax = w.max()
    if wmax <= 0:
        return None
    c = np.cbrt(w / wmax)
    tri = np.einsum("ij,jk,ki->i", c, c, c)
    deg = (w > 0).sum(axis=1)
    denom = deg * (deg - 1.0)
    cc = np.divide(tri, denom, out=np.zeros_like(tri), where=denom > 0)
    return _finite(cc.mean())


def _band(freqs: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (freqs >= lo) & (freqs <= hi)


def _roi_spectral(x: np.ndarray, tr: float) -> dict[str, np.ndarray]:
    """Per-ROI amplitude, ALFF, fALFF, power ratio and lag-1 autocorrelation."""
    n_vol, n_roi = x.shape
    xc = x - x.mean(axis=0)
    sd = xc.std(axis=0)
    ref_sd = float(np.median(sd))
    freqs, psd = sps.periodogram(xc, fs=1.0 / tr, detrend="constant", scaling="density", axis=0)
    nyq = 0.5 / tr
    amp = np.sqrt(psd)
    low = _band(freqs, *LOW_BAND)
    high = _band(freqs, HIGH_BAND[0], min(HIGH_BAND[1], nyq)) & (freqs > LOW_BAND[1])
    pos = freqs > 0
    nan = np.full(n_roi, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        alff = amp[low].mean(axis=0) / ref_sd if low.any() else nan
        falff = amp[low].sum(axis=0) / amp[pos].sum(axis=0) if low.any() else nan
        ratio = psd[low].sum(axis=0) / psd[high].sum(axis=0) if low.any() and high.any() else nan
        ac1 = (xc[1:] * xc[:-1]).sum(axis=0) / (xc**2).sum(axis=0)
        rel_sd = sd / ref_sd
    return {"amplitude": rel_sd, "alff": alff, "falff": falff, "power_ratio": ratio, "autocorr1": ac1}


def _motion_features(fd_mean: float | None, fd: np.ndarray | None) -> dict[str, float | None]:
    out: dict[str, float | None] = {"motion.fd_mean": None, "motion.fd_max": None, "motion.fd_frac_gt_0p5": None}
    if fd is not None:
        fd = np.asarray(fd, dtype=float).ravel()
        fd = fd[np.isfinite(fd)]
        if fd.size:
            out["motion.fd_mean"] = _finite(fd.mean())
            out["motion.fd_max"] = _finite(fd.max())
            out["motion.fd_frac_gt_0p5"] = _finite(np.mean(fd > FD_HIGH_MM))
    if fd_mean is not None and _finite(fd_mean) is not None:
        out["motion.fd_mean"] = _finite(fd_mean)
    return out


def feature_keys(rois: pd.DataFrame) -> list[str]:
    """All feature names :func:`compute_features` returns for this ROI table, in order."""
    dummy = np.zeros((0, len(rois)))
    return list(compute_features(dummy, rois, tr=2.0).keys())


def compute_features(
    ts: np.ndarray,
    rois: pd.DataFrame,
    tr: float,
    fd_mean: float | None = None,
    fd: np.ndarray | None = None,
) -> dict[str, float | None]:
    """Imaging-derived features of one run of ROI time series.

    Parameters
    ----------
    ts : ndarray of shape (n_volumes, n_rois)
        Cleaned ROI time series (detrended, filtered, not standardized). Columns that are all-NaN
        or zero-variance are "no signal" ROIs and are excluded; volumes with NaN in any remaining
        ROI are dropped (censored volumes).
    rois : pandas.DataFrame
        One row per column of ``ts`` with at least a ``network`` column (``index``, ``name``,
        ``x``, ``y``, ``z`` may be present). ``unassigned`` ROIs enter global features only.
    tr : float
        Repetition time in seconds.
    fd_mean : float, optional
        Mean framewise displacement (mm) of the run, e.g. from ``participants.tsv``.
    fd : ndarray, optional
        Framewise displacement series (mm); gives ``motion.fd_max`` and
        ``motion.fd_frac_gt_0p5`` and, without ``fd_mean``, ``motion.fd_mean``.

    Returns
    -------
    dict of str to float or None
        Flat mapping of feature name to value; ``None`` when the feature is unavailable for this
        run (e.g. a network with fewer than two ROIs with signal). Keys depend only on the ROI
        table, so runs of the same atlas share one key set. See the module docstring.
    """
    ts = np.asarray(ts, dtype=float)
    if ts.ndim != 2:
        raise ValueError(f"ts must be 2-D (n_volumes, n_rois), got shape {ts.shape}")
    if ts.shape[1] != len(rois):
        raise ValueError(f"ts has {ts.shape[1]} columns but the ROI table has {len(rois)} rows")
    if not (tr and np.isfinite(tr) and tr > 0):
        raise ValueError(f"tr must be a positive number of seconds, got {tr!r}")
    networks = _networks(rois)
    all_labels = rois["network"].astype("string").fillna(UNASSIGNED).astype(str).to_numpy()

    if ts.shape[0] >= MIN_VOLUMES:
        x, cols = _usable(ts)
    else:
        x, cols = np.zeros((0, 0)), np.zeros(ts.shape[1], dtype=bool)
    if x.shape[0] < MIN_VOLUMES:
        x, cols = np.zeros((0, 0)), np.zeros(ts.shape[1], dtype=bool)
    labels = all_labels[cols]

    n = x.shape[1]
    if n >= 2:
        r = np.corrcoef(x, rowvar=False)
        np.fill_diagonal(r, 0.0)
        r = np.nan_to_num(np.clip(r, -_R_CLIP, _R_CLIP))
        z = np.arctanh(r)
    else:
        r = z = np.zeros((n, n))

    out: dict[str, float | None] = {}
    out.update(_fc_features(z, labels, networks))
    out.update(_graph_features(r))

    spec = _roi_spectral(x, tr) if n >= 1 else None
    for fam in ("amplitude", "alff", "falff", "power_ratio", "autocorr1"):
        for net in networks:
            m = labels == net
            out[f"{fam}.{net}"] = _mean_or_none(spec[fam][m]) if spec is not None and m.any() else None
        if fam != "amplitude":  # relative amplitude averages to ~1 by construction
            out[f"{fam}.mean"] = _mean_or_none(spec[fam]) if spec is not None else None
    out.update(_motion_features(fd_mean, fd))
    return {k: _finite(v) for k, v in out.items()}

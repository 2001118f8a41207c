"""Cleaning ROI time series: confounds, detrending, filtering, resampling to the model TR, scaling.

Order, as in the fMRI-LM paper's preprocessing: drop non-steady-state volumes, regress confounds
with detrending and high-pass filtering in one step (nilearn ``signal.clean``, so filters and
regressors are orthogonalised together), resample to the model's TR, then robust scaling at
tokenisation time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
from nilearn import signal
from scipy.signal import resample_poly

from ..errors import DataError

MOTION = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
WM_CSF = ["white_matter", "csf"]


@dataclass
class Confounds:
    """Confound regressors of one run, read from an fMRIPrep-style TSV.

    Attributes
    ----------
    regressors : ndarray of shape (n_volumes, n_regressors) or None
    names : list of str
    fd : ndarray of shape (n_volumes,) or None
        Framewise displacement (first value 0).
    non_steady : ndarray of int
        Indices of initial non-steady-state volumes to drop.
    """

    regressors: np.ndarray | None
    names: list[str] = field(default_factory=list)
    fd: np.ndarray | None = None
    non_steady: np.ndarray = field(default_factory=lambda: np.empty(0, int))


def read_confounds(path: str | Path, n_volumes: int, strategy=("motion", "derivatives", "wm_csf")) -> Confounds:
    """Select confounds from an fMRIPrep ``desc-confounds_timeseries.tsv``.

    Parameters
    ----------
    path : str or Path
        The confounds TSV (``n/a`` for missing values, as fMRIPrep writes for first-row derivatives).
    n_volumes : int
        Volumes in the BOLD run; the TSV must have as many rows.
    strategy : sequence of str
        ``"motion"`` (6 rigid-body parameters), ``"derivatives"`` (their temporal derivatives),
        ``"wm_csf"`` (mean white-matter and CSF signals). Columns that are absent are skipped.

    Returns
    -------
    Confounds
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, sep="\t", na_values=["n/a", "N/A", "NaN", "nan"])
    except Exception as exc:
        raise DataError(f"cannot read confounds TSV ({exc.__class__.__name__})", path=path,
                        fix="check it is a tab-separated file with a header row") from None
    if len(df) != n_volumes:
        raise DataError(f"confounds TSV has {len(df)} rows but the BOLD run has {n_volumes} volumes",
                        path=path, fix="use the confounds file written for this run")
    cols: list[str] = []
    if "motion" in strategy:
        cols += [c for c in MOTION if c in df]
        if "derivatives" in strategy:
            cols += [f"{c}_derivative1" for c in MOTION if f"{c}_derivative1" in df]
    if "wm_csf" in strategy:
        cols += [c for c in WM_CSF if c in df]
    reg = None
    if cols:
        sub = df[cols].apply(pd.to_numeric, errors="coerce")
        # fMRIPrep leaves the first row of derivatives empty; leading NaNs become the first valid value
        sub = sub.bfill().fillna(0.0)
        reg = sub.to_numpy(float)
    fd = None
    if "framewise_displacement" in df:
        fd = pd.to_numeric(df["framewise_displacement"], errors="coerce").fillna(0.0).to_numpy(float)
    outlier_cols = [c for c in df.columns if c.startswith("non_steady_state_outlier")]
    non_steady = np.flatnonzero(df[outlier_cols].fillna(0).to_numpy().any(axis=1)) if outlier_cols else np.empty(0, int)
    return Confounds(reg, cols, fd, non_steady)


def usable_columns(ts: np.ndarray, tol: float = 1e-8) -> np.ndarray:
    """Boolean mask of ROI columns with finite values and non-zero variance."""
    finite = np.isfinite(ts).all(axis=0)
    sd = np.zeros(ts.shape[1])
    sd[finite] = ts[:, finite].std(axis=0)
    med = np.zeros(ts.shape[1])
    if finite.any():
        med[finite] = np.median(ts[:, finite], axis=0)
    scale = np.maximum(np.abs(med), 1.0)
    return finite & (sd > tol * scale)


def clean_timeseries(
    ts: np.ndarray,
    tr: float,
    confounds: np.ndarray | None = None,
    detrend: bool = True,
    high_pass: float | None = 0.008,
    low_pass: float | None = None,
) -> np.ndarray:
    """Detrend, filter and regress confounds from ROI series with nilearn ``signal.clean``.

    Columns without signal (non-finite or constant) are left out of the cleaning and returned as
    NaN, so one dead ROI never contaminates the others.

    Parameters
    ----------
    ts : ndarray of shape (n_volumes, n_rois)
    tr : float
        Repetition time in seconds.
    confounds : ndarray of shape (n_volumes, n_confounds), optional
    detrend, high_pass, low_pass
        As in :func:`nilearn.signal.clean`; filters are skipped when above the Nyquist frequency.

    Returns
    -------
    ndarray of shape (n_volumes, n_rois)
    """
    ts = np.asarray(ts, dtype=float)
    out = np.full_like(ts, np.nan)
    ok = usable_columns(ts)
    if not ok.any():
        return out
    nyquist = 0.5 / tr
    hp = high_pass if high_pass is not None and high_pass < nyquist else None
    lp = low_pass if low_pass is not None and low_pass < nyquist else None
    if confounds is not None:
        confounds = np.asarray(confounds, float)
        var = confounds.std(axis=0) > 0
        confounds = confounds[:, var] if var.any() else None
    cleaned = signal.clean(
        ts[:, ok],
        detrend=detrend,
        standardize=None,
        confounds=confounds,
        standardize_confounds=True,
        filter="butterworth" if (hp or lp) else False,
        high_pass=hp,
        low_pass=lp,
        t_r=tr,
    )
    out[:, ok] = cleaned
    return out


def resample_to_tr(ts: np.ndarray, tr: float, target_tr: float) -> np.ndarray:
    """Resample ROI series from ``tr`` to ``target_tr`` with a polyphase anti-aliasing filter.

    The rate ratio is approximated by a fraction with denominator at most 100 (error < 0.5 %).
    NaN columns stay NaN. Call on cleaned (zero-mean) series: the filter pads with zeros.

    Parameters
    ----------
    ts : ndarray of shape (n_volumes, n_rois)
    tr, target_tr : float
        Source and target repetition times in seconds.

    Returns
    -------
    ndarray of shape (n_out, n_rois), ``n_out = ceil(n_volumes * tr / target_tr)``
    """
    if abs(tr - target_tr) < 1e-6:
        return ts.copy()
    ratio = Fraction(tr / target_tr).limit_denominator(100)
    up, down = ratio.numerator, ratio.denominator
    ok = np.isfinite(ts).all(axis=0)
    n_out = int(np.ceil(len(ts) * up / down))
    out = np.full((n_out, ts.shape[1]), np.nan)
    if ok.any():
        res = resample_poly(ts[:, ok], up, down, axis=0, padtype="line")
        out[:, ok] = res[:n_out]
    return out


def robust_scale(ts: np.ndarray, clip: float | None = 10.0) -> tuple[np.ndarray, dict[str, list]]:
    """Scale each ROI to median 0 and interquartile range 1, clipping extreme values.

    Parameters
    ----------
    ts : ndarray of shape (n_volumes, n_rois)
    clip : float or None
        Absolute bound applied after scaling (guards against spikes); None disables it.

    Returns
    -------
    scaled : ndarray
        NaN columns become 0 (the median), so downstream models see no NaN.
    stats : dict
        ``{"median": [...], "iqr": [...]}`` per ROI, for provenance.
    """
    med = np.nanmedian(ts, axis=0) if np.isfinite(ts).any() else np.zeros(ts.shape[1])
    q75, q25 = np.nanpercentile(ts, [75, 25], axis=0) if np.isfinite(ts).any() else (np.ones(ts.shape[1]), np.zeros(ts.shape[1]))
    iqr = q75 - q25
    iqr = np.where(np.isfinite(iqr) & (iqr > 1e-12), iqr, 1.0)
    med = np.where(np.isfinite(med), med, 0.0)
    scaled = (ts - med) / iqr
    scaled = np.where(np.isfinite(scaled), scaled, 0.0)
    if clip is not None:
        scaled = np.clip(scaled, -clip, clip)
    return scaled, {"median": med.tolist(), "iqr": iqr.tolist()}

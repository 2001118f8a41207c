"""Reference populations: robust per-feature location and scale, and z-scores against them.

A reference is a plain JSON-serialisable dictionary::

    {
        "name": "abide-train",
        "id": "3f2a9c0d1e2b4c5a",          # hash of the content below
        "n_runs": 412,
        "scale_method": "1.4826*MAD (fallback IQR/1.349, then SD)",
        "features": {
            "fc_within.DefaultMode": {"location": 0.41, "scale": 0.12, "n": 410, "method": "mad"},
            ...
        },
    }

``location`` is the median, ``scale`` the normal-consistent median absolute deviation
(``1.4826 * MAD``). When the MAD is 0 (more than half the values tie), the scale falls back to
``IQR / 1.349`` and then to the standard deviation; a feature whose scale is still 0, or that has
fewer than :data:`MIN_N` values, gets ``scale = None`` and is never z-scored.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

MAD_TO_SD = 1.4826
"""Factor making the median absolute deviation a consistent estimate of a normal SD."""

IQR_TO_SD = 1.349
"""Interquartile range of a standard normal distribution."""

MIN_N = 3
"""Fewest available values for a feature to get a scale."""

REFERENCE_FORMAT = 1


def _values(feature_dicts: list[Mapping], key: str) -> np.ndarray:
    vals = []
    for d in feature_dicts:
        v = d.get(key)
        if v is None:
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if np.isfinite(v):
            vals.append(v)
    return np.asarray(vals, dtype=float)


def robust_scale(values: np.ndarray) -> tuple[float | None, str]:
    """Robust standard deviation of ``values`` and the estimator used.

    Parameters
    ----------
    values : ndarray
        Finite values.

    Returns
    -------
    scale : float or None
        ``1.4826 * MAD``; if that is 0, ``IQR / 1.349``; if that is 0, the SD; ``None`` when all
        are 0 or fewer than :data:`MIN_N` values are given.
    method : str
        ``"mad"``, ``"iqr"``, ``"std"`` or ``"none"``.
    """
    values = np.asarray(values, dtype=float)
    if values.size < MIN_N:
        return None, "none"
    med = np.median(values)
    mad = MAD_TO_SD * float(np.median(np.abs(values - med)))
    tiny = 1e-12 * max(1.0, abs(float(med)))
    if mad > tiny:
        return mad, "mad"
    q75, q25 = np.percentile(values, [75, 25])
    iqr = float(q75 - q25) / IQR_TO_SD
    if iqr > tiny:
        return iqr, "iqr"
    sd = float(np.std(values, ddof=1))
    if sd > tiny:
        return sd, "std"
    return None, "none"


def _content_id(content: Mapping) -> str:
    blob = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_reference(feature_dicts: Iterable[Mapping], name: str) -> dict:
    """Robust per-feature statistics of a reference population.

    Parameters
    ----------
    feature_dicts : iterable of dict
        Feature dictionaries (from :func:`~bids_fmrilm.descriptors.features.compute_features`),
        one per run; ``None`` values are ignored.
    name : str
        Human-readable name of the reference (e.g. the dataset and sites).

    Returns
    -------
    dict
        ``name``, ``id`` (16 hex digits of a SHA-256 over the statistics, so identical inputs
        give the same id), ``n_runs``, ``scale_method`` and ``features`` mapping each feature to
        ``location``, ``scale`` (``None`` if not estimable), ``n`` and ``method``.
    """
    feature_dicts = list(feature_dicts)
    keys: dict[str, None] = {}
    for d in feature_dicts:
        keys.update(dict.fromkeys(d.keys()))
    stats = {}
    for key in sorted(keys):
        vals = _values(feature_dicts, key)
        if vals.size == 0:
            stats[key] = {"location": None, "scale": None, "n": 0, "method": "none"}
            continue
        scale, method = robust_scale(vals)
        stats[key] = {"location": float(np.median(vals)), "scale": scale, "n": int(vals.size), "method": method}
    content = {"format": REFERENCE_FORMAT, "n_runs": len(feature_dicts), "features": stats}
    return {
        "name": str(name),
        "id": _content_id(content),
        "format": REFERENCE_FORMAT,
        "n_runs": len(feature_dicts),
        "scale_method": f"{MAD_TO_SD}*MAD (fallback IQR/{IQR_TO_SD}, then SD)",
        "features": stats,
    }


def zscore(features: Mapping[str, float | None], reference: Mapping) -> dict[str, float | None]:
    """Robust z-scores of one run's features against a reference.

    Parameters
    ----------
    features : dict
        Feature name to value (``None`` for unavailable).
    reference : dict
        From :func:`build_reference` or :func:`load_reference`.

    Returns
    -------
    dict of str to float or None
        ``(value - location) / scale`` for every key of ``features``; ``None`` when the value is
        unavailable, the feature is not in the reference, or its reference scale is ``None``.
    """
    stats = reference.get("features", {})
    out: dict[str, float | None] = {}
    for key, value in features.items():
        s = stats.get(key)
        z = None
        if value is not None and s is not None and s.get("scale") and s.get("location") is not None:
            try:
                z = (float(value) - float(s["location"])) / float(s["scale"])
            except (TypeError, ValueError):
                z = None
            if z is not None and not np.isfinite(z):
                z = None
        out[key] = z
    return out


def save_reference(reference: Mapping, path: str | os.PathLike) -> Path:
    """Write a reference as JSON atomically (temporary file in the same folder, then rename).

    Returns
    -------
    pathlib.Path
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(reference, fh, indent=1, sort_keys=True, allow_nan=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_reference(path: str | os.PathLike) -> dict:
    """Read a reference written by :func:`save_reference`.

    Raises
    ------
    ValueError
        If the file is not a reference (no ``features`` mapping).
    """
    with open(path, encoding="utf-8") as fh:
        ref = json.load(fh)
    if not isinstance(ref, dict) or not isinstance(ref.get("features"), dict):
        raise ValueError(f"{path}: not a descriptor reference (no 'features' mapping)")
    return ref


DEFAULT_REFERENCE = Path(__file__).resolve().parent.parent / "data" / "reference" / "abide1_cc200_tr2.json"
"""Normative reference shipped with the package: all 727 ABIDE I runs (12 sites, CC200 ROIs with
Seitzman-2018 networks), built with ``fmrilm corpus`` through the BIDS-App's own signal pipeline
(model TR 2 s). ABIDE data are for non-commercial research use."""


def default_reference() -> dict:
    """The packaged normative reference (see :data:`DEFAULT_REFERENCE`)."""
    return load_reference(DEFAULT_REFERENCE)

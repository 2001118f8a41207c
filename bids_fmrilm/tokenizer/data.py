"""Runs for the tokenizer: robust scaling, patching, reading a folder of ROI time series."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError

SCALING = {"mode": "robust", "center": "median", "scale": "iqr", "per": "run and ROI", "clip": 10.0,
           "missing": "0 (the median)"}
"""How runs are scaled before tokenization (stored in every checkpoint)."""


def scale_run(ts: np.ndarray, return_log_scale: bool = False):
    """Robust-scale a raw (cleaned) run as the tokenizer expects (:data:`SCALING`).

    Parameters
    ----------
    ts : ndarray of shape (n_volumes, n_rois)
        Cleaned ROI series in the source's units.
    return_log_scale : bool
        Also return the natural log of each ROI's interquartile range, (n_rois,) float32. Scaling
        removes amplitude, which descriptors (ALFF, relative amplitude) describe, so the run
        embedding reads it back from these statistics.
    """
    from ..signals.clean import robust_scale

    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            scaled, stats = robust_scale(np.asarray(ts, dtype=float), clip=SCALING["clip"])
    scaled = scaled.astype(np.float32)
    if not return_log_scale:
        return scaled
    return scaled, np.log(np.asarray(stats["iqr"], dtype=np.float64)).astype(np.float32)


def patch_lengths(n_volumes: int, patch_len: int, min_len: int | None = None) -> np.ndarray:
    """Valid volumes of each patch of a run of ``n_volumes``: full patches of ``patch_len``, then
    the trailing partial patch when it has at least ``min_len`` volumes (default ``patch_len``:
    trailing volumes are dropped), so a long-window tokenizer uses the whole run."""
    min_len = patch_len if min_len is None else max(1, min(int(min_len), patch_len))
    n_full, rest = divmod(int(n_volumes), patch_len)
    lengths = [patch_len] * n_full
    if rest >= min_len:
        lengths.append(rest)
    return np.asarray(lengths, dtype=np.int64)


def patchify(ts: np.ndarray, patch_len: int, source: str | os.PathLike | None = None,
             min_len: int | None = None, return_lengths: bool = False):
    """Cut a (T,R) run into (n, R, patch_len) non-overlapping patches.

    Trailing volumes that do not fill a patch are dropped, unless there are at least ``min_len``
    of them: that patch is kept, zero-padded, and ``return_lengths`` gives each patch's number
    of valid volumes (n,). Non-finite values become 0.

    Raises
    ------
    DataError
        When the run is not 2-D or is shorter than one patch (``min_len`` volumes).
    """
    ts = np.asarray(ts, dtype=np.float32)
    if ts.ndim != 2 or ts.shape[1] == 0:
        raise DataError(f"expected a 2-D (volumes x ROIs) time series, got shape {ts.shape}", path=source,
                        fix="pass one run as an array with one column per ROI")
    T, R = ts.shape
    lengths = patch_lengths(T, patch_len, min_len)
    if len(lengths) == 0:
        need = patch_len if min_len is None else min(int(min_len), patch_len)
        raise DataError(
            f"run has {T} volumes, fewer than one tokenizer patch of {need} volumes", path=source,
            fix=f"tokenize runs of at least {need} volumes at the model TR (exclude this run, "
                "or use a checkpoint with a shorter patch length)",
        )
    n = len(lengths)
    x = np.zeros((n * patch_len, R), dtype=np.float32)
    used = int(lengths.sum())
    # a partial last patch is zero-padded
    x[:used] = np.nan_to_num(ts[:used], nan=0.0, posinf=0.0, neginf=0.0)
    patches = np.ascontiguousarray(x.reshape(n, patch_len, R).transpose(0, 2, 1))
    return (patches, lengths) if return_lengths else patches


def frame_mask(lengths: np.ndarray, patch_len: int) -> np.ndarray:
    """(n, patch_len) bool: True where a patch's volume is real (see :func:`patch_lengths`)."""
    return np.arange(patch_len)[None, :] < np.asarray(lengths)[:, None]


def unpatchify(patches: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
    """(n, R, P) patches -> (sum of lengths, R) series (all n * P volumes without ``lengths``)."""
    n, R, P = patches.shape
    series = patches.transpose(0, 2, 1).reshape(n * P, R)
    if lengths is None:
        return series
    return series[frame_mask(lengths, P).reshape(-1)]


@dataclass
class RunData:
    path: Path
    entities: dict
    ts: np.ndarray  # (T,R) robust-scaled float32
    columns: list[str]
    coords: np.ndarray  # (R,3) MNI mm, NaN = unknown
    atlas: str = ""
    extra: dict = field(default_factory=dict)
    log_scale: np.ndarray | None = None  # (R,) log IQR of the unscaled series

    @property
    def key(self) -> tuple:
        e = self.entities
        return run_key(e)


_ENTITY = re.compile(r"([a-zA-Z]+)-([a-zA-Z0-9]+)")
_LONG = {"sub": "subject", "ses": "session", "task": "task", "run": "run", "acq": "acquisition",
         "atlas": "atlas", "desc": "desc", "space": "space", "rec": "reconstruction", "echo": "echo"}
def parse_entities(path: str | os.PathLike) -> dict[str, str]:
    """BIDS entities of a file name (``sub`` -> ``subject``, ``ses`` -> ``session`` ...)."""
    out = {}
    for part in Path(path).name.split(".")[0].split("_"):
        m = _ENTITY.fullmatch(part)
        if m:
            out[_LONG.get(m.group(1), m.group(1))] = m.group(2)
    return out


def run_key(entities: dict) -> tuple:
    """Join key of a run: (subject, session, task, run), with None for absent entities."""
    return tuple(None if entities.get(k) in (None, "") else str(entities.get(k))
                 for k in ("subject", "session", "task", "run"))


def roi_coordinates(root: Path, atlas: str, columns: list[str]) -> np.ndarray:
    """MNI centroids of a run's columns: the folder's ``atlas-<A>_dseg.tsv``, else the atlas registry."""
    table = None
    cand = root / f"atlas-{atlas}_dseg.tsv"
    if cand.is_file():
        table = pd.read_csv(cand, sep="\t", na_values=["n/a"])
    else:
        try:
            from ..signals.atlas import load_atlas

            table = load_atlas(atlas.lower()).rois
        except Exception:  # unknown atlas: coordinates unknown
            table = None
    out = np.full((len(columns), 3), np.nan)
    if table is not None:
        by_name = {str(n): i for i, n in enumerate(table["name"])}
        xyz = table[["x", "y", "z"]].to_numpy(dtype=float)
        if all(c in by_name for c in columns):
            out = xyz[[by_name[c] for c in columns]]
        elif len(table) == len(columns):
            out = xyz
    return out


def load_timeseries_dir(root: str | os.PathLike, keys: set | None = None, log=None) -> list[RunData]:
    """Read and robust-scale every ROI time-series run of a participant-level output.

    Runs are found with :func:`bids_fmrilm.bids.layout.find_runs` (the same indexing as the
    participant level: ``*_atlas-<A>_timeseries.tsv[.gz]`` with their JSON sidecars).

    Parameters
    ----------
    keys : set of tuple, optional
        Only runs whose :func:`run_key` is in this set.
    """
    from ..bids.layout import find_runs
    from ..signals.pipeline import read_roi_timeseries

    root = Path(root)
    runs, coords_cache = [], {}
    for run in find_runs(root):
        if run.kind != "roi":
            continue
        ents = {k: (None if v is None else str(v)) for k, v in run.entities.items()}
        if keys is not None and run_key(ents) not in keys:
            continue
        raw, columns = read_roi_timeseries(run.path)
        atlas = ents.get("atlas", "")
        ck = (atlas, tuple(columns))
        if ck not in coords_cache:
            coords_cache[ck] = roi_coordinates(root, atlas, columns)
        extra = {}
        try:
            extra["tr"] = float(run.metadata.get("RepetitionTime"))
        except (TypeError, ValueError):
            pass
        ts, log_scale = scale_run(raw, return_log_scale=True)
        runs.append(RunData(path=run.path, entities=ents, ts=ts, columns=columns, coords=coords_cache[ck],
                            atlas=atlas, extra=extra, log_scale=log_scale))
    if log:
        log(f"read {len(runs)} runs from {root}")
    return runs

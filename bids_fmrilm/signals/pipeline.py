"""From one run to cleaned ROI time series at the model TR (the participant level's signal step)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from ..bids.layout import Run
from ..config import SignalSettings
from ..errors import DataError, MissingInputError
from .atlas import Atlas, clean_name, load_atlas, table_for_columns
from .clean import Confounds, clean_timeseries, read_confounds, resample_to_tr, usable_columns
from .parcellate import load_header, parcellate

log = logging.getLogger("bids_fmrilm")


@dataclass
class RunSignals:
    """Cleaned ROI time series of one run and what was done to get them.

    Attributes
    ----------
    timeseries : ndarray of shape (n_volumes, n_rois)
        Cleaned, resampled series (source units); NaN columns for ROIs without signal.
    tr : float
        Repetition time of ``timeseries`` (the model TR).
    atlas : Atlas
    source_tr : float
    n_source_volumes : int
        Volumes in the input, before dropping non-steady-state ones.
    empty_rois : list of str
        ROIs with no voxel in the image (field of view, mask).
    flat_rois : list of str
        ROIs with voxels but no usable signal (constant or non-finite).
    fd : ndarray or None
        Framewise displacement per source volume (after dropping), when confounds give it.
    steps : list of str
        Provenance, one line per step.
    """

    timeseries: np.ndarray
    tr: float
    atlas: Atlas
    source_tr: float
    n_source_volumes: int
    empty_rois: list[str] = field(default_factory=list)
    flat_rois: list[str] = field(default_factory=list)
    fd: np.ndarray | None = None
    dropped_volumes: int = 0
    steps: list[str] = field(default_factory=list)
    confound_names: list[str] = field(default_factory=list)

    @property
    def mean_fd(self) -> float | None:
        return None if self.fd is None or len(self.fd) == 0 else float(np.mean(self.fd))

    def qc(self) -> dict[str, Any]:
        """QC fields recorded in the time series sidecar and in the group QC table."""
        return {
            "SourceVolumes": self.n_source_volumes,
            "DroppedNonSteadyVolumes": self.dropped_volumes,
            "Volumes": int(self.timeseries.shape[0]),
            "SourceRepetitionTime": self.source_tr,
            "RepetitionTime": self.tr,
            "ROIsWithoutVoxels": self.empty_rois,
            "ROIsWithoutSignal": self.flat_rois,
            "MeanFramewiseDisplacement": self.mean_fd,
        }


def repetition_time(run: Run, header_tr: float | None = None) -> float:
    """The run's TR in seconds from its sidecar, checked against the NIfTI header.

    Raises
    ------
    DataError
        When the TR is missing, not positive, or looks like milliseconds.
    """
    if run.metadata_error:
        raise DataError(run.metadata_error)
    tr = run.metadata.get("RepetitionTime")
    sidecar = run.path.name.split(".")[0] + ".json"
    if tr is None:
        if header_tr and header_tr > 0:
            tr = header_tr
        else:
            raise DataError("RepetitionTime is missing", path=run.path,
                            fix=f"add \"RepetitionTime\" (seconds) to {sidecar}")
    try:
        tr = float(tr)
    except (TypeError, ValueError):
        raise DataError(f"RepetitionTime {tr!r} is not a number", path=run.path, fix=f"set it in seconds in {sidecar}") from None
    if not np.isfinite(tr) or tr <= 0:
        raise DataError(f"RepetitionTime is {tr}", path=run.path, fix=f"set a positive TR in seconds in {sidecar}")
    if tr > 100:
        raise DataError(f"RepetitionTime {tr} looks like milliseconds", path=run.path,
                        fix=f"BIDS wants seconds: write {tr / 1000:g} in {sidecar}")
    return tr


def _header_tr(img: nib.Nifti1Image) -> float | None:
    zooms = img.header.get_zooms()
    if len(zooms) < 4 or not zooms[3] or zooms[3] <= 0:
        return None
    units = img.header.get_xyzt_units()[1] if hasattr(img.header, "get_xyzt_units") else "sec"
    tr = float(zooms[3])
    return tr / 1000.0 if units == "msec" else (tr * 1e-6 if units == "usec" else tr)


@lru_cache(maxsize=8)
def _cached_atlas(spec: str, space: str) -> Atlas:
    return load_atlas(spec, space=space)


def atlas_for_run(run: Run, settings: SignalSettings, columns: list[str] | None = None) -> Atlas:
    """The atlas a run is parcellated with (volume) or described by (ROI series)."""
    if run.kind == "roi":
        name = str(run.entities.get("atlas"))
        try:
            atlas = _cached_atlas(name, "MNI152NLin6Asym")
        except Exception:
            atlas = None
        if atlas is None or (columns is not None and atlas.n_rois != len(columns)):
            return table_for_columns(columns or [], name)
        return atlas
    space = run.space if run.space and str(run.space).startswith("MNI152") else "MNI152NLin6Asym"
    return _cached_atlas(settings.atlas, space)


def _check_in_template(img: nib.Nifti1Image, path: Path) -> None:
    """Refuse images whose field of view does not overlap the MNI brain box."""
    shape = np.array(img.shape[:3])
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    xyz = nib.affines.apply_affine(img.affine, corners)
    lo, hi = xyz.min(0), xyz.max(0)
    brain_lo, brain_hi = np.array([-90, -126, -72]), np.array([91, 91, 109])
    overlap = np.clip(np.minimum(hi, brain_hi) - np.maximum(lo, brain_lo), 0, None)
    if np.prod(overlap) < 0.01 * np.prod(brain_hi - brain_lo):
        raise DataError("image does not lie in MNI space (its field of view misses the template brain)", path=path,
                        fix="give BOLD resampled to MNI152 (fMRIPrep --output-spaces MNI152NLin2009cAsym)")


def extract_signals(run: Run, settings: SignalSettings, preprocessed: Any = None) -> RunSignals:
    """Cleaned ROI time series of one run at the model TR.

    Volume runs are parcellated (streaming), confounds regressed when fMRIPrep confounds exist,
    cleaned with nilearn and resampled to ``settings.target_tr``. ROI series runs are read and
    cleaned the same way.

    Parameters
    ----------
    run : Run
    settings : SignalSettings
    preprocessed : bids_fmrilm.preprocessing.PreprocResult, optional
        For a raw (scanner-space) run: its output of the minimal pipeline, which is parcellated
        instead. Without it, raw runs are refused (``--preproc none``).

    Returns
    -------
    RunSignals

    Raises
    ------
    DataError, MissingInputError, IOFailure
        With the file and the fix, for anything wrong with the run.
    """
    steps: list[str] = []
    empty: list[str] = []
    if run.kind == "raw":
        if preprocessed is None:
            raise MissingInputError(
                "BOLD is in the scanner's native space",
                path=run.path,
                fix="preprocess with fMRIPrep (--output-spaces MNI152NLin2009cAsym) and pass its output via "
                    "--derivatives, or let bids_fmrilm run its minimal pipeline (--preproc auto)",
            )
        sig = extract_signals(preprocessed.volume_run(run), settings)
        sig.steps = [f"minimal preprocessing (bids_fmrilm, ANTsPy): {x}" for x in preprocessed.steps] + sig.steps
        sig.n_source_volumes = preprocessed.n_source_volumes
        sig.dropped_volumes += preprocessed.n_dropped
        return sig
    if run.kind == "volume":
        img = load_header(run.path)
        header_tr = _header_tr(img)
        tr = repetition_time(run, header_tr)
        if header_tr and abs(header_tr - tr) > 1e-3 * tr:
            note = (f"RepetitionTime {tr:g} s from the sidecar used; the NIfTI header says {header_tr:g} s")
            log.warning("%s: %s (BIDS: the sidecar wins). Fix: correct the header (pixdim[4]) or the sidecar",
                        run.path, note)
            steps.append(note)
        _check_in_template(img, run.path)
        atlas = atlas_for_run(run, settings)
        mask = nib.load(run.mask) if run.mask else None
        parc = parcellate(img, atlas, mask_img=mask, chunk=settings.chunk_volumes)
        ts = parc.timeseries
        empty = parc.empty_rois
        steps.append(f"parcellation: mean of voxels per region of atlas {atlas.name} ({atlas.kind}) on the image grid"
                     + (", within the brain mask" if mask is not None else ""))
        if len(empty) == atlas.n_rois:
            raise DataError(f"no region of atlas {atlas.name} has a voxel in this image", path=run.path,
                            fix="check the image is in MNI space and covers the brain")
    else:
        ts, columns = read_roi_timeseries(run.path)
        tr = repetition_time(run)
        atlas = atlas_for_run(run, settings, columns)
        steps.append(f"read ROI time series ({len(columns)} regions, atlas {atlas.name})")

    n_source = ts.shape[0]
    conf = Confounds(None)
    if run.confounds is not None:
        conf = read_confounds(run.confounds, n_source, settings.confound_strategy)
    drop = conf.non_steady
    keep = np.setdiff1d(np.arange(n_source), drop)
    ts = ts[keep]
    regressors = conf.regressors[keep] if conf.regressors is not None else None
    fd = conf.fd[keep] if conf.fd is not None else None
    if len(drop):
        steps.append(f"dropped {len(drop)} non-steady-state volumes")

    min_source = int(np.ceil(settings.min_volumes * settings.target_tr / tr))
    if ts.shape[0] < max(min_source, 3):
        raise DataError(
            f"run has {ts.shape[0]} usable volumes ({ts.shape[0] * tr:g} s); at least {settings.min_volumes} "
            f"volumes at TR {settings.target_tr:g} s (one patch, {settings.min_volumes * settings.target_tr:g} s) are needed",
            path=run.path, fix="exclude this run with --bids-filter-file, or give a longer run")

    has_voxels = np.array([n not in set(empty) for n in atlas.rois["name"].astype(str)])
    usable = usable_columns(ts)
    flat = [str(n) for n, ok, hv in zip(atlas.rois["name"], usable, has_voxels) if hv and not ok]
    if not usable.any():
        raise DataError(f"no signal: no region of atlas {atlas.name} has finite, non-constant values", path=run.path,
                        fix="check the image (all NaN, zero or constant?) and re-export or re-run preprocessing")
    high_pass, low_pass = settings.high_pass, settings.low_pass
    n_filters = sum(f is not None and f < 0.5 / tr for f in (high_pass, low_pass))
    # nilearn's zero-phase Butterworth filter (order 5) pads by 18 volumes (33 band-pass); scipy
    # refuses series that are not longer, so short runs (one patch is 16 volumes) are not filtered
    if n_filters and ts.shape[0] <= (33 if n_filters == 2 else 18):
        steps.append(f"temporal filter skipped: {ts.shape[0]} volumes are too few for the Butterworth filter")
        high_pass = low_pass = None
    cleaned = clean_timeseries(ts, tr, regressors, detrend=settings.detrend,
                               high_pass=high_pass, low_pass=low_pass)
    steps.append("nilearn.signal.clean: " + ", ".join(
        x for x in [
            "linear detrend" if settings.detrend else "",
            f"Butterworth high-pass {high_pass} Hz" if high_pass else "",
            f"low-pass {low_pass} Hz" if low_pass else "",
            f"confounds {', '.join(conf.names)}" if regressors is not None else "no confounds",
        ] if x))
    out = resample_to_tr(cleaned, tr, settings.target_tr)
    if abs(tr - settings.target_tr) > 1e-6:
        steps.append(f"resampled from TR {tr:g} s to {settings.target_tr:g} s (polyphase, anti-aliased)")
    return RunSignals(out, settings.target_tr, atlas, tr, n_source, empty, flat, fd, len(drop), steps, conf.names)


def read_roi_timeseries(path: Path) -> tuple[np.ndarray, list[str]]:
    """Read an ROI time-series TSV (header = ROI names; ``n/a`` = missing).

    Raises
    ------
    DataError
        When the file is unreadable, empty, or holds non-numeric values.
    """
    try:
        df = pd.read_csv(path, sep="\t", na_values=["n/a", "N/A", "NaN", "nan"], compression="infer")
    except Exception as exc:
        raise DataError(f"cannot read ROI time series ({exc.__class__.__name__}: {exc})", path=path,
                        fix="check it is a (gzipped) tab-separated file with one column per ROI") from None
    if df.empty or df.shape[1] == 0:
        raise DataError("ROI time series file is empty", path=path)
    try:
        ts = df.apply(pd.to_numeric, errors="raise").to_numpy(float)
    except (ValueError, TypeError):
        raise DataError("ROI time series holds non-numeric values", path=path,
                        fix="write numbers, with n/a for missing values") from None
    return ts, [str(c) for c in df.columns]


def signals_frame(sig: RunSignals) -> pd.DataFrame:
    """Time series as a frame whose columns are the atlas ROI names."""
    return pd.DataFrame(sig.timeseries, columns=[str(n) for n in sig.atlas.rois["name"]])


def atlas_entity(sig: RunSignals) -> str:
    return clean_name(sig.atlas.name)

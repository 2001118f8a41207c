"""Non-steady-state volumes, the reference volume and head-motion estimation (ANTs, rigid)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .transforms import FLIP, ants_affine_ras, read_linear, rigid_params, to_ants


def detect_non_steady(global_signal: np.ndarray, metadata: dict[str, Any] | None = None,
                      threshold: float = 3.5, search: int = 50) -> tuple[int, str]:
    """Number of initial non-steady-state volumes and how it was decided.

    ``NumberOfVolumesDiscardedByScanner``/``...ByUser`` (BIDS) say the dummy scans were already
    removed: then nothing is dropped. Otherwise the initial volumes whose global signal is an
    outlier (modified z-score ``0.6745 |x - median| / MAD > threshold`` over the first ``search``
    volumes, as nipype's ``NonSteadyStateDetector`` that fMRIPrep uses) are dropped, up to the
    first volume that is not.
    """
    meta = metadata or {}
    for key in ("NumberOfVolumesDiscardedByScanner", "NumberOfVolumesDiscardedByUser"):
        try:
            if int(meta.get(key) or 0) > 0:
                return 0, f"none dropped: {key} = {int(meta[key])} (dummy scans already removed)"
        except (TypeError, ValueError):
            pass
    gs = np.asarray(global_signal, float)[:search]
    if len(gs) < 3:
        return 0, "none dropped: too few volumes to detect"
    med = np.median(gs)
    dev = np.abs(gs - med)
    mad = np.median(dev)
    if mad <= 0:
        return 0, "none dropped: global signal has no spread"
    z = 0.6745 * dev / mad
    n = 0
    for v in z:
        if v <= threshold:
            break
        n += 1
    n = min(n, len(global_signal) - 3)
    return n, (f"{n} dropped: initial global-signal outliers (modified z-score > {threshold:g} over the "
               f"first {len(gs)} volumes)")


def reference_volume(data: np.ndarray, n: int = 10) -> np.ndarray:
    """Temporal median of the first ``n`` (steady-state) volumes: robust to a few moved ones."""
    k = min(n, data.shape[3])
    return np.median(data[..., :k], axis=3).astype(np.float32)


def estimate_motion(data: np.ndarray, affine: np.ndarray, ref: np.ndarray, workdir: Path,
                    advance: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rigid registration of every volume to the reference (ANTs ``Rigid``, mean squares).

    Each volume starts from the previous volume's estimate (head motion is continuous), so the
    optimiser needs few iterations.

    Parameters
    ----------
    data : ndarray (x, y, z, t)
    affine : ndarray
        The run's RAS affine.
    ref : ndarray (x, y, z)
        Reference volume on the same grid.
    workdir : Path
        Folder for ANTs' transform files.
    advance : callable, optional
        Called after each volume (progress bar).

    Returns
    -------
    matrices : ndarray (t, 4, 4)
        LPS point maps reference -> volume t (ANTs convention, ready to compose).
    params : ndarray (t, 6)
        trans_x, trans_y, trans_z (mm), rot_x, rot_y, rot_z (radians); see
        :mod:`.transforms` for the convention.
    """
    import ants

    workdir.mkdir(parents=True, exist_ok=True)
    fixed = to_ants(ref, affine)
    center = ants_affine_ras(fixed) @ np.r_[(np.array(ref.shape[:3]) - 1) / 2.0, 1.0]
    n = data.shape[3]
    mats = np.zeros((n, 4, 4))
    params = np.zeros((n, 6))
    init = None
    for t in range(n):
        moving = to_ants(data[..., t], affine)
        prefix = str(workdir / f"vol{t:04d}_")
        reg = ants.registration(fixed, moving, type_of_transform="BOLDRigid", aff_metric="meansquares",
                                aff_random_sampling_rate=1.0, initial_transform=init, outprefix=prefix)
        mat_file = reg["fwdtransforms"][0]
        m = read_linear(mat_file)
        mats[t] = m
        params[t] = rigid_params(FLIP @ m @ FLIP, center[:3])
        init = mat_file
        if advance is not None:
            advance()
    return mats, params

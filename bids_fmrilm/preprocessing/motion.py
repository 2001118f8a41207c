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


def _drot(rx: float, ry: float, rz: float) -> list[np.ndarray]:
    """Derivatives of ``Rz @ Ry @ Rx`` with respect to rx, ry, rz."""
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    dx = np.array([[0, 0, 0], [0, -sx, -cx], [0, cx, -sx]])
    dy = np.array([[-sy, 0, cy], [0, 0, 0], [-cy, 0, -sy]])
    dz = np.array([[-sz, -cz, 0], [cz, -sz, 0], [0, 0, 0]])
    return [z @ y @ dx, z @ dy @ x, dz @ y @ x]


class GaussNewtonRealigner:
    """Least-squares rigid realignment of volumes to a reference (SPM ``realign``-style).

    Minimises ``sum_i (s * V(T_p(x_i)) - R(x_i))^2`` over the six rigid parameters ``p`` (the
    convention of :mod:`.transforms`, about ``center``) and an intensity scale ``s`` with
    Gauss-Newton, on Gaussian-smoothed images, at a coarse then a fine level; sample points are a
    regular subgrid of the reference's bright (head) voxels. Trilinear sampling, analytic
    gradients. Much faster than one ANTs registration per volume and as precise for
    same-contrast volumes.
    """

    def __init__(self, ref: np.ndarray, affine: np.ndarray, center: np.ndarray,
                 levels=((2.0, 3), (1.0, 2)), max_iter: int = 30, tol: float = 1e-4):
        from scipy import ndimage

        self.affine = np.asarray(affine, float)
        self.inv = np.linalg.inv(self.affine)
        self.center = np.asarray(center, float)
        self.max_iter, self.tol = max_iter, tol
        self.levels = []
        thr = np.percentile(ref[ref > 0], 10) if (ref > 0).any() else 0.0
        for sigma, stride in levels:
            rs = ndimage.gaussian_filter(ref.astype(np.float64), sigma)
            sub = np.zeros(ref.shape, bool)
            sub[::stride, ::stride, ::stride] = True
            sel = sub & (rs > 0.5 * thr)
            edge = 2 + int(np.ceil(sigma))
            sel[:edge], sel[-edge:], sel[:, :edge], sel[:, -edge:] = False, False, False, False
            ijk = np.argwhere(sel).astype(np.float64)
            ras = ijk @ self.affine[:3, :3].T + self.affine[:3, 3]
            self.levels.append((sigma, ras, rs[sel]))

    def _sample(self, vol_s: np.ndarray, grads: list[np.ndarray], ras: np.ndarray):
        from scipy.ndimage import map_coordinates

        ijk = (ras @ self.inv[:3, :3].T + self.inv[:3, 3]).T
        v = map_coordinates(vol_s, ijk, order=1, mode="nearest")
        g = np.stack([map_coordinates(gr, ijk, order=1, mode="nearest") for gr in grads], axis=1)
        return v, g @ self.inv[:3, :3]  # d/d(ras) = d/d(ijk) @ inv(A)

    def fit(self, vol: np.ndarray, p0: np.ndarray | None = None) -> np.ndarray:
        """Parameters (trans mm, rot rad) carrying reference points to their place in ``vol``."""
        from scipy import ndimage

        from .transforms import euler_matrix

        p = np.zeros(6) if p0 is None else np.asarray(p0, float).copy()
        s = 1.0
        c = self.center
        for sigma, ras, rvals in self.levels:
            vs = ndimage.gaussian_filter(vol.astype(np.float64), sigma)
            grads = np.gradient(vs)
            d = ras - c
            for _ in range(self.max_iter):
                r_m = euler_matrix(*p[3:])
                pts = d @ r_m.T + c + p[:3]
                v, g = self._sample(vs, grads, pts)
                res = s * v - rvals
                jac = np.empty((len(v), 7))
                jac[:, :3] = s * g
                for k, dr in enumerate(_drot(*p[3:])):
                    jac[:, 3 + k] = s * np.einsum("ij,ij->i", g, d @ dr.T)
                jac[:, 6] = v
                h = jac.T @ jac
                try:
                    step = -np.linalg.solve(h + 1e-9 * np.trace(h) * np.eye(7), jac.T @ res)
                except np.linalg.LinAlgError:
                    break
                p += step[:6]
                s += step[6]
                if np.abs(step[:3]).max() < self.tol and np.abs(step[3:6]).max() < self.tol / 50:
                    break
        return p


def estimate_motion_gn(data: np.ndarray, affine: np.ndarray, ref: np.ndarray,
                       advance: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`estimate_motion`, with :class:`GaussNewtonRealigner` (numpy/scipy)."""
    from .transforms import rigid_matrix

    center = affine[:3, :3] @ ((np.array(ref.shape[:3]) - 1) / 2.0) + affine[:3, 3]
    gn = GaussNewtonRealigner(ref, affine, center)
    n = data.shape[3]
    mats = np.zeros((n, 4, 4))
    params = np.zeros((n, 6))
    p = np.zeros(6)
    for t in range(n):
        p = gn.fit(data[..., t], p)
        params[t] = p
        mats[t] = FLIP @ rigid_matrix(p, center) @ FLIP
        if advance is not None:
            advance()
    return mats, params

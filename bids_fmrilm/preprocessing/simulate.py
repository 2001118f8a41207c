"""A raw BIDS dataset with a known truth, for tests and the benchmark of the minimal pipeline.

The participant's anatomy is nilearn's MNI152 template carried into a "native" scanner space by a
known map ``G`` (native RAS mm -> MNI mm): a rotation, an anisotropic scaling and a translation
plus a smooth (sinusoidal) deformation. The T1w is the template seen through ``G``; the BOLD run
is an EPI-like contrast of the same brain (CSF bright, white matter dark) through ``G`` on a
coarser grid (blurred by a Gaussian point-spread function of FWHM ~ 1.2 voxels), with noise, a bright non-steady-state first volume, and rigid head motion injected
in some volumes (each volume is sampled once from the template, so the motion is exact).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from .transforms import euler_matrix, grid_points_ras, rigid_matrix


@dataclass
class NativeTruth:
    """What the simulation put in: per-volume motion (of the volumes after the dummy), the map."""

    motion: np.ndarray  # (n_volumes - n_dummy, 6): trans mm, rot radians (convention of .transforms)
    center: np.ndarray  # rotation centre (RAS mm): the centre of the EPI field of view
    n_dummy: int
    bold: Path
    t1w: Path | None
    extra: dict = field(default_factory=dict)


class NativeMap:
    """``G``: native RAS (mm) -> MNI RAS (mm), affine + smooth deformation."""

    def __init__(self, rot_deg=(8.0, -4.0, 6.0), scale=(1.06, 0.95, 1.03), native_center=(12.0, 30.0, -25.0),
                 mni_center=(0.0, -18.0, 15.0), warp_mm=3.0, wavelength_mm=90.0):
        self.a = euler_matrix(*np.deg2rad(rot_deg)) @ np.diag(scale)
        self.cn = np.asarray(native_center, float)
        self.cm = np.asarray(mni_center, float)
        self.warp_mm = float(warp_mm)
        self.k = 2 * np.pi / float(wavelength_mm)

    def __call__(self, y: np.ndarray) -> np.ndarray:
        d = y - self.cn
        x = d @ self.a.T + self.cm
        if self.warp_mm:
            k = self.k
            x = x + self.warp_mm * np.stack([np.sin(k * d[:, 1]) * np.cos(k * d[:, 2]),
                                             np.sin(k * d[:, 2]) * np.cos(k * d[:, 0]),
                                             np.sin(k * d[:, 0]) * np.cos(k * d[:, 1])], axis=1)
        return x


def native_grid(voxel_mm: float, size_mm=(192.0, 216.0, 168.0), center=(12.0, 30.0, -25.0)):
    """Shape and RAS affine of an axis-aligned native grid of ``size_mm`` centred on ``center``."""
    shape = tuple(int(np.ceil(s / voxel_mm)) for s in size_mm)
    aff = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    aff[:3, 3] = np.asarray(center, float) - voxel_mm * (np.array(shape) - 1) / 2.0
    return shape, aff


def _sample(img_data: np.ndarray, img_affine: np.ndarray, ras: np.ndarray) -> np.ndarray:
    from scipy.ndimage import map_coordinates

    ijk = (ras - img_affine[:3, 3]) @ np.linalg.inv(img_affine[:3, :3]).T
    return map_coordinates(img_data, ijk.T, order=1, mode="constant", cval=0.0)


def epi_contrast(t1: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """EPI-like intensities from the T1 template: CSF ~1000, grey matter ~700, white matter ~350."""
    t = np.clip(t1 / max(float(np.percentile(t1[brain], 99)), 1e-6), 0, 1)
    return np.where(brain, 300.0 + 900.0 * (1.0 - t) ** 1.5, 0.0).astype(np.float32)


def make_raw_dataset(root: str | Path, n_volumes: int = 20, bold_voxel_mm: float = 4.0, t1w_voxel_mm: float = 2.0,
                     source_resolution: int = 2, motion: dict[int, tuple] | None = None, t1w: bool = True,
                     noise: float = 0.01, tr: float = 2.0, seed: int = 0, native_map: NativeMap | None = None,
                     subject: str = "01") -> NativeTruth:
    """Write ``root`` (a raw BIDS dataset, one participant) and return the truth.

    Parameters
    ----------
    motion : dict
        Volume index (after the dummy volume) -> (tx, ty, tz mm, rx, ry, rz degrees) about the EPI
        field-of-view centre; other volumes do not move.
    t1w : bool
        Write ``anat/sub-<L>_T1w.nii.gz``.
    """
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template
    from nilearn.image import resample_to_img

    root = Path(root)
    rng = np.random.default_rng(seed)
    g = native_map or NativeMap()
    tpl = load_mni152_template(resolution=source_resolution)
    t1 = np.asarray(tpl.dataobj, dtype=np.float32)
    brain_img = resample_to_img(load_mni152_brain_mask(resolution=2), tpl, interpolation="nearest",
                                copy_header=True, force_resample=True)
    brain = np.asarray(brain_img.dataobj) > 0
    t1 = t1 * brain
    epi_mni = epi_contrast(t1, brain)
    # the scanner's point-spread function: without it, sampling the fine template on the coarse
    # EPI grid aliases, and a moved grid would see a different image, not a moved one
    from scipy.ndimage import gaussian_filter

    vox = float(np.sqrt((tpl.affine[:3, :3] ** 2).sum(0)).mean())
    epi_mni = gaussian_filter(epi_mni, sigma=0.5 * bold_voxel_mm / vox).astype(np.float32)

    (root / f"sub-{subject}" / "func").mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({
        "Name": "bids_fmrilm simulated raw dataset (native space)", "BIDSVersion": "1.10.0", "DatasetType": "raw",
        "License": "CC0", "Authors": ["bids_fmrilm"]}, indent=2))
    (root / "README").write_text("Simulated raw BIDS dataset: MNI template warped into a native space.\n")
    (root / "participants.tsv").write_text(f"participant_id\nsub-{subject}\n")
    (root / "task-rest_bold.json").write_text(json.dumps({"RepetitionTime": tr, "TaskName": "rest"}))

    t1w_path = None
    if t1w:
        shape_a, aff_a = native_grid(t1w_voxel_mm)
        pts = grid_points_ras(shape_a, aff_a).astype(np.float64)
        data = _sample(t1, tpl.affine, g(pts)).reshape(shape_a, order="F").astype(np.float32) * 1000.0
        img = nib.Nifti1Image(data, aff_a)
        img.header.set_sform(aff_a, code=1)
        img.header.set_qform(aff_a, code=1)
        img.header.set_xyzt_units("mm", "sec")
        (root / f"sub-{subject}" / "anat").mkdir(parents=True, exist_ok=True)
        t1w_path = root / f"sub-{subject}" / "anat" / f"sub-{subject}_T1w.nii.gz"
        nib.save(img, t1w_path)

    shape_b, aff_b = native_grid(bold_voxel_mm)
    center = aff_b[:3, :3] @ ((np.array(shape_b) - 1) / 2.0) + aff_b[:3, 3]
    pts = grid_points_ras(shape_b, aff_b).astype(np.float64)
    n_dummy = 1
    n_kept = n_volumes - n_dummy
    truth = np.zeros((n_kept, 6))
    for t, p in (motion or {}).items():
        truth[t] = np.r_[np.asarray(p[:3], float), np.deg2rad(np.asarray(p[3:], float))]
    bold = np.zeros(shape_b + (n_volumes,), np.float32)
    static = _sample(epi_mni, tpl.affine, g(pts))
    slow = np.cumsum(rng.normal(0, 1, n_volumes)) * 0.002
    for v in range(n_volumes):
        k = v - n_dummy
        if k >= 0 and np.any(truth[k]):
            m = rigid_matrix(truth[k], center)  # reference point -> its position in volume v
            inv = np.linalg.inv(m)
            vals = _sample(epi_mni, tpl.affine, g(pts @ inv[:3, :3].T + inv[:3, 3]))
        else:
            vals = static
        vol = vals * (1.0 + slow[v]) + rng.normal(0, noise * 500.0, vals.shape) * (vals > 0)
        if v < n_dummy:
            vol = vol * 1.6
        bold[..., v] = vol.reshape(shape_b, order="F")
    img = nib.Nifti1Image(bold, aff_b)
    img.header.set_sform(aff_b, code=1)
    img.header.set_qform(aff_b, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = tr
    bold_path = root / f"sub-{subject}" / "func" / f"sub-{subject}_task-rest_bold.nii.gz"
    nib.save(img, bold_path)
    return NativeTruth(truth, center, n_dummy, bold_path, t1w_path)

"""The registration target: nilearn's bundled MNI152 template and tissue masks (offline).

nilearn ships the ICBM152 2009a nonlinear asymmetric template (skull-stripped, 1 mm, resampled
on request), so the space is recorded as ``MNI152NLin2009aAsym``: close to fMRIPrep's default
``MNI152NLin2009cAsym`` (same ICBM 2009 family and coordinate system, a different release), not
the FSL ``MNI152NLin6Asym`` template.

Tissue masks for the confounds, on the output grid, from nilearn's grey/white-matter probability
templates (``load_mni152_gm_template``/``load_mni152_wm_template``, ICBM 2009a tissue priors):

* brain: ``nilearn.datasets.load_mni152_brain_mask``.
* white matter: P(WM) > 0.9, eroded by one voxel (partial volumes with grey matter out, as fMRIPrep
  erodes its WM mask).
* CSF: P(CSF) = 1 - P(GM) - P(WM) > 0.9 inside the brain mask eroded by one voxel (no edge of the
  brain, where the template has no CSF but background): the ventricles and the widest sulci.

On coarse grids where a mask keeps fewer than 10 voxels, the erosion is skipped and the
threshold lowered to 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import nibabel as nib
import numpy as np

SPACE = "MNI152NLin2009aAsym"
TEMPLATE_NAME = "nilearn MNI152 template (ICBM152 2009a nonlinear asymmetric, skull-stripped)"


@dataclass(frozen=True)
class Template:
    """Template image and masks on one grid (all share ``affine`` and ``shape``)."""

    space: str
    resolution: float
    t1: nib.Nifti1Image
    brain: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    gm: np.ndarray

    @property
    def affine(self) -> np.ndarray:
        return self.t1.affine

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.t1.shape[:3])


def _on_grid(img, ref, interpolation):
    from nilearn.image import resample_to_img

    return resample_to_img(img, ref, interpolation=interpolation, copy_header=True, force_resample=True)


@lru_cache(maxsize=4)
def load_template(resolution: float = 2.0) -> Template:
    """Template and masks at ``resolution`` mm (nilearn resamples its 1 mm template)."""
    from nilearn.datasets import (load_mni152_brain_mask, load_mni152_gm_template, load_mni152_template,
                                  load_mni152_wm_template)
    from scipy import ndimage

    res = float(resolution)
    t1 = load_mni152_template(resolution=res if res != int(res) else int(res))
    t1 = nib.Nifti1Image(np.asarray(t1.dataobj, dtype=np.float32), t1.affine)
    brain = np.asarray(_on_grid(load_mni152_brain_mask(resolution=2), t1, "nearest").dataobj) > 0
    p_gm = np.asarray(_on_grid(load_mni152_gm_template(resolution=2), t1, "continuous").dataobj, dtype=float)
    p_wm = np.asarray(_on_grid(load_mni152_wm_template(resolution=2), t1, "continuous").dataobj, dtype=float)
    p_csf = 1.0 - p_gm - p_wm
    inner = ndimage.binary_erosion(brain, iterations=1)
    wm = ndimage.binary_erosion(brain & (p_wm > 0.9), iterations=1)
    if wm.sum() < 10:
        wm = brain & (p_wm > 0.5)
    csf = inner & (p_csf > 0.9)
    if csf.sum() < 10:
        csf = inner & (p_csf > 0.5)
    gm = brain & (p_gm > 0.5)
    t1_data = np.asarray(t1.dataobj, dtype=np.float32) * brain
    t1 = nib.Nifti1Image(t1_data, t1.affine)
    return Template(SPACE, res, t1, brain, wm, csf, gm)

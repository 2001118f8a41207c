"""Minimal preprocessing of a raw (scanner-space) BOLD run with ANTsPy, to MNI space with confounds.

fMRIPrep remains the recommended preprocessing; this pipeline makes raw datasets usable when no
fMRIPrep output exists (``--preproc auto``). Steps (each timed and recorded):

1. **non-steady state**: initial global-signal outliers are discarded (or none, when the sidecar
   says the scanner/user already discarded dummy scans), see :func:`.motion.detect_non_steady`.
2. **reference**: temporal median of the first 10 kept volumes.
3. **head motion**: rigid registration (ANTs, mean squares) of every volume to the reference: six
   parameters (fMRIPrep names ``trans_x .. rot_z``, mm and radians) and Power's framewise
   displacement (50 mm sphere).
4. **T1w -> template**: affine (mutual information) of the whole-head T1w to nilearn's
   skull-stripped MNI152 template, the template's brain mask pulled back (dilated) to strip the
   T1w, then affine + SyN of the stripped T1w.
5. **EPI -> T1w**: rigid coregistration (mutual information) of the reference to the stripped T1w.
   Without a usable T1w (none, unreadable, not 3D, too small a field of view, or its
   normalisation correlates poorly with the template), the reference is registered to the
   template directly (affine + SyN), with a warning recorded in the run's JSON.
6. **one resampling**: for every volume, the template grid's points are carried through the SyN
   warp, the T1w affine, the coregistration and the volume's motion transform (composed once
   into a map to the reference, then one rigid matrix per volume) and the volume is sampled there
   with trilinear interpolation: one interpolation of the data, no intermediate images. This is the
   map ``antsApplyTransforms -t warp -t affine -t coreg -t motion_t`` applies (checked against
   ``ants.apply_transforms`` in the tests); done with numpy/scipy because calling ANTs 300 times
   with a warp field would dominate the run time.
7. **confounds**: motion, their derivatives, framewise displacement, global signal, and the mean
   white-matter and CSF signals in template tissue masks (:mod:`.templates`).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from ..bids.layout import Run
from ..errors import DataError
from .motion import detect_non_steady, estimate_motion, estimate_motion_gn, reference_volume
from .templates import TEMPLATE_NAME, Template, load_template
from .transforms import FLIP, MOTION, ants_affine_lps, framewise_displacement, read_linear, to_ants, write_linear

log = logging.getLogger("bids_fmrilm")

MODES = ("auto", "minimal", "none")


@dataclass
class PreprocOptions:
    """Settings of the minimal pipeline.

    Attributes
    ----------
    resolution : float
        Voxel size (mm) of the output MNI grid (and of the template registered to).
    omp_nthreads : int
        Threads ANTs/ITK may use (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``).
    syn_iterations : tuple of int
        SyN iterations per level (coarse to fine).
    reference_volumes : int
        Volumes whose median is the motion reference.
    motion_engine : {"gauss-newton", "ants"}
        Head-motion estimation: least-squares Gauss-Newton realignment in numpy/scipy (default,
        ~0.1 s a volume) or one ANTs rigid registration per volume (``BOLDRigid``, mean squares;
        several seconds a volume on a loaded 2-core machine).
    progress : bool
        Show a progress bar per step (on a terminal).
    """

    resolution: float = 2.0
    omp_nthreads: int = 1
    syn_iterations: tuple[int, ...] = (40, 20, 0)
    reference_volumes: int = 10
    motion_engine: str = "gauss-newton"
    progress: bool = True

    def digest_fields(self) -> dict[str, Any]:
        return {"resolution": self.resolution, "syn_iterations": list(self.syn_iterations),
                "reference_volumes": self.reference_volumes, "motion_engine": self.motion_engine}


@dataclass
class PreprocResult:
    """What :func:`preprocess_run` produced (files under its work folder).

    Attributes
    ----------
    bold : Path
        Preprocessed BOLD in the template space (uncompressed NIfTI, float32).
    mask : Path
        Template brain mask on the same grid.
    confounds : DataFrame
        fMRIPrep-named confounds, one row per kept volume.
    confounds_path : Path
    transforms : dict
        Output name -> file: ``from-bold_to-T1w`` (ITK .mat), ``from-T1w_to-<space>`` affine and
        warp (or ``from-bold_to-<space>`` without a usable T1w).
    mean_bold : nibabel image
        Mean of the preprocessed series (for the registration figure).
    """

    bold: Path
    mask: Path
    confounds: pd.DataFrame
    confounds_path: Path
    space: str
    template: Template
    n_source_volumes: int
    n_dropped: int
    tr: float
    transforms: dict[str, Path] = field(default_factory=dict)
    t1w: Path | None = None
    t1w_used: bool = False
    warnings: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    step_seconds: dict[str, float] = field(default_factory=dict)
    mean_bold: nib.Nifti1Image | None = None
    motion_matrices: np.ndarray | None = None
    workdir: Path | None = None

    def volume_run(self, run: Run) -> Run:
        """The preprocessed series as a ``volume`` run for the signal step."""
        ents = dict(run.entities)
        ents["space"] = self.space
        return Run("volume", self.bold, ents, metadata={**run.metadata, "RepetitionTime": self.tr},
                   dataset=run.dataset, confounds=self.confounds_path, mask=self.mask)

    def record(self) -> dict[str, Any]:
        """Provenance for the run's JSON sidecar."""
        import ants

        return {
            "Pipeline": "bids_fmrilm minimal preprocessing (fMRIPrep is recommended when available)",
            "Tools": {"antspyx": ants.__version__, "nilearn": _version("nilearn"), "nibabel": nib.__version__,
                      "scipy": _version("scipy")},
            "Template": TEMPLATE_NAME,
            "TemplateSpace": self.space,
            "Resolution": self.template.resolution,
            "T1w": str(self.t1w) if self.t1w else None,
            "T1wUsed": self.t1w_used,
            "Registration": ("EPI -> T1w (rigid) -> template (affine + SyN)" if self.t1w_used
                             else "EPI -> template directly (affine + SyN): no usable T1w"),
            "SourceVolumes": self.n_source_volumes,
            "NonSteadyStateVolumesDiscarded": self.n_dropped,
            "Steps": self.steps,
            "StepSeconds": {k: round(v, 2) for k, v in self.step_seconds.items()},
            "Warnings": self.warnings,
            "Confounds": {
                "trans_x..rot_z": "rigid head motion (mm, radians), see MotionConvention",
                "*_derivative1": "backward differences (first row n/a)",
                "framewise_displacement": "Power et al. 2012, 50 mm sphere (mm; first row n/a)",
                "global_signal": "mean in the template brain mask",
                "white_matter": "mean in the template white-matter mask (P(WM) > 0.9, eroded one voxel)",
                "csf": "mean in the template CSF mask (1 - P(GM) - P(WM) > 0.9 inside the brain eroded one voxel)",
            },
            "MotionConvention": ("rigid transform carrying reference-volume points to volume t, RAS mm; rotations "
                                 "R = Rz Ry Rx (radians) about the reference field-of-view centre"),
        }

    def cleanup(self) -> None:
        """Remove the work folder (the big intermediate series included)."""
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def set_threads(n: int) -> None:
    """Let ANTs/ITK use ``n`` threads (read by ITK when it first creates its thread pool)."""
    n = max(1, int(n))
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


class _Steps:
    """Times the steps and shows a rich progress bar per step."""

    def __init__(self, label: str, enabled: bool):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.seconds: dict[str, float] = {}
        self.bar = Progress(TextColumn(f"[bold]{label}[/] {{task.description}}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=Console(stderr=True),
                            disable=not enabled or not os.isatty(2), transient=True)

    @contextmanager
    def step(self, name: str, total: int = 1) -> Iterator[Any]:
        task = self.bar.add_task(name, total=total)
        t0 = time.perf_counter()

        def advance(n: int = 1) -> None:
            self.bar.advance(task, n)

        try:
            yield advance
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.bar.update(task, completed=total)
            self.bar.remove_task(task)
        log.debug("preprocessing step %s: %.1f s", name, self.seconds[name])


def load_bold(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """BOLD data (float32, x y z t) and affine; a clear error for what cannot be preprocessed."""
    from ..signals.parcellate import load_header

    img = load_header(path)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:
        raise DataError(f"image data are corrupt or truncated ({exc.__class__.__name__}: {exc})", path=path,
                        fix="check the file is complete (gzip -t) and re-export or re-download it") from None
    if not np.isfinite(data).all():
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    return data, img.affine


def check_t1w(path: Path | None) -> tuple[nib.Nifti1Image | None, str | None]:
    """The T1w image, or None and why it cannot be used."""
    if path is None:
        return None, "no T1w image for this participant"
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:
        return None, f"T1w {path} is unreadable ({exc.__class__.__name__}: {exc})"
    data = np.squeeze(data)
    if data.ndim != 3:
        return None, f"T1w {path} is not a 3D image (shape {data.shape})"
    finite = np.isfinite(data)
    if not finite.all():
        data = np.where(finite, data, 0.0)
    if np.ptp(data) <= 0:
        return None, f"T1w {path} is constant"
    extent = np.array(data.shape) * np.sqrt((img.affine[:3, :3] ** 2).sum(0))
    if (extent < 100).any():
        return None, f"T1w {path} covers {np.round(extent).astype(int).tolist()} mm, too small a field of view"
    return nib.Nifti1Image(data, img.affine), None


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    d = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / d) if d > 0 else 0.0


def normalise_t1w(t1w: nib.Nifti1Image, tpl: Template, opts: PreprocOptions, work: Path) -> tuple[list[str], Any, float]:
    """T1w -> template: affine of the whole head, template-mask skull stripping, affine + SyN.

    Returns the transform list (template points -> T1w points: ``[warp, affine]``), the stripped
    T1w (ANTs image) and the correlation of the normalised T1w with the template in the brain.
    """
    import ants
    from scipy import ndimage

    fixed = to_ants(np.asarray(tpl.t1.dataobj), tpl.affine)
    moving = to_ants(np.asarray(t1w.dataobj), t1w.affine)
    if min(moving.spacing) < tpl.resolution:
        # registered to a template of this resolution: finer T1w voxels only cost time (transforms
        # are in physical space, so they hold for the original T1w grid)
        moving = ants.resample_image(moving, (tpl.resolution,) * 3, use_voxels=False, interp_type=0)
    aff = ants.registration(fixed, moving, type_of_transform="Affine", aff_metric="mattes",
                            aff_iterations=(1000, 500, 250, 0), aff_shrink_factors=(8, 4, 2, 1),
                            aff_smoothing_sigmas=(3, 2, 1, 0), outprefix=str(work / "t1w_affine_"))
    mask_tpl = to_ants(ndimage.binary_dilation(tpl.brain, iterations=2).astype(np.float32), tpl.affine)
    mask_t1 = ants.apply_transforms(moving, mask_tpl, aff["fwdtransforms"], interpolator="linear",
                                    whichtoinvert=[True])
    mask_np = ndimage.binary_dilation(mask_t1.numpy() > 0.5, iterations=1)
    stripped = moving * ants.from_numpy(mask_np.astype(np.float32), origin=moving.origin, spacing=moving.spacing,
                                        direction=moving.direction)
    reg = ants.registration(fixed, stripped, type_of_transform="SyNOnly", initial_transform=aff["fwdtransforms"][0],
                            syn_metric="mattes", reg_iterations=tuple(opts.syn_iterations),
                            outprefix=str(work / "t1w_syn_"))
    warped = reg["warpedmovout"].numpy()
    r = _corr(warped[tpl.brain], np.asarray(tpl.t1.dataobj)[tpl.brain])
    return list(reg["fwdtransforms"]), stripped, r


def compose_to_reference(tpl: Template, transforms: list[str]) -> np.ndarray:
    """LPS points (n, 3), Fortran order of the template grid, carried through ``transforms``.

    ``transforms`` is an ANTs list (first applied first to the template point): displacement
    fields (``.nii.gz``, on the template grid) and linear ``.mat`` files.
    """
    import ants

    ijk = np.stack([a.ravel(order="F") for a in np.indices(tpl.shape, dtype=np.float64)], axis=1)
    lps_aff = FLIP @ tpl.affine
    pts = ijk @ lps_aff[:3, :3].T + lps_aff[:3, 3]
    for tf in transforms:
        if str(tf).endswith((".nii", ".nii.gz")):
            field_img = ants.image_read(str(tf))
            disp = field_img.numpy()
            if disp.shape[:3] != tpl.shape:
                raise RuntimeError(f"displacement field grid {disp.shape[:3]} is not the template grid {tpl.shape}")
            pts = pts + disp.reshape(-1, 3, order="F")
        else:
            m = read_linear(tf)
            pts = pts @ m[:3, :3].T + m[:3, 3]
    return pts


def resample_series(data: np.ndarray, bold_affine: np.ndarray, ref_points: np.ndarray, motion: np.ndarray,
                    tpl: Template, out_path: Path, tr: float, advance=None) -> tuple[np.ndarray, np.ndarray]:
    """Sample every volume once at its composed points; write a float32 NIfTI volume by volume.

    Only voxels within 8 mm of the template brain are sampled (the rest of the grid is 0, as
    the series is used inside the brain mask); that is a third of the grid.

    Returns the mean image (flat, Fortran order) and per-volume means in the brain, WM and CSF
    masks (``(t, 3)``).
    """
    from scipy import ndimage
    from scipy.ndimage import map_coordinates

    epi = to_ants(data[..., 0], bold_affine)
    vox_from_lps = np.linalg.inv(ants_affine_lps(epi))
    n = data.shape[3]
    keep = ndimage.binary_dilation(tpl.brain, iterations=max(1, int(round(8.0 / tpl.resolution)))).ravel(order="F")
    idx = np.flatnonzero(keep)
    masks = [m.ravel(order="F")[idx] for m in (tpl.brain, tpl.wm, tpl.csf)]
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(tpl.shape + (n,))
    hdr.set_data_dtype(np.float32)
    hdr.set_qform(tpl.affine, code=4)
    hdr.set_sform(tpl.affine, code=4)
    hdr.set_xyzt_units("mm", "sec")
    hdr["pixdim"][4] = tr
    hdr.set_data_offset(352)
    mean = np.zeros(ref_points.shape[0], np.float64)
    means = np.zeros((n, 3))
    pts = ref_points[idx].astype(np.float64)
    full = np.zeros(ref_points.shape[0], np.float32)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "wb") as f:
        f.write(hdr.binaryblock)
        f.write(b"\0" * (352 - len(hdr.binaryblock)))
        for t in range(n):
            m = vox_from_lps @ motion[t]
            coords = (pts @ m[:3, :3].T + m[:3, 3]).T
            vals = map_coordinates(data[..., t], coords, order=1, mode="constant", cval=0.0, prefilter=False)
            full[idx] = vals
            f.write(full.astype("<f4", copy=False).tobytes())
            mean[idx] += vals
            means[t] = [vals[k].mean() if k.any() else np.nan for k in masks]
            if advance is not None:
                advance()
    return (mean / n).astype(np.float32), means


def confounds_frame(params: np.ndarray, means: np.ndarray) -> pd.DataFrame:
    """fMRIPrep-named confounds: motion, derivatives, FD, global signal, WM, CSF."""
    df = pd.DataFrame(params, columns=MOTION)
    for c in MOTION:
        df[f"{c}_derivative1"] = np.r_[np.nan, np.diff(df[c].to_numpy())]
    df["framewise_displacement"] = framewise_displacement(params)
    df["global_signal"] = means[:, 0]
    df["white_matter"] = means[:, 1]
    df["csf"] = means[:, 2]
    return df


def preprocess_run(run: Run, opts: PreprocOptions, workdir: Path, t1w: Path | None = None,
                   tr: float | None = None) -> PreprocResult:
    """Run the minimal pipeline on a raw run.

    Parameters
    ----------
    run : Run
        A ``raw`` (scanner-space) BOLD run.
    opts : PreprocOptions
    workdir : Path
        Folder for intermediate files (created; :meth:`PreprocResult.cleanup` removes it).
    t1w : Path, optional
        The participant's T1w (see :func:`bids_fmrilm.bids.layout.find_t1w`); None: EPI -> template.
    tr : float, optional
        Repetition time (seconds) written in the output header.

    Returns
    -------
    PreprocResult

    Raises
    ------
    DataError
        For runs that cannot be preprocessed (too few volumes, unreadable data).
    """
    set_threads(opts.omp_nthreads)
    import ants

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    steps = _Steps(run.run_id, opts.progress)
    notes: list[str] = []
    warnings: list[str] = []
    with steps.bar:
        with steps.step("load"):
            data, affine = load_bold(run.path)
            tpl = load_template(opts.resolution)
        n_source = data.shape[3]
        if n_source < 4:
            raise DataError(f"run has {n_source} volumes: too few to preprocess", path=run.path,
                            fix="exclude this run with --bids-filter-file")

        with steps.step("non-steady-state detection"):
            gs = data.mean(axis=(0, 1, 2), dtype=np.float64)
            n_drop, why = detect_non_steady(gs, run.metadata)
            data = data[..., n_drop:]
            notes.append(f"non-steady-state volumes: {why}")

        n = data.shape[3]
        with steps.step("head-motion correction", total=n) as advance:
            ref = reference_volume(data, opts.reference_volumes)
            if opts.motion_engine == "ants":
                motion, params = estimate_motion(data, affine, ref, workdir / "hmc", advance)
                how = "ANTs rigid registration (BOLDRigid, mean squares)"
            else:
                motion, params = estimate_motion_gn(data, affine, ref, advance)
                how = "rigid Gauss-Newton least-squares realignment (numpy/scipy, SPM-style, smoothed 2 then 1 voxel)"
            notes.append(f"head-motion correction: {how} of {n} volumes to the median of the first "
                         f"{min(opts.reference_volumes, n)}; FD (Power, 50 mm sphere)")

        t1_img, problem = check_t1w(t1w)
        to_template: list[str] = []
        coreg: list[str] = []
        transforms: dict[str, Path] = {}
        t1w_used = False
        if t1_img is not None:
            with steps.step("T1w normalisation (affine + SyN)"):
                t1_tfs, t1_stripped, r = normalise_t1w(t1_img, tpl, opts, workdir)
            if r < 0.5:
                problem = (f"T1w {t1w} normalises poorly to the template (correlation {r:.2f} in the brain mask); "
                           "is it a T1-weighted head image?")
            else:
                t1w_used = True
                with steps.step("EPI -> T1w coregistration (rigid)"):
                    # registered on the (coarse) EPI grid, T1w moving, then inverted: the same rigid
                    # map for a fraction of the cost of sampling the T1w grid
                    ref_img = to_ants(ref, affine)
                    reg = ants.registration(ref_img, t1_stripped, type_of_transform="Rigid", aff_metric="mattes",
                                            aff_iterations=(200, 100, 50), aff_shrink_factors=(4, 2, 1),
                                            aff_smoothing_sigmas=(2, 1, 0), aff_random_sampling_rate=0.25,
                                            outprefix=str(workdir / "coreg_"))
                    coreg_file = write_linear(np.linalg.inv(read_linear(reg["fwdtransforms"][0])),
                                              str(workdir / "coreg_t1w_to_bold.mat"))
                coreg = [coreg_file]
                to_template = t1_tfs
                notes.append(f"T1w -> {tpl.space}: ANTs affine (MI) + template-mask skull stripping + affine/SyN "
                             f"(MI, iterations {list(opts.syn_iterations)}); correlation with the template {r:.2f}")
                notes.append("EPI -> T1w: ANTs rigid (MI) of the motion reference to the stripped T1w")
                transforms["from-bold_to-T1w_mode-image_xfm.mat"] = Path(coreg[0])
                transforms[f"from-T1w_to-{tpl.space}_mode-image_desc-warp_xfm.nii.gz"] = Path(t1_tfs[0])
                transforms[f"from-T1w_to-{tpl.space}_mode-image_desc-affine_xfm.mat"] = Path(t1_tfs[1])
        if not t1w_used:
            msg = f"{problem}: the EPI reference is registered to the template directly (less accurate)"
            warnings.append(msg)
            log.warning("%s: %s", run.relpath(), msg)
            with steps.step("EPI -> template (affine + SyN)"):
                fixed = to_ants(np.asarray(tpl.t1.dataobj), tpl.affine)
                reg = ants.registration(fixed, to_ants(ref, affine), type_of_transform="SyN", aff_metric="mattes",
                                        syn_metric="mattes", reg_iterations=tuple(opts.syn_iterations),
                                        outprefix=str(workdir / "epi_syn_"))
            to_template = list(reg["fwdtransforms"])
            notes.append(f"EPI -> {tpl.space} directly: ANTs affine + SyN (MI); no usable T1w")
            transforms[f"from-bold_to-{tpl.space}_mode-image_desc-warp_xfm.nii.gz"] = Path(to_template[0])
            transforms[f"from-bold_to-{tpl.space}_mode-image_desc-affine_xfm.mat"] = Path(to_template[1])

        with steps.step(f"resampling to {tpl.space} {tpl.resolution:g} mm", total=n) as advance:
            pts = compose_to_reference(tpl, to_template + coreg)
            run_tr = float(tr) if tr else float(run.metadata.get("RepetitionTime") or 0) or 1.0
            bold_path = workdir / "bold_preproc.nii"
            mean, means = resample_series(data, affine, pts, motion, tpl, bold_path, run_tr, advance)
            notes.append(f"one resampling (trilinear) of each volume to {tpl.space} at {tpl.resolution:g} mm through "
                         "the composed motion, coregistration and normalisation transforms")

        with steps.step("confounds"):
            conf = confounds_frame(params, means)
            conf_path = workdir / "confounds.tsv"
            conf.to_csv(conf_path, sep="\t", index=False, na_rep="n/a", float_format="%.8g")
            mask_path = workdir / "brain_mask.nii.gz"
            nib.save(nib.Nifti1Image(tpl.brain.astype(np.uint8), tpl.affine), mask_path)
            notes.append("confounds: 6 motion parameters + derivatives, framewise_displacement, global_signal, "
                         "white_matter, csf (means in template tissue masks)")
    mean_img = nib.Nifti1Image(mean.reshape(tpl.shape, order="F"), tpl.affine)
    return PreprocResult(bold=bold_path, mask=mask_path, confounds=conf, confounds_path=conf_path, space=tpl.space,
                         template=tpl, n_source_volumes=n_source, n_dropped=n_drop, tr=run_tr, transforms=transforms,
                         t1w=t1w, t1w_used=t1w_used, warnings=warnings, steps=notes, step_seconds=steps.seconds,
                         mean_bold=mean_img, motion_matrices=motion, workdir=workdir)

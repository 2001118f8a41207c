"""Simulated fMRIPrep-style datasets with network structure (demo and tests; no download).

Every brain voxel of nilearn's bundled MNI152 brain mask takes the network of the nearest
Seitzman-2018 ROI (within 10 mm). Voxels of a network share a slow latent signal (AR(1), in the
resting-state band) plus independent noise, so within-network correlation is high and
between-network correlation low. Motion parameters are random walks whose derivatives leak into
the signal, and the first volume is a non-steady-state outlier, as fMRIPrep reports it.
Participants' labels (``sex``, ``age``, ``diagnosis``) are drawn at random; ``diagnosis``
weakens default-mode coupling so that group analyses have a real, modest effect to find.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

MOTION = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]


def _grid(voxel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    from nilearn.datasets import load_mni152_brain_mask
    from nilearn.image import resample_img

    mask = load_mni152_brain_mask(resolution=2)
    if voxel_mm != 2:
        mask = resample_img(mask, target_affine=np.diag([voxel_mm] * 3), interpolation="nearest",
                            copy_header=True, force_resample=True)
    data = np.asarray(mask.dataobj) > 0
    return data, mask.affine


def make_fmriprep_dataset(
    root: str | Path,
    n_subjects: int = 4,
    n_volumes: int = 80,
    tr: float = 2.0,
    voxel_mm: float = 4.0,
    sessions: tuple[str, ...] = (),
    seed: int = 0,
    space: str = "MNI152NLin6Asym",
) -> Path:
    """Write a small fMRIPrep-style derivatives dataset of resting-state runs in MNI space.

    Parameters
    ----------
    root : path
        Folder to create (the dataset root).
    n_subjects, n_volumes : int
        Participants and volumes per run.
    tr : float
        Repetition time in seconds.
    voxel_mm : float
        Isotropic voxel size of the MNI grid (2 mm is the standard; 4 mm keeps files small).
    sessions : tuple of str
        Session labels; one run per session (none: no session level).
    seed : int
        Seed of everything random.
    space : str
        Space entity of the file names.

    Returns
    -------
    Path
        ``root``.
    """
    from .signals.atlas import assign_networks

    root = Path(root)
    rng = np.random.default_rng(seed)
    brain, affine = _grid(voxel_mm)
    ijk = np.argwhere(brain)
    xyz = nib.affines.apply_affine(affine, ijk)
    networks = np.array(assign_networks(xyz, max_distance_mm=12.0))
    names = sorted(set(networks) - {"unassigned"})
    net_idx = np.array([names.index(n) if n in names else -1 for n in networks])

    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({
        "Name": "bids_fmrilm simulated resting state (fMRIPrep-style)",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "bids_fmrilm.simulate", "Description": "simulated BOLD with network structure"}],
        "License": "CC0",
    }, indent=2))
    rows = []
    for s in range(n_subjects):
        sub = f"{s + 1:02d}"
        diagnosis = "ASD" if s % 2 else "TD"
        rows.append({"participant_id": f"sub-{sub}", "sex": "F" if rng.random() < 0.5 else "M",
                     "age": round(float(rng.uniform(8, 40)), 1), "diagnosis": diagnosis,
                     "site": f"site{s % 2 + 1}"})
        for ses in sessions or (None,):
            folder = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "func"
            folder.mkdir(parents=True, exist_ok=True)
            stem = f"sub-{sub}" + (f"_ses-{ses}" if ses else "") + "_task-rest"
            coupling = np.full(len(names), 0.8)
            if diagnosis == "ASD" and "DefaultMode" in names:
                coupling[names.index("DefaultMode")] = 0.45
            bold, conf = _simulate_run(rng, brain.shape, ijk, net_idx, coupling, n_volumes, tr)
            img = nib.Nifti1Image(bold, affine)
            img.header.set_xyzt_units("mm", "sec")
            img.header["pixdim"][4] = tr
            img.header.set_sform(affine, code=4)
            img.header.set_qform(affine, code=4)
            nib.save(img, folder / f"{stem}_space-{space}_desc-preproc_bold.nii.gz")
            mask = nib.Nifti1Image(brain.astype(np.uint8), affine)
            nib.save(mask, folder / f"{stem}_space-{space}_desc-brain_mask.nii.gz")
            (folder / f"{stem}_space-{space}_desc-preproc_bold.json").write_text(json.dumps(
                {"RepetitionTime": tr, "TaskName": "rest", "SkullStripped": False}, indent=2))
            conf.to_csv(folder / f"{stem}_desc-confounds_timeseries.tsv", sep="\t", index=False, na_rep="n/a")
    pd.DataFrame(rows).to_csv(root / "participants.tsv", sep="\t", index=False)
    return root


def _simulate_run(rng, shape, ijk, net_idx, coupling, n_volumes, tr):
    n_net = len(coupling)
    phi = np.exp(-tr / 8.0)  # slow fluctuations, ~0.02 Hz
    latent = np.zeros((n_volumes, n_net))
    latent[0] = rng.standard_normal(n_net)
    for t in range(1, n_volumes):
        latent[t] = phi * latent[t - 1] + np.sqrt(1 - phi**2) * rng.standard_normal(n_net)
    steps = rng.normal(0, 1, (n_volumes, 6)) * np.array([0.04, 0.04, 0.04, 0.0006, 0.0006, 0.0006])
    motion = np.cumsum(steps, axis=0)  # mm and radians, as fMRIPrep reports them
    d_motion = np.vstack([np.zeros((1, 6)), np.diff(motion, axis=0)])
    fd = np.abs(d_motion[:, :3]).sum(1) + 50 * np.abs(d_motion[:, 3:]).sum(1)
    n_vox = len(ijk)
    noise = rng.standard_normal((n_volumes, n_vox)).astype(np.float32)
    w = np.where(net_idx >= 0, coupling[np.clip(net_idx, 0, None)], 0.0).astype(np.float32)
    sig = noise * np.sqrt(1 - w**2)[None] + latent[:, np.clip(net_idx, 0, None)].astype(np.float32) * w[None]
    sig += (d_motion @ rng.normal(0, 1, (6, 1)) * 5).astype(np.float32)  # motion artefact shared by all voxels
    sig[0] += 3.0  # non-steady-state first volume
    base = 100.0 + 10.0 * rng.random(n_vox).astype(np.float32)
    bold = np.zeros(shape + (n_volumes,), dtype=np.float32)
    bold[ijk[:, 0], ijk[:, 1], ijk[:, 2], :] = (base[None] + sig).T
    conf = pd.DataFrame(motion, columns=MOTION)
    for c in MOTION:
        conf[f"{c}_derivative1"] = np.r_[np.nan, np.diff(conf[c].to_numpy())]
    conf["framewise_displacement"] = np.r_[np.nan, fd[1:]]
    conf["white_matter"] = rng.normal(0, 1, n_volumes)
    conf["csf"] = rng.normal(0, 1, n_volumes)
    conf["non_steady_state_outlier00"] = np.r_[1.0, np.zeros(n_volumes - 1)]
    return bold, conf

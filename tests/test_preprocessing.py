"""Minimal preprocessing of raw (scanner-space) BOLD: geometry helpers, the pipeline against a known
truth (brain mask Dice, injected motion), and raw datasets end to end through the BIDS-App."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import assert_no_partial_files, run_cli, timeseries_files

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
pytest.importorskip("ants")

from bids_fmrilm.preprocessing import PreprocOptions, preprocess_run  # noqa: E402
from bids_fmrilm.preprocessing.simulate import make_raw_dataset  # noqa: E402
from bids_fmrilm.preprocessing.transforms import (  # noqa: E402
    FLIP, framewise_displacement, read_linear, rigid_matrix, rigid_params, to_ants, write_linear)

MOTION = {3: (1.0, -0.5, 0.8, 1.0, -1.5, 0.5), 7: (-0.8, 1.2, 0.3, -0.5, 0.8, -1.2), 10: (0.5, 0.5, -1.0, 1.5, 0.5, 1.0)}


def test_rigid_parameters_round_trip():
    rng = np.random.default_rng(0)
    center = np.array([10.0, -20.0, 5.0])
    for _ in range(20):
        p = np.r_[rng.normal(0, 2, 3), rng.normal(0, 0.05, 3)]
        assert np.allclose(rigid_params(rigid_matrix(p, center), center), p, atol=1e-10)
    fd = framewise_displacement(np.array([[0, 0, 0, 0, 0, 0], [1, 0, -1, 0.01, 0, 0]], float))
    assert np.isnan(fd[0]) and fd[1] == pytest.approx(2.5)


def test_ants_linear_transform_io(tmp_path):
    m = FLIP @ rigid_matrix([1.0, 2.0, -3.0, 0.1, -0.05, 0.2], [5, 6, 7]) @ FLIP
    path = write_linear(m, str(tmp_path / "x.mat"))
    assert np.allclose(read_linear(path), m, atol=1e-6)


def test_to_ants_keeps_the_nibabel_geometry():
    aff = np.array([[-3.0, 0, 0, 90], [0, 0, 3.2, -100], [0, 3.1, 0, -60], [0, 0, 0, 1]])
    img = to_ants(np.zeros((4, 5, 6), np.float32), aff)
    from bids_fmrilm.preprocessing.transforms import ants_affine_ras

    assert np.allclose(ants_affine_ras(img), aff, atol=1e-5)
    import ants

    # ANTs' own voxel -> physical point map agrees (LPS)
    pt = ants.transform_index_to_physical_point(img, (1, 2, 3))
    assert np.allclose(FLIP[:3, :3] @ (aff[:3, :3] @ [1, 2, 3] + aff[:3, 3]), pt, atol=1e-4)


def test_non_steady_state_detection():
    from bids_fmrilm.preprocessing.motion import detect_non_steady

    gs = np.r_[180.0, 150.0, np.full(40, 100.0) + np.random.default_rng(0).normal(0, 1, 40)]
    n, why = detect_non_steady(gs, {})
    assert n == 2 and "outliers" in why
    n, why = detect_non_steady(gs, {"NumberOfVolumesDiscardedByScanner": 4})
    assert n == 0 and "NumberOfVolumesDiscardedByScanner" in why


def test_unusable_t1w_is_recognised(tmp_path):
    from bids_fmrilm.preprocessing.pipeline import check_t1w

    assert check_t1w(None)[1] == "no T1w image for this participant"
    small = tmp_path / "small_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((20, 20, 20)).astype(np.float32), np.eye(4)), small)
    assert "too small a field of view" in check_t1w(small)[1]
    broken = tmp_path / "broken_T1w.nii.gz"
    broken.write_bytes(b"not an image")
    assert "unreadable" in check_t1w(broken)[1]
    four_d = tmp_path / "4d_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((60, 60, 60, 3), np.float32), np.diag([2, 2, 2, 1])), four_d)
    assert "not a 3D image" in check_t1w(four_d)[1]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """Template and BOLD warped by a known affine + smooth deformation into a native space; 4 mm grids."""
    root = tmp_path_factory.mktemp("native") / "raw"
    truth = make_raw_dataset(root, n_volumes=14, bold_voxel_mm=4.0, t1w_voxel_mm=2.5, motion=MOTION)
    return root, truth


def test_pipeline_recovers_brain_mask_and_motion(simulated, tmp_path):
    import ants

    from bids_fmrilm.bids.layout import find_runs, find_t1w
    from bids_fmrilm.preprocessing.pipeline import compose_to_reference

    root, truth = simulated
    (run,) = find_runs(root)
    assert run.kind == "raw"
    t1w = find_t1w(run)
    assert t1w == truth.t1w
    pre = preprocess_run(run, PreprocOptions(resolution=4.0, progress=False), tmp_path / "work", t1w=t1w, tr=2.0)
    assert pre.t1w_used and not pre.warnings
    assert pre.n_dropped == truth.n_dummy == 1
    assert pre.n_source_volumes == 14

    brain = pre.template.brain

    # motion: the injected rigid transforms, within 0.2 mm and 0.2 degrees
    est = pre.confounds[["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]].to_numpy()
    err = np.abs(est - truth.motion)
    print(f"max errors: {err[:, :3].max():.3f} mm, {np.rad2deg(err[:, 3:].max()):.3f} deg")
    assert err[:, :3].max() < 0.2
    assert np.rad2deg(err[:, 3:].max()) < 0.2
    fd = pre.confounds["framewise_displacement"].to_numpy()
    assert np.isnan(fd[0]) and fd[3] > 1.0 and fd[2] < 0.2

    # confounds have fMRIPrep's names and the existing reader takes them
    from bids_fmrilm.signals.clean import read_confounds

    conf = read_confounds(pre.confounds_path, 13)
    assert "white_matter" in conf.names and "csf" in conf.names and "rot_z_derivative1" in conf.names
    assert np.isfinite(pre.confounds[["white_matter", "csf", "global_signal"]].to_numpy()).all()

    # the single resampling samples where antsApplyTransforms -t warp -t affine -t coreg -t motion_t would
    sp = pre.space
    tfs = [str(pre.transforms[k]) for k in (f"from-T1w_to-{sp}_mode-image_desc-warp_xfm.nii.gz",
                                            f"from-T1w_to-{sp}_mode-image_desc-affine_xfm.mat",
                                            "from-bold_to-T1w_mode-image_xfm.mat")]
    t = 3
    mfile = write_linear(pre.motion_matrices[t], str(tmp_path / "motion.mat"))
    fixed = to_ants(np.asarray(pre.template.t1.dataobj), pre.template.affine)
    vol = np.asarray(nib.load(run.path).dataobj, dtype=np.float32)[..., truth.n_dummy + t]
    aff = nib.load(run.path).affine
    by_ants = ants.apply_transforms(fixed, to_ants(vol, aff), tfs + [mfile], interpolator="linear").numpy()
    from scipy.ndimage import map_coordinates

    from bids_fmrilm.preprocessing.transforms import ants_affine_lps

    pts = compose_to_reference(pre.template, tfs)
    m = np.linalg.inv(ants_affine_lps(to_ants(vol, aff))) @ pre.motion_matrices[t]
    ours = map_coordinates(vol, (pts @ m[:3, :3].T + m[:3, 3]).T, order=1, cval=0.0).reshape(pre.template.shape, order="F")
    series = nib.load(pre.bold)
    assert series.shape == pre.template.shape + (13,)
    # brain mask: a moved volume carried to MNI over the whole grid (brain >= 300, background 0)
    # thresholded at half the darkest brain tissue, against the template's brain mask
    recovered = ours > 150.0
    dice = 2 * (recovered & brain).sum() / (recovered.sum() + brain.sum())
    print(f"Dice {dice:.3f}")
    assert dice >= 0.9
    saved = np.asarray(series.dataobj[..., t])
    assert np.allclose(saved[brain], ours[brain], atol=1e-2)  # sampled within 8 mm of the brain, 0 beyond
    inside = brain & (by_ants > 0)
    assert np.corrcoef(by_ants[inside], ours[inside])[0, 1] > 0.99
    pre.cleanup()
    assert not (tmp_path / "work").exists()


def test_ants_motion_engine_agrees(simulated, tmp_path):
    """The alternative engine (one ANTs rigid registration per volume) finds the same motion."""
    from bids_fmrilm.preprocessing.motion import estimate_motion, estimate_motion_gn, reference_volume

    root, truth = simulated
    img = nib.load(truth.bold)
    data = np.asarray(img.dataobj, dtype=np.float32)[..., truth.n_dummy:]
    ref = reference_volume(data)
    pick = [0, 3, 7]
    _, p_ants = estimate_motion(data[..., pick], img.affine, ref, tmp_path / "hmc")
    _, p_gn = estimate_motion_gn(data[..., pick], img.affine, ref)
    for est in (p_ants, p_gn):
        err = np.abs(est - truth.motion[pick])
        assert err[:, :3].max() < 0.2 and np.rad2deg(err[:, 3:].max()) < 0.2


def _participants(root: Path) -> Path:
    """sub-01 with a T1w, sub-02 with none, sub-03 with an unusable one (native space, 4 mm BOLD)."""
    make_raw_dataset(root, n_volumes=22, motion={5: (0.6, 0, 0, 0, 0.5, 0)}, subject="01")
    make_raw_dataset(root, n_volumes=20, t1w=False, seed=1, subject="02")
    make_raw_dataset(root, n_volumes=20, t1w=False, seed=2, subject="03")
    (root / "sub-03" / "anat").mkdir()
    small = np.random.default_rng(0).random((20, 20, 20)).astype(np.float32)  # 20 mm: not a head
    nib.save(nib.Nifti1Image(small, np.eye(4)), root / "sub-03" / "anat" / "sub-03_T1w.nii.gz")
    (root / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\nsub-03\n")
    return root


@pytest.mark.slow
def test_raw_dataset_end_to_end(tmp_path):
    """auto: raw native-space runs go through the minimal pipeline; the runs without a usable T1w
    (none, or a 20 mm image) register EPI -> template and say so; none: all are refused (exit 66)."""
    raw = _participants(tmp_path / "raw")
    out = tmp_path / "out"
    env = {"BIDS_FMRILM_PREPROC_RESOLUTION": "4"}
    res = run_cli(raw, out, "participant", "--omp-nthreads", "1", "--save-preproc", env=env)
    assert res.code == 0, res.stderr
    assert_no_partial_files(out)
    assert len(timeseries_files(out)) == 3
    warn = res.line_with("no T1w image for this participant")
    assert "sub-02" in warn and "template directly" in warn
    warn = res.line_with("too small a field of view")
    assert "sub-03" in warn and "template directly" in warn
    f1 = out / "sub-01" / "func"
    meta1 = json.loads(next(f1.glob("*_atlas-*_timeseries.json")).read_text())
    pp = meta1["Preprocessing"]
    assert pp["T1wUsed"] is True and pp["Tools"]["antspyx"] and pp["TemplateSpace"] == "MNI152NLin2009aAsym"
    assert pp["NonSteadyStateVolumesDiscarded"] == 1 and meta1["DroppedNonSteadyVolumes"] == 1
    assert meta1["SourceVolumes"] == 22 and meta1["Volumes"] == 21
    assert "white_matter" in meta1["Confounds"] and "trans_x" in meta1["Confounds"]
    assert any("minimal preprocessing" in s for s in meta1["CleaningSteps"])
    conf = pd.read_csv(f1 / "sub-01_task-rest_desc-confounds_timeseries.tsv", sep="\t", na_values="n/a")
    assert len(conf) == 21 and conf["framewise_displacement"].iloc[5] > 0.4
    for name in ("from-bold_to-T1w_mode-image_xfm.mat",
                 "from-T1w_to-MNI152NLin2009aAsym_mode-image_desc-affine_xfm.mat",
                 "from-T1w_to-MNI152NLin2009aAsym_mode-image_desc-warp_xfm.nii.gz"):
        assert (f1 / f"sub-01_task-rest_{name}").is_file(), name
    bold = nib.load(f1 / "sub-01_task-rest_space-MNI152NLin2009aAsym_desc-preproc_bold.nii.gz")
    assert bold.shape[3] == 21 and int(bold.header["sform_code"]) == 4
    for sub in ("01", "02", "03"):
        figs = out / f"sub-{sub}" / "figures"
        assert (figs / f"sub-{sub}_task-rest_desc-registration_bold.png").stat().st_size > 1000
        assert (figs / f"sub-{sub}_task-rest_desc-fd_bold.png").stat().st_size > 1000
    meta2 = json.loads(next((out / "sub-02" / "func").glob("*_atlas-*_timeseries.json")).read_text())
    assert meta2["Preprocessing"]["T1wUsed"] is False
    assert "no usable T1w" in meta2["Preprocessing"]["Registration"]
    assert any("no T1w image" in w for w in meta2["Preprocessing"]["Warnings"])
    assert (out / "sub-02" / "func" / "sub-02_task-rest_from-bold_to-MNI152NLin2009aAsym_mode-image_desc-warp_xfm.nii.gz").is_file()
    meta3 = json.loads(next((out / "sub-03" / "func").glob("*_atlas-*_timeseries.json")).read_text())
    assert meta3["Preprocessing"]["T1wUsed"] is False and meta3["Preprocessing"]["T1w"].endswith("sub-03_T1w.nii.gz")
    assert any("too small a field of view" in w for w in meta3["Preprocessing"]["Warnings"])

    # the output (transforms, confounds, preprocessed series included) is a valid BIDS derivative
    import subprocess

    from conftest import VALIDATOR

    proc = subprocess.run([str(VALIDATOR), str(out), "--format", "json"], capture_output=True, text=True, timeout=300)
    errors = [i for i in json.loads(proc.stdout)["issues"]["issues"] if i.get("severity") == "error"]
    assert errors == [], errors

    # a re-run with the same settings skips the runs without preprocessing again
    res = run_cli(raw, out, "participant", "--omp-nthreads", "1", "--save-preproc", env=env)
    assert res.code == 0 and "0 done, 3 skipped" in res.stderr, res.stderr

    # --preproc none: refused as before
    res = run_cli(raw, tmp_path / "out_none", "participant", "--preproc", "none", env=env)
    assert res.code == 66
    assert "native space" in res.stderr and "--preproc auto" in res.stderr

"""Signals: atlases, streaming parcellation (vs nilearn), cleaning, resampling, scaling."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bids_fmrilm.errors import DataError, IOFailure, UsageError
from bids_fmrilm.signals.atlas import (
    Atlas,
    assign_networks,
    load_atlas,
    read_label_table,
    yeo_network_from_name,
)
from bids_fmrilm.signals.clean import clean_timeseries, read_confounds, resample_to_tr, robust_scale
from bids_fmrilm.signals.parcellate import load_header, parcellate

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ATLASES = SHARED / "atlases"
needs_atlases = pytest.mark.skipif(not (ATLASES / "CC200_centroids.csv").exists(),
                                   reason="../shared/atlases is absent")


def _label_atlas(shape=(12, 14, 10), affine=None, n=7, seed=0) -> Atlas:
    rng = np.random.default_rng(seed)
    affine = np.diag([3.0, 3.0, 3.0, 1.0]) if affine is None else affine
    affine[:3, 3] = [-18, -21, -15]
    labels = rng.integers(0, n + 1, size=shape).astype(np.int16)
    path = None
    img = nib.Nifti1Image(labels, affine)
    table = pd.DataFrame({"index": np.arange(1, n + 1), "name": [f"r{i}" for i in range(1, n + 1)],
                          "network": "unassigned", "x": 0.0, "y": 0.0, "z": 0.0})
    return Atlas("toy", table, labels_img=img, source=str(path))


def _image(tmp_path, shape, n_vol, affine, dtype=np.float32, seed=1, scale=None, name="bold.nii.gz"):
    rng = np.random.default_rng(seed)
    data = (100 + 10 * rng.standard_normal(shape + (n_vol,))).astype(dtype)
    img = nib.Nifti1Image(data, affine)
    if scale is not None:
        img.header.set_slope_inter(*scale)
    path = tmp_path / name
    nib.save(img, path)
    return path, data


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_parcellation_equals_nilearn_labels_masker(tmp_path, chunk):
    from nilearn.maskers import NiftiLabelsMasker

    atlas = _label_atlas()
    path, _ = _image(tmp_path, (12, 14, 10), 23, atlas.labels_img.affine.copy())
    ours = parcellate(path, atlas, chunk=chunk).timeseries
    ref = NiftiLabelsMasker(atlas.labels_img, resampling_target="data", standardize=None).fit_transform(path)
    assert ours.shape == ref.shape == (23, 7)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_parcellation_scaled_int16_and_other_grid_equals_nilearn(tmp_path):
    """Atlas on another grid is resampled (nearest), int16 data with scl_slope are scaled."""
    from nilearn.maskers import NiftiLabelsMasker

    atlas = _label_atlas(shape=(24, 28, 20), affine=np.diag([1.5, 1.5, 1.5, 1.0]))
    aff = np.diag([4.0, 4.0, 4.0, 1.0])
    aff[:3, 3] = [-20, -22, -16]
    rng = np.random.default_rng(3)
    data = rng.integers(-3000, 3000, size=(10, 11, 9, 15)).astype(np.int16)
    img = nib.Nifti1Image(data, aff)
    img.header.set_slope_inter(0.0754, 12.5)
    path = tmp_path / "int16.nii.gz"
    nib.save(img, path)
    ours = parcellate(path, atlas)
    ref = NiftiLabelsMasker(atlas.labels_img, resampling_target="data", standardize=None,
                            keep_masked_labels=False).fit_transform(path)
    present = np.isfinite(ours.timeseries[0])
    assert ref.shape[1] == present.sum()
    np.testing.assert_allclose(ours.timeseries[:, present], ref, atol=1e-5, rtol=0)


@needs_atlases
def test_schaefer_tian_450_equals_nilearn(tmp_path, monkeypatch):
    from nilearn.maskers import NiftiLabelsMasker

    monkeypatch.setenv("BIDS_FMRILM_ATLAS_DIR", str(ATLASES))
    atlas = load_atlas("schaefer400tian")
    assert atlas.n_rois == 450
    path, _ = _image(tmp_path, (91, 109, 91), 6, atlas.labels_img.affine.copy())
    ours = parcellate(path, atlas, chunk=4).timeseries
    ref = NiftiLabelsMasker(atlas.labels_img, resampling_target="data", standardize=None).fit_transform(path)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_nan_voxels_left_out_and_empty_rois_marked(tmp_path):
    atlas = _label_atlas()
    affine = atlas.labels_img.affine.copy()
    rng = np.random.default_rng(0)
    data = rng.standard_normal((12, 14, 10, 9)).astype(np.float32)
    labels = np.asarray(atlas.labels_img.dataobj)
    vox = np.argwhere(labels == 2)[0]
    data[tuple(vox)][3] = np.nan  # one NaN sample in region 2
    data[labels == 5] = np.nan  # region 5 entirely NaN
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    res = parcellate(path, atlas, chunk=4)
    ts = res.timeseries
    in2 = data[labels == 2]  # (n_vox, T)
    np.testing.assert_allclose(ts[3, 1], np.nanmean(in2[:, 3]), atol=1e-6)
    np.testing.assert_allclose(ts[0, 1], in2[:, 0].mean(), atol=1e-6)
    assert np.isnan(ts[:, 4]).all()
    # a region with no voxel on the grid is reported
    small = _label_atlas(n=3)
    lab = np.asarray(small.labels_img.dataobj).copy()
    lab[lab == 3] = 0
    small.labels_img = nib.Nifti1Image(lab, small.labels_img.affine)
    res = parcellate(path, small)
    assert res.empty_rois == ["r3"] and np.isnan(res.timeseries[:, 2]).all()


def test_memory_does_not_grow_with_run_length(tmp_path):
    """Peak allocation of parcellate is set by the chunk, not by the number of volumes."""
    import tracemalloc

    atlas = _label_atlas(shape=(30, 30, 30))
    affine = atlas.labels_img.affine.copy()
    peaks = []
    for n_vol in (20, 160):
        path, _ = _image(tmp_path, (30, 30, 30), n_vol, affine, name=f"len{n_vol}.nii.gz")
        img = load_header(path)
        tracemalloc.start()
        parcellate(img, atlas, chunk=10)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    one_volume = 30 * 30 * 30 * 8
    assert peaks[1] < peaks[0] + 5 * one_volume, peaks  # 8x the volumes, ~same peak


def test_truncated_and_3d_images_raise(tmp_path):
    atlas = _label_atlas()
    path, _ = _image(tmp_path, (12, 14, 10), 10, atlas.labels_img.affine.copy())
    raw = path.read_bytes()
    bad = tmp_path / "trunc.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises((IOFailure, DataError)) as err:
        parcellate(bad, atlas)
    assert "trunc.nii.gz" in str(err.value)
    p3 = tmp_path / "vol3d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), p3)
    with pytest.raises(DataError, match="3D"):
        load_header(p3)


def test_sphere_atlas_matches_nilearn_spheres_masker(tmp_path):
    from nilearn.maskers import NiftiSpheresMasker

    aff = np.diag([4.0, 4.0, 4.0, 1.0])
    aff[:3, 3] = [-40, -40, -40]
    path, _ = _image(tmp_path, (21, 21, 21), 12, aff)
    coords = np.array([[0.0, 0.0, 0.0], [12.0, -8.0, 4.0], [-20.0, 16.0, 8.0]])
    table = pd.DataFrame({"index": [1, 2, 3], "name": ["a", "b", "c"], "network": "unassigned",
                          "x": coords[:, 0], "y": coords[:, 1], "z": coords[:, 2]})
    atlas = Atlas("spheres", table, radius_mm=6.0)
    ours = parcellate(path, atlas).timeseries
    ref = NiftiSpheresMasker(coords, radius=6.0, standardize=None).fit_transform(path)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_registry_and_networks(monkeypatch):
    s = load_atlas("seitzman300")
    assert s.n_rois == 300 and s.kind == "spheres"
    assert {"DefaultMode", "Visual", "FrontoParietal"} <= set(s.rois["network"])
    assert np.isfinite(s.coords).all()
    # a point at a Seitzman ROI takes its network; one far outside the brain is unassigned
    x = s.rois.iloc[10]
    assert assign_networks(np.array([[x.x, x.y, x.z + 2.0], [0.0, 0.0, 200.0]])) == [x.network, "unassigned"]
    assert yeo_network_from_name("7Networks_LH_Default_PFC_3") == "DefaultMode"
    assert yeo_network_from_name("HIP-head-m-rh") is None
    with pytest.raises(UsageError, match="unknown atlas"):
        load_atlas("no-such-atlas")
    p = load_atlas("power264")
    assert p.n_rois == 264 and (p.rois["network"] != "unassigned").mean() > 0.5


@needs_atlases
def test_schaefer_tian_tables(monkeypatch):
    monkeypatch.setenv("BIDS_FMRILM_ATLAS_DIR", str(ATLASES))
    a = load_atlas("schaefer400tian")
    assert a.rois["name"].iloc[0] == "HIP-head-m-rh" and a.rois["network"].iloc[0] == "Subcortical"
    vis = a.rois[a.rois["name"].str.contains("_Vis_")]
    assert len(vis) > 40 and (vis["network"] == "Visual").all()
    assert (a.rois["x"].abs() < 80).all()
    a2009 = load_atlas("schaefer400tian", space="MNI152NLin2009cAsym")
    assert a2009.space == "MNI152NLin2009cAsym" and a2009.n_rois == 450
    cc = load_atlas("cc200")
    assert cc.n_rois == 200 and cc.rois["name"].iloc[0] == "ROI001" and cc.kind == "table"
    t = read_label_table(ATLASES / "Schaefer2018_100Parcels_7Networks_order_Tian_Subcortex_S1_label.txt")
    assert len(t) == 116 and t["index"].tolist()[:3] == [1, 2, 3]


def test_load_atlas_from_path_with_tsv(tmp_path):
    lab = np.zeros((10, 10, 10), np.int16)
    lab[2:5, 2:5, 2:5] = 3
    lab[6:9, 6:9, 6:9] = 8
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(lab, aff), tmp_path / "myatlas.nii.gz")
    pd.DataFrame({"index": [3, 8], "name": ["left", "right"], "network": ["A", "B"]}).to_csv(
        tmp_path / "myatlas.tsv", sep="\t", index=False)
    a = load_atlas(tmp_path / "myatlas.nii.gz")
    assert a.rois["name"].tolist() == ["left", "right"] and a.rois["network"].tolist() == ["A", "B"]
    np.testing.assert_allclose(a.rois[["x", "y", "z"]].to_numpy()[0], [6.0, 6.0, 6.0])


def test_clean_regresses_confounds_and_keeps_dead_rois_nan():
    rng = np.random.default_rng(0)
    t = 200
    conf = rng.standard_normal((t, 2))
    sig = rng.standard_normal((t, 4))
    ts = sig + 3 * conf[:, [0]] + np.linspace(0, 5, t)[:, None]
    ts[:, 3] = 7.0  # constant ROI
    out = clean_timeseries(ts, 2.0, conf, high_pass=None)
    assert np.isnan(out[:, 3]).all()
    # the confound and the trend are gone
    assert abs(np.corrcoef(out[:, 0], conf[:, 0])[0, 1]) < 0.05
    assert abs(np.corrcoef(out[:, 0], np.arange(t))[0, 1]) < 0.05


def test_resample_preserves_slow_signal_and_length():
    tr, target = 1.5, 2.0
    t = np.arange(300) * tr
    x = np.sin(2 * np.pi * 0.03 * t)[:, None] * np.ones((1, 2))
    x[:, 1] = np.nan
    y = resample_to_tr(x, tr, target)
    assert y.shape == (225, 2) and np.isnan(y[:, 1]).all()
    t2 = np.arange(225) * target
    ref = np.sin(2 * np.pi * 0.03 * t2)
    np.testing.assert_allclose(y[10:-10, 0], ref[10:-10], atol=0.02)
    assert resample_to_tr(x, 2.0, 2.0).shape == x.shape


def test_read_confounds_fills_first_rows_and_checks_length(tmp_path):
    df = pd.DataFrame({c: np.r_[np.nan, np.arange(9.0)] if c.endswith("derivative1") else np.arange(10.0)
                       for c in ["trans_x", "trans_x_derivative1", "csf", "white_matter"]})
    df["framewise_displacement"] = np.r_[np.nan, np.ones(9)]
    df["non_steady_state_outlier00"] = np.r_[1, np.zeros(9)]
    p = tmp_path / "c.tsv"
    df.to_csv(p, sep="\t", index=False, na_rep="n/a")
    c = read_confounds(p, 10)
    assert c.names == ["trans_x", "trans_x_derivative1", "csf", "white_matter"] or set(c.names) == {
        "trans_x", "trans_x_derivative1", "csf", "white_matter"}
    assert np.isfinite(c.regressors).all() and c.regressors[0, 1] == 0.0
    assert c.non_steady.tolist() == [0] and c.fd[0] == 0.0
    with pytest.raises(DataError, match="11 volumes"):
        read_confounds(p, 11)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(2, 40), st.integers(1, 5)),
              elements=st.one_of(st.floats(-1e6, 1e6), st.just(np.nan))))
def test_robust_scale_properties(x):
    y, stats = robust_scale(x, clip=10.0)
    assert y.shape == x.shape
    assert np.isfinite(y).all() and np.abs(y).max() <= 10.0
    assert len(stats["median"]) == x.shape[1] and all(np.isfinite(stats["iqr"]))


@settings(max_examples=30, deadline=None)
@given(st.integers(20, 120), st.sampled_from([0.72, 1.0, 1.5, 2.0, 2.5, 3.0]))
def test_resample_length_property(n, tr):
    x = np.random.default_rng(n).standard_normal((n, 3))
    y = resample_to_tr(x, tr, 2.0)
    assert abs(len(y) - n * tr / 2.0) <= 1.0 and np.isfinite(y).all()

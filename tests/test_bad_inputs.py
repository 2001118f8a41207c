"""Bad inputs: every case ends with the right exit code, one clear line naming the file, no traceback,
no partial output, and the good runs of the same dataset still processed."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import assert_no_partial_files, check_refused, run_cli, run_cli_subprocess, timeseries_files, tree_hashes

SPACE = "MNI152NLin6Asym"
STEM = f"sub-01_task-rest_space-{SPACE}_desc-preproc"
N_VOLUMES = 40


@pytest.fixture()
def ds(datasets, tmp_path) -> Path:
    """A fresh copy of a two-participant fMRIPrep-style dataset (sub-01 gets broken, sub-02 stays good)."""
    return datasets.copy(tmp_path / "in", n_subjects=2)


def func(root: Path, sub: str = "01") -> Path:
    return root / f"sub-{sub}" / "func"


def bold(root: Path) -> Path:
    return func(root) / f"{STEM}_bold.nii.gz"


def sidecar(root: Path) -> Path:
    return func(root) / f"{STEM}_bold.json"


def confounds(root: Path) -> Path:
    return func(root) / "sub-01_task-rest_desc-confounds_timeseries.tsv"


def rewrite_image(path: Path, data: np.ndarray | None = None, **header) -> Path:
    """Save ``path`` again with new data and/or header fields (e.g. ``pixdim4=0``)."""
    img = nib.load(path)
    arr = np.asanyarray(img.dataobj) if data is None else data
    hdr = img.header.copy()
    new = nib.Nifti1Image(arr, img.affine, hdr)
    if "pixdim4" in header:
        new.header["pixdim"][4] = header["pixdim4"]
    nib.save(new, path)
    return path


def check_run_failed(res, out: Path, code: int, where: str, hint: str = "Fix", good=("sub-02_task-rest",)) -> str:
    """The run of sub-01 failed cleanly with ``code``; the good runs were processed. Returns the message."""
    assert res.code == code, res.stderr
    assert "Traceback" not in res.stderr
    line = res.line_with(where)  # one line names the file ...
    assert hint in line, line  # ... and says how to fix it
    assert_no_partial_files(out)
    done = sorted(p.name.split("_space-")[0].split("_atlas-")[0] for p in timeseries_files(out))
    assert done == sorted(good)
    assert not list(out.glob("sub-01/**/*_timeseries.*"))
    crash = list((out / "logs").glob("sub-01_*_crash.txt"))
    assert len(crash) == 1
    (summary_file,) = (out / "logs").glob("participant_*_summary.tsv")
    summary = pd.read_csv(summary_file, sep="\t").set_index("run")
    assert summary.loc["sub-01_task-rest", "status"] == "failed"
    assert summary.loc["sub-01_task-rest", "exit_code"] == code
    assert where in summary.loc["sub-01_task-rest", "reason"]
    assert (summary.drop(index="sub-01_task-rest")["status"] == "done").all()
    return line


# ------------------------------------------------------------------------------------------------
# the call as a whole


def test_not_a_bids_dir(tmp_path):
    src = tmp_path / "notbids"
    src.mkdir()
    (src / "README").write_text("just a folder\n")
    res = run_cli_subprocess(src, tmp_path / "out", "participant")
    line = check_refused(res, tmp_path / "out", 66, str(src))
    assert "dataset_description.json" in line
    assert not (tmp_path / "out").exists()


def test_input_folder_missing(tmp_path):
    res = run_cli(tmp_path / "nowhere", tmp_path / "out", "participant")
    check_refused(res, tmp_path / "out", 66, str(tmp_path / "nowhere"), hint="dataset_description.json")


def test_unknown_participant_label(ds, tmp_path):
    res = run_cli(ds, tmp_path / "out", "participant", "--participant-label", "01", "sub-99")
    line = check_refused(res, tmp_path / "out", 64, str(ds))
    assert "99" in line and "e.g. 01, 02" in line


@pytest.mark.parametrize("args", [["--task", "motor"], ["--session-label", "3"], ["filters"]],
                         ids=["task", "session", "filter-file"])
def test_filters_select_nothing(ds, tmp_path, args):
    if args == ["filters"]:
        ff = tmp_path / "f.json"
        ff.write_text(json.dumps({"bold": {"run": 5}}))
        args = ["--bids-filter-file", ff]
    res = run_cli(ds, tmp_path / "out", "participant", *args)
    line = check_refused(res, tmp_path / "out", 18, str(ds))
    assert "select none of 2 runs" in line


def test_bad_filter_file(ds, tmp_path):
    ff = tmp_path / "f.json"
    ff.write_text("{bold: }")
    res = run_cli(ds, tmp_path / "out", "participant", "--bids-filter-file", ff)
    check_refused(res, tmp_path / "out", 64, str(ff))
    res = run_cli(ds, tmp_path / "out", "participant", "--bids-filter-file", tmp_path / "missing.json")
    assert res.code == 66 and str(tmp_path / "missing.json") in res.line_with("filter file not found")


@pytest.mark.parametrize("where", ["same", "inside", "work-dir"])
def test_output_inside_input(ds, where):
    before = tree_hashes(ds)
    out = {"same": ds, "inside": ds / "derivatives" / "fmrilm", "work-dir": ds.parent / "out"}[where]
    extra = ["-w", ds / "work"] if where == "work-dir" else []
    res = run_cli(ds, out, "participant", *extra)
    assert res.code == 64, res.stderr
    line = res.line_with("inside the input dataset")
    assert str(ds) in line and "Fix" in line and "Traceback" not in res.stderr
    assert tree_hashes(ds) == before
    assert not (ds / "derivatives").exists() and not (ds / "work").exists()


def test_read_only_output_dir(ds, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("running as root: a read-only mode does not stop writes (see test_output_path_is_a_file)")
        res = run_cli(ds, out / "deriv", "participant")
        line = check_refused(res, out / "deriv", 73, str(out))
        assert "writable" in line
    finally:
        out.chmod(0o755)


@pytest.mark.parametrize("below", [False, True], ids=["file", "under-file"])
def test_output_path_is_a_file(ds, tmp_path, below):
    blocker = tmp_path / "taken"
    blocker.write_text("a file where OUTPUT_DIR should go\n")
    out = blocker / "deriv" if below else blocker
    res = run_cli(ds, out, "participant")
    line = check_refused(res, out, 73, str(blocker))
    assert "not a folder" in line
    assert blocker.read_text() == "a file where OUTPUT_DIR should go\n"


# ------------------------------------------------------------------------------------------------
# one bad run among good ones


def test_missing_repetition_time(ds, tmp_path):
    sidecar(ds).write_text(json.dumps({"TaskName": "rest"}))
    rewrite_image(bold(ds), pixdim4=0)  # nor a TR in the header
    res = run_cli(ds, tmp_path / "out", "participant")
    line = check_run_failed(res, tmp_path / "out", 65, str(bold(ds)))
    assert "RepetitionTime is missing" in line and f"{STEM}_bold.json" in line


def test_missing_repetition_time_header_fallback(ds, tmp_path):
    """Without RepetitionTime in the sidecar, a TR in the NIfTI header (in seconds) is used."""
    sidecar(ds).write_text(json.dumps({"TaskName": "rest"}))
    res = run_cli(ds, tmp_path / "out", "participant", "--participant-label", "01")
    assert res.code == 0, res.stderr
    (js,) = (tmp_path / "out").glob("sub-01/func/*_timeseries.json")
    assert json.loads(js.read_text())["SourceRepetitionTime"] == 2.0


@pytest.mark.parametrize("tr", [2000, "2.0s", -2])
def test_bad_repetition_time(ds, tmp_path, tr):
    sidecar(ds).write_text(json.dumps({"TaskName": "rest", "RepetitionTime": tr}))
    res = run_cli(ds, tmp_path / "out", "participant")
    line = check_run_failed(res, tmp_path / "out", 65, str(bold(ds)))
    if tr == 2000:
        assert "looks like milliseconds" in line and "write 2 in" in line


def test_3d_image(ds, tmp_path):
    rewrite_image(bold(ds), np.asanyarray(nib.load(bold(ds)).dataobj)[..., 0])
    res = run_cli(ds, tmp_path / "out", "participant")
    line = check_run_failed(res, tmp_path / "out", 65, str(bold(ds)))
    assert "3D" in line and "4D BOLD" in line


def test_truncated_gzip(ds, tmp_path):
    data = bold(ds).read_bytes()
    bold(ds).write_bytes(data[: len(data) - 2000])
    res = run_cli(ds, tmp_path / "out", "participant")
    # a damaged file is malformed data (65), compressed (here) or not (below); 74 is kept for
    # failures of the file system itself
    line = check_run_failed(res, tmp_path / "out", 65, str(bold(ds)))
    assert "gzip -t" in line and "EOFError" in line


def test_truncated_nii(ds, tmp_path):
    raw = gzip.decompress(bold(ds).read_bytes())
    bold(ds).unlink()
    nii = bold(ds).with_name(bold(ds).name[: -len(".gz")])
    nii.write_bytes(raw[:-1000])
    res = run_cli(ds, tmp_path / "out", "participant")
    line = check_run_failed(res, tmp_path / "out", 65, str(nii))
    assert f"file ends after {N_VOLUMES - 1} of {N_VOLUMES} volumes (truncated)" in line


def test_header_only_nifti(ds, tmp_path):
    hdr = nib.load(bold(ds)).header
    bold(ds).write_bytes(gzip.compress(hdr.binaryblock + b"\0\0\0\0"))
    res = run_cli(ds, tmp_path / "out", "participant")
    line = check_run_failed(res, tmp_path / "out", 65, str(bold(ds)))
    assert f"file ends after 0 of {N_VOLUMES} volumes" in line


def test_not_a_nifti(ds, tmp_path):
    bold(ds).write_bytes(gzip.compress(b"this is not an image\n" * 100))
    res = run_cli(ds, tmp_path / "out", "participant")
    line = check_run_failed(res, tmp_path / "out", 65, str(bold(ds)))
    assert "not a readable NIfTI image" in line


def test_nan_and_constant_voxels(ds, tmp_path):
    from bids_fmrilm.signals.atlas import load_atlas
    from bids_fmrilm.signals.parcellate import atlas_weights

    img = nib.load(bold(ds))
    data = np.asanyarray(img.dataobj).copy()
    atlas = load_atlas("seitzman300")
    w, counts = atlas_weights(atlas, img, nib.load(func(ds) / f"sub-01_task-rest_space-{SPACE}_desc-brain_mask.nii.gz"))
    members = [np.unravel_index(w[r].indices, data.shape[:3], order="F") for r in range(atlas.n_rois)]
    multi = [r for r in range(atlas.n_rois) if counts[r] >= 2]
    const_roi, nan_roi, partial_roi = multi[0], multi[1], multi[2]
    data[members[const_roi]] = 100.0  # constant in time
    data[members[nan_roi]] = np.nan  # every voxel, every volume
    i, j, k = (m[0] for m in members[partial_roi])
    data[i, j, k, 5:15] = np.nan  # one voxel, some volumes
    data[0, 0, 0, :] = np.nan  # outside the brain
    rewrite_image(bold(ds), data)
    res = run_cli(ds, tmp_path / "out", "participant")
    assert res.code == 0, res.stderr
    assert_no_partial_files(tmp_path / "out")
    (js,) = (tmp_path / "out").glob("sub-01/func/*_timeseries.json")
    meta = json.loads(js.read_text())
    names = atlas.rois["name"].tolist()
    assert meta["ROIsWithoutSignal"] == sorted([names[const_roi], names[nan_roi]], key=names.index)
    df = pd.read_csv(js.with_name(js.name.replace(".json", ".tsv.gz")), sep="\t", na_values=["n/a"])
    assert df[names[const_roi]].isna().all() and df[names[nan_roi]].isna().all()
    assert np.isfinite(df[names[partial_roi]]).all() and df[names[partial_roi]].std() > 0
    gone = set(meta["ROIsWithoutSignal"]) | set(meta["ROIsWithoutVoxels"])
    assert np.isfinite(df.drop(columns=sorted(gone)).to_numpy()).all()
    # the second run is untouched: no ROI without signal
    (js2,) = (tmp_path / "out").glob("sub-02/func/*_timeseries.json")
    assert json.loads(js2.read_text())["ROIsWithoutSignal"] == []


def _shorten(ds: Path, n: int) -> None:
    img = nib.load(bold(ds))
    rewrite_image(bold(ds), np.asanyarray(img.dataobj)[..., :n])
    conf = pd.read_csv(confounds(ds), sep="\t")
    conf.iloc[:n].to_csv(confounds(ds), sep="\t", index=False, na_rep="n/a")


def test_run_shorter_than_one_patch(ds, tmp_path):
    _shorten(ds, 12)
    res = run_cli(ds, tmp_path / "out", "participant")
    line = check_run_failed(res, tmp_path / "out", 65, str(bold(ds)))
    assert "run has 11 usable volumes" in line and "--bids-filter-file" in line


@pytest.mark.parametrize("n", [17, 19, 20])
def test_short_runs_of_one_patch_complete(ds, tmp_path, n):
    """16 usable volumes (one patch at TR 2) are enough; the Butterworth filter needs more than 18."""
    _shorten(ds, n)
    res = run_cli(ds, tmp_path / "out", "participant", "--participant-label", "01")
    assert res.code == 0, res.stderr
    (js,) = (tmp_path / "out").glob("sub-01/func/*_timeseries.json")
    meta = json.loads(js.read_text())
    assert meta["Volumes"] == n - 1
    steps = " | ".join(meta["CleaningSteps"])
    assert ("temporal filter skipped" in steps) == (n - 1 <= 18)
    assert ("Butterworth high-pass 0.008 Hz" in steps) == (n - 1 > 18)
    df = pd.read_csv(js.with_name(js.name.replace(".json", ".tsv.gz")), sep="\t", na_values=["n/a"])
    assert df.shape == (n - 1, 300)
    assert np.isfinite(df.drop(columns=meta["ROIsWithoutVoxels"]).to_numpy()).all()


@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_short_run_band_pass(ds):
    """With a low-pass as well (band-pass), the filter needs more than 33 volumes."""
    from bids_fmrilm.bids.layout import find_runs
    from bids_fmrilm.config import SignalSettings
    from bids_fmrilm.signals.pipeline import extract_signals

    _shorten(ds, 30)
    (run,) = find_runs(ds, participant_label=("01",))
    sig = extract_signals(run, SignalSettings(low_pass=0.1))
    assert sig.timeseries.shape == (29, 300)
    assert any("temporal filter skipped" in s for s in sig.steps)
    (run,) = find_runs(ds, participant_label=("02",))
    sig = extract_signals(run, SignalSettings(low_pass=0.1))
    assert any("Butterworth high-pass 0.008 Hz, low-pass 0.1 Hz" in s for s in sig.steps)


def test_atlas_grid_differs_from_image(datasets, tmp_path):
    """A 2 mm label atlas on 6 mm images is resampled (nearest neighbour) to the image grid."""
    from nilearn.datasets import load_mni152_brain_mask

    ds = datasets.copy(tmp_path / "in", n_subjects=1, voxel_mm=6.0, seed=3)
    mask = load_mni152_brain_mask(resolution=2)
    assert np.allclose(np.abs(np.diag(mask.affine)[:3]), 2.0)
    ijk = np.indices(mask.shape).reshape(3, -1).T
    xyz = nib.affines.apply_affine(mask.affine, ijk).reshape(*mask.shape, 3)
    octant = 1 + (xyz[..., 0] > 0) + 2 * (xyz[..., 1] > -18) + 4 * (xyz[..., 2] > 18)
    labels = np.where(np.asanyarray(mask.dataobj) > 0, octant, 0).astype(np.int16)
    atlas_path = tmp_path / "octants.nii.gz"
    nib.save(nib.Nifti1Image(labels, mask.affine), atlas_path)
    names = [f"oct{i}" for i in range(1, 9)]
    pd.DataFrame({"index": range(1, 9), "name": names}).to_csv(tmp_path / "octants.tsv", sep="\t", index=False)
    res = run_cli(ds, tmp_path / "out", "participant", "--atlas", atlas_path)
    assert res.code == 0, res.stderr
    (tsv,) = timeseries_files(tmp_path / "out")
    assert tsv.name == f"sub-01_task-rest_space-{SPACE}_atlas-octants_timeseries.tsv.gz"
    df = pd.read_csv(tsv, sep="\t", na_values=["n/a"])
    assert list(df.columns) == names and df.shape == (N_VOLUMES - 1, 8)
    assert np.isfinite(df.to_numpy()).all() and (df.std() > 0).all()
    meta = json.loads(tsv.with_name(tsv.name.replace(".tsv.gz", ".json")).read_text())
    assert meta["ROIsWithoutVoxels"] == [] and meta["ROIsWithoutSignal"] == []
    assert "(labels)" in meta["CleaningSteps"][0]
    table = pd.read_csv(tmp_path / "out" / "atlas-octants_dseg.tsv", sep="\t")
    assert table["name"].tolist() == names
    assert (np.sign(table["x"].to_numpy()) == np.array([-1, 1] * 4)).all()


def _raw_dataset(root: Path, template: Path) -> Path:
    """A raw BIDS dataset: sub-01 native space (sform_code 1, far from MNI), sub-02 already in MNI."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({
        "Name": "raw test", "BIDSVersion": "1.10.0", "DatasetType": "raw", "License": "CC0",
        "Authors": ["tests"]}))
    (root / "README").write_text("A raw dataset for the tests of bids_fmrilm.\n")
    (root / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\n")
    (root / "task-rest_bold.json").write_text(json.dumps({"RepetitionTime": 2.0, "TaskName": "rest"}))
    for sub in ("01", "02"):
        (root / f"sub-{sub}" / "func").mkdir(parents=True)
    native = np.eye(4)
    native[:3, :3] *= 3.0
    native[:3, 3] = [400.0, 380.0, 420.0]
    rng = np.random.default_rng(0)
    img = nib.Nifti1Image(rng.normal(100, 1, (12, 12, 10, N_VOLUMES)).astype(np.float32), native)
    img.header.set_sform(native, code=1)
    img.header.set_qform(native, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, root / "sub-01" / "func" / "sub-01_task-rest_bold.nii.gz")
    shutil.copy(template / "sub-02" / "func" / f"sub-02_task-rest_space-{SPACE}_desc-preproc_bold.nii.gz",
                root / "sub-02" / "func" / "sub-02_task-rest_bold.nii.gz")  # sform_code 4: MNI
    return root


def test_native_space_raw_bold(datasets, tmp_path):
    raw = _raw_dataset(tmp_path / "raw", datasets.template(n_subjects=2))
    # --preproc none: raw native-space BOLD is refused (auto would run the minimal pipeline)
    res = run_cli(raw, tmp_path / "out", "participant", "--preproc", "none")  # validated: the dataset is valid BIDS
    assert "BIDS validation passed" in res.stderr
    line = check_run_failed(res, tmp_path / "out", 66, str(raw / "sub-01" / "func" / "sub-01_task-rest_bold.nii.gz"))
    assert "native space" in line and "fMRIPrep" in line
    (js,) = (tmp_path / "out").glob("sub-02/func/*_timeseries.json")
    meta = json.loads(js.read_text())
    assert meta["RepetitionTime"] == 2.0 and meta["Volumes"] == N_VOLUMES and meta["Confounds"] == []


def test_invalid_raw_dataset(datasets, tmp_path):
    raw = _raw_dataset(tmp_path / "raw", datasets.template(n_subjects=2))
    (raw / "sub-01" / "func" / "sub-01_task-rest_blod.nii.gz").write_bytes(b"")
    res = run_cli(raw, tmp_path / "out", "participant")
    line = check_refused(res, tmp_path / "out", 16, str(raw), hint="--skip-bids-validation")
    assert "BIDS validation found" in line


def test_malformed_json_sidecar(ds, tmp_path):
    sidecar(ds).write_text('{"RepetitionTime": 2.0, "TaskName": "rest",}')
    res = run_cli(ds, tmp_path / "out", "participant")
    line = check_run_failed(res, tmp_path / "out", 65, str(sidecar(ds)))
    assert "malformed JSON" in line and "make it valid JSON" in line


def test_confounds_wrong_row_count(ds, tmp_path):
    conf = pd.read_csv(confounds(ds), sep="\t")
    conf.iloc[:-3].to_csv(confounds(ds), sep="\t", index=False, na_rep="n/a")
    res = run_cli(ds, tmp_path / "out", "participant")
    line = check_run_failed(res, tmp_path / "out", 65, str(confounds(ds)))
    assert f"{N_VOLUMES - 3} rows but the BOLD run has {N_VOLUMES} volumes" in line


def test_failed_run_is_retried_and_input_untouched(ds, tmp_path):
    """A failed run leaves nothing that a re-run would skip; fixing the input lets it complete."""
    good = sidecar(ds).read_text()
    sidecar(ds).write_text("{")
    before = tree_hashes(ds)
    res = run_cli(ds, tmp_path / "out", "participant")
    assert res.code == 65
    assert tree_hashes(ds) == before
    sidecar(ds).write_text(good)
    res = run_cli(ds, tmp_path / "out", "participant")
    assert res.code == 0, res.stderr
    assert "1 done, 1 skipped, 0 failed" in res.stderr
    assert len(timeseries_files(tmp_path / "out")) == 2

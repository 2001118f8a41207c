"""Bad inputs not covered by tests/test_bad_inputs.py: each ends with the documented exit code,
one line naming the file and the fix, no traceback, no partial output, the other runs processed,
and the input dataset byte-for-byte unchanged."""

from __future__ import annotations

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import assert_no_partial_files, run_cli, timeseries_files

from .conftest import (
    bold, check_debug_traceback, check_done, check_refused, check_run_failed, confounds, done_runs, func, sidecar,
    summary,
)


def _resave(path, data, dtype=None):
    img = nib.load(path)
    new = nib.Nifti1Image(data, img.affine)
    new.header.set_xyzt_units("mm", "sec")
    new.header["pixdim"][4] = img.header["pixdim"][4]
    new.header.set_sform(img.affine, code=4)
    if dtype is not None:
        new.set_data_dtype(dtype)
    nib.save(new, path)


def test_empty_nifti(ds, tmp_path, guard):
    bold(ds).write_bytes(b"")
    guard.protect(ds)
    res = run_cli(ds, tmp_path / "out", "participant")
    line = check_run_failed(res, tmp_path / "out", 65, str(bold(ds)))
    assert "not a readable NIfTI image" in line and "Empty file" in line


@pytest.mark.parametrize("kind", ["complex64", "rgb"])
def test_wrong_dtype(ds, tmp_path, guard, kind):
    data = np.asanyarray(nib.load(bold(ds)).dataobj)
    if kind == "complex64":
        _resave(bold(ds), data.astype(np.complex64), np.complex64)
    else:
        rgb = np.zeros(data.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        rgb["R"] = np.clip(data / data.max() * 255, 0, 255).astype("u1")
        _resave(bold(ds), rgb)
    assert nib.load(bold(ds)).header["datatype"] == (32 if kind == "complex64" else 128)
    guard.protect(ds)
    res = run_cli(ds, tmp_path / "out", "participant")
    line = check_run_failed(res, tmp_path / "out", 65, str(bold(ds)))
    assert "is not a real-valued scalar type" in line and "magnitude BOLD" in line


def test_all_nan_image(ds, tmp_path, guard):
    shape = nib.load(bold(ds)).shape
    _resave(bold(ds), np.full(shape, np.nan, np.float32))
    guard.protect(ds)
    res = run_cli(ds, tmp_path / "out", "participant")
    line = check_run_failed(res, tmp_path / "out", 65, str(bold(ds)))
    assert "no signal" in line


def test_partly_nan_voxels(ds, tmp_path, guard):
    data = np.asanyarray(nib.load(bold(ds)).dataobj).astype(np.float32)
    rng = np.random.default_rng(1)
    holes = rng.random(data.shape[:3]) < 0.3  # 30 % of voxels NaN throughout
    data[holes] = np.nan
    data[rng.random(data.shape) < 0.01] = np.inf  # scattered infinite values
    _resave(bold(ds), data)
    guard.protect(ds)
    out = tmp_path / "out"
    res = run_cli(ds, out, "participant")
    check_done(res, out)
    (js,) = out.glob("sub-01/func/*_timeseries.json")
    meta = json.loads(js.read_text())
    df = pd.read_csv(js.with_name(js.name.replace(".json", ".tsv.gz")), sep="\t", na_values=["n/a"])
    gone = set(meta["ROIsWithoutSignal"]) | set(meta["ROIsWithoutVoxels"])
    assert len(gone) < df.shape[1] // 2
    assert np.isfinite(df.drop(columns=sorted(gone)).to_numpy()).all()


def test_tr_header_differs_from_sidecar(ds, tmp_path, guard):
    assert nib.load(bold(ds)).header.get_zooms()[3] == 2.0
    meta = json.loads(sidecar(ds).read_text())
    sidecar(ds).write_text(json.dumps({**meta, "RepetitionTime": 1.5}))
    guard.protect(ds)
    out = tmp_path / "out"
    res = run_cli(ds, out, "participant")
    check_done(res, out)
    warn = res.line_with("NIfTI header says 2 s")
    assert warn.startswith("WARNING ") and str(bold(ds)) in warn and "sidecar" in warn and "Fix" in warn
    (js,) = out.glob("sub-01/func/*_timeseries.json")
    rec = json.loads(js.read_text())
    assert rec["SourceRepetitionTime"] == 1.5 and rec["RepetitionTime"] == 2.0  # JSON wins, resampled to the model TR
    assert any("NIfTI header says 2 s" in s for s in rec["CleaningSteps"])
    (js2,) = out.glob("sub-02/func/*_timeseries.json")
    assert not any("header" in s for s in json.loads(js2.read_text())["CleaningSteps"])


def test_confounds_nan_first_rows(ds, tmp_path, guard):
    conf = pd.read_csv(confounds(ds), sep="\t", na_values=["n/a"])
    cols = [c for c in conf.columns if not c.startswith("non_steady")]
    conf.loc[:2, cols] = np.nan  # derivatives and FD are n/a in the first rows
    conf.to_csv(confounds(ds), sep="\t", index=False, na_rep="n/a")
    assert confounds(ds).read_text().splitlines()[1].startswith("n/a\tn/a")
    guard.protect(ds)
    out = tmp_path / "out"
    res = run_cli(ds, out, "participant")
    check_done(res, out)
    (js,) = out.glob("sub-01/func/*_timeseries.json")
    meta = json.loads(js.read_text())
    assert len(meta["Confounds"]) == 14 and np.isfinite(meta["MeanFramewiseDisplacement"])
    df = pd.read_csv(js.with_name(js.name.replace(".json", ".tsv.gz")), sep="\t", na_values=["n/a"])
    assert np.isfinite(df.drop(columns=meta["ROIsWithoutVoxels"] + meta["ROIsWithoutSignal"]).to_numpy()).all()


def test_no_func_data(tmp_path, guard):
    src = tmp_path / "anat_only"
    (src / "sub-01" / "anat").mkdir(parents=True)
    (src / "dataset_description.json").write_text(json.dumps({"Name": "anat", "BIDSVersion": "1.10.0"}))
    (src / "participants.tsv").write_text("participant_id\nsub-01\n")
    (src / "sub-01" / "anat" / "sub-01_T1w.json").write_text("{}")
    guard.protect(src)
    res = run_cli(src, tmp_path / "out", "participant", "--skip-bids-validation")
    line = check_refused(res, tmp_path / "out", 66, str(src))
    assert "no BOLD runs" in line and "sub-*/func" in line


@pytest.mark.timeout(120)
def test_symlink_loop(ds, tmp_path, guard):
    os.symlink("..", func(ds) / "loop")
    guard.protect(ds)
    out = tmp_path / "out"
    res = run_cli(ds, out, "participant")
    check_done(res, out)
    warn = res.line_with("(a loop)")
    assert warn.startswith("WARNING ") and str(func(ds) / "loop") in warn and "Fix" in warn
    (js,) = out.glob("sub-01/func/*_timeseries.json")
    assert json.loads(js.read_text())["Sources"] == [f"bids:raw:{bold(ds).relative_to(ds)}"]


def test_unreadable_bold_dangling_link(ds, tmp_path, guard):
    """Root reads everything: an unreadable file is simulated by a link to nowhere named like a BOLD run."""
    bad = func(ds) / bold(ds).name.replace("task-rest", "task-rest_run-2")
    os.symlink(tmp_path / "gone" / "bold.nii.gz", bad)
    guard.protect(ds)
    out = tmp_path / "out"
    res = run_cli(ds, out, "participant")
    line = check_run_failed(res, out, 66, str(bad), failed="sub-01_task-rest_run-2",
                            good=("sub-01_task-rest", "sub-02_task-rest"))
    assert "broken symbolic link" in line


def test_non_utf8_file_name(ds, tmp_path, guard):
    bad = os.fsencode(func(ds)) + b"/sub-01_task-r\xe9st_bold.nii.gz"
    shutil.copyfile(os.fsencode(bold(ds)), bad)
    guard.protect(ds)
    out = tmp_path / "out"
    res = run_cli(ds, out, "participant")
    check_done(res, out)
    warn = res.line_with("not valid UTF-8")
    assert warn.startswith("WARNING ") and "sub-01_task-r\\xe9st_bold.nii.gz" in warn and "Fix" in warn


def test_debug_shows_traceback_for_a_failed_run(ds, tmp_path, guard):
    bold(ds).write_bytes(b"")
    guard.protect(ds)
    check_debug_traceback(ds, tmp_path / "out", "participant", code=65)
    assert_no_partial_files(tmp_path / "out")
    assert done_runs(tmp_path / "out") == ["sub-02_task-rest"]


def test_debug_shows_traceback_when_refused(tmp_path, guard):
    src = tmp_path / "in"
    src.mkdir()
    (src / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.10.0"}))
    guard.protect(src)
    check_debug_traceback(src, tmp_path / "out", "participant", "--skip-bids-validation", code=66)


def test_logs_crash_report_and_summary(ds, tmp_path, guard):
    """Per-run crash reports under logs/ and a summary table (done, skipped, failed, why)."""
    bold(ds).write_bytes(b"")
    guard.protect(ds)
    out = tmp_path / "out"
    res = run_cli(ds, out, "participant")
    assert res.code == 65
    assert "1 done, 0 skipped, 1 failed" in res.stderr
    (crash,) = (out / "logs").glob("*_crash.txt")
    assert crash.name.startswith("sub-01_task-rest_")
    text = crash.read_text()
    assert text.startswith(f"run: {bold(ds).relative_to(ds)}\nerror: {bold(ds)}: not a readable NIfTI image")
    assert "Traceback (most recent call last)" in text and "DataError" in text
    tab = summary(out)
    assert list(tab.columns) == ["source", "status", "exit_code", "seconds", "reason"]
    assert tab.loc["sub-01_task-rest", "status"] == "failed" and tab.loc["sub-01_task-rest", "exit_code"] == 65
    assert tab.loc["sub-01_task-rest", "reason"].startswith(f"{bold(ds)}: not a readable NIfTI image")
    assert tab.loc["sub-02_task-rest", "status"] == "done" and tab.loc["sub-02_task-rest", "reason"] == ""
    assert tab.loc["sub-02_task-rest", "source"] == str(bold(ds, "02").relative_to(ds))
    # re-run: the good run is skipped (and says why), the bad one fails again, nothing else changes
    res = run_cli(ds, out, "participant")
    assert res.code == 65 and "0 done, 1 skipped, 1 failed" in res.stderr
    assert len(list((out / "logs").glob("participant_*_summary.tsv"))) == 2
    tab = summary(out)
    assert tab.loc["sub-02_task-rest", "status"] == "skipped"
    assert tab.loc["sub-02_task-rest", "reason"] == "complete, same settings"
    assert tab.loc["sub-01_task-rest", "status"] == "failed"
    assert len(list((out / "logs").glob("*_crash.txt"))) == 1  # overwritten, not piled up
    assert_no_partial_files(out)
    assert len(timeseries_files(out)) == 1


@pytest.mark.timeout(120)
def test_mutual_folder_links(ds, tmp_path, guard):
    """func/x -> ../anat and anat/y -> ../func: no endless indexing, no run found twice."""
    (ds / "sub-01" / "anat").mkdir()
    os.symlink("../anat", func(ds) / "x")
    os.symlink("../func", ds / "sub-01" / "anat" / "y")
    guard.protect(ds)
    out = tmp_path / "out"
    res = run_cli(ds, out, "participant")
    check_done(res, out)
    assert "a folder of the dataset indexed where it is" in res.line_with(str(func(ds) / "x"))
    (js,) = out.glob("sub-01/func/*_timeseries.json")
    assert json.loads(js.read_text())["Sources"] == [f"bids:raw:{bold(ds).relative_to(ds)}"]

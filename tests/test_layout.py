"""Finding runs in BIDS datasets: bids_fmrilm.bids.layout."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_fmrilm.bids.layout import find_runs, load_filters, read_sidecar, strip_prefix
from bids_fmrilm.errors import DataError, MissingInputError, NothingSelectedError, UsageError

SPACE = "MNI152NLin6Asym"


@pytest.fixture(scope="module")
def fmriprep(datasets, tmp_path_factory) -> Path:
    """fMRIPrep-style dataset: sub-01 and sub-02, sessions 1 and 2."""
    return datasets.copy(tmp_path_factory.mktemp("layout") / "fmriprep", sessions=("1", "2"))


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_volume_runs_get_confounds_mask_and_metadata(fmriprep):
    runs = find_runs(fmriprep)
    assert [r.run_id for r in runs] == ["sub-01_ses-1_task-rest", "sub-01_ses-2_task-rest",
                                        "sub-02_ses-1_task-rest", "sub-02_ses-2_task-rest"]
    for r in runs:
        assert r.kind == "volume"
        assert r.space == SPACE
        assert r.dataset == fmriprep.resolve()
        stem = f"sub-{r.subject}_ses-{r.entities['session']}_task-rest"
        assert r.path.name == f"{stem}_space-{SPACE}_desc-preproc_bold.nii.gz"
        assert r.confounds == r.path.parent / f"{stem}_desc-confounds_timeseries.tsv"
        assert r.mask == r.path.parent / f"{stem}_space-{SPACE}_desc-brain_mask.nii.gz"
        assert r.confounds.is_file() and r.mask.is_file()
        assert r.metadata["RepetitionTime"] == 2.0
        assert r.metadata_error is None
        assert r.relpath() == str(r.path.relative_to(fmriprep.resolve()))


def test_preferred_mni_space_when_two_exist(fmriprep, tmp_path):
    ds = shutil.copytree(fmriprep, tmp_path / "ds")
    func = ds / "sub-01" / "ses-1" / "func"
    stem = "sub-01_ses-1_task-rest"
    for space in ("MNI152NLin2009cAsym", "T1w"):
        for suffix in ("desc-preproc_bold.nii.gz", "desc-preproc_bold.json", "desc-brain_mask.nii.gz"):
            shutil.copy(func / f"{stem}_space-{SPACE}_{suffix}", func / f"{stem}_space-{space}_{suffix}")
    runs = find_runs(ds, participant_label=("01",), session_label=("1",))
    assert len(runs) == 1, [str(r.path) for r in runs]
    (run,) = runs
    # MNI152NLin2009cAsym comes first in MNI_SPACES; T1w outputs are never used
    assert run.space == "MNI152NLin2009cAsym"
    assert run.path.name == f"{stem}_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz"
    assert run.mask.name == f"{stem}_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz"
    assert run.confounds.name == f"{stem}_desc-confounds_timeseries.tsv"
    # the other runs keep their only space
    others = [r for r in find_runs(ds) if r.run_id != run.run_id]
    assert len(others) == 3 and {r.space for r in others} == {SPACE}


@pytest.fixture(scope="module")
def abide_like(tmp_path_factory) -> Path:
    """Three C-PAC-style ROI time-series runs (atlas CC200), as in ABIDE PCP."""
    root = tmp_path_factory.mktemp("abide") / "abide"
    _write_json(root / "dataset_description.json", {"Name": "ABIDE-like", "BIDSVersion": "1.10.0",
                                                     "DatasetType": "derivative",
                                                     "GeneratedBy": [{"Name": "C-PAC"}]})
    rng = np.random.default_rng(0)
    for i, sub in enumerate(["0050003", "0050004", "0051000"]):
        func = root / f"sub-{sub}" / "func"
        func.mkdir(parents=True)
        stem = f"sub-{sub}_task-rest_atlas-CC200_timeseries"
        header = "\t".join(f"#{k}" for k in range(1, 6))
        rows = "\n".join("\t".join(f"{v:.4f}" for v in row) for row in rng.standard_normal((30, 5)))
        (func / f"{stem}.tsv.gz").write_bytes(gzip.compress(f"{header}\n{rows}\n".encode()))
        _write_json(func / f"{stem}.json", {"RepetitionTime": [2.0, 1.5, 3.0][i], "Atlas": "CC200"})
    (root / "participants.tsv").write_text("participant_id\tdiagnosis\nsub-0050003\tASD\nsub-0050004\tTD\n"
                                           "sub-0051000\tTD\n")
    return root


def test_roi_timeseries_runs_found(abide_like):
    runs = find_runs(abide_like)
    assert [r.run_id for r in runs] == ["sub-0050003_task-rest", "sub-0050004_task-rest", "sub-0051000_task-rest"]
    for r, tr in zip(runs, [2.0, 1.5, 3.0]):
        assert r.kind == "roi"
        assert r.entities["atlas"] == "CC200"
        assert r.path.name.endswith("_atlas-CC200_timeseries.tsv.gz")
        assert r.metadata["RepetitionTime"] == tr
        assert r.confounds is None and r.mask is None
        assert r.space is None


def test_roi_runs_selection_and_prefix(abide_like):
    runs = find_runs(abide_like, participant_label=("sub-0050004", "0051000"))
    assert [r.subject for r in runs] == ["0050004", "0051000"]


def test_strip_prefix():
    assert strip_prefix("sub-01", "sub") == "01"
    assert strip_prefix("01", "sub") == "01"
    assert strip_prefix(" sub-abc ", "sub") == "abc"
    assert strip_prefix("ses-1", "ses") == "1"
    assert strip_prefix("subject01", "sub") == "subject01"


def test_participant_label_with_and_without_prefix(fmriprep):
    with_prefix = find_runs(fmriprep, participant_label=("sub-02",))
    without = find_runs(fmriprep, participant_label=("02",))
    assert [r.path for r in with_prefix] == [r.path for r in without]
    assert {r.subject for r in with_prefix} == {"02"} and len(with_prefix) == 2


def test_session_task_and_filters(fmriprep):
    assert [r.run_id for r in find_runs(fmriprep, session_label=("ses-2",))] == [
        "sub-01_ses-2_task-rest", "sub-02_ses-2_task-rest"]
    assert len(find_runs(fmriprep, task=("rest",))) == 4
    assert [r.run_id for r in find_runs(fmriprep, filters={"subject": "02", "session": ["1"]})] == [
        "sub-02_ses-1_task-rest"]


def test_find_runs_errors(fmriprep, tmp_path):
    with pytest.raises(MissingInputError, match="dataset_description.json"):
        find_runs(tmp_path)
    with pytest.raises(MissingInputError, match="does not exist"):
        find_runs(tmp_path / "nope")
    with pytest.raises(UsageError, match="99") as exc:
        find_runs(fmriprep, participant_label=("01", "99"))
    assert "01" in exc.value.fix and "02" in exc.value.fix
    with pytest.raises(NothingSelectedError):
        find_runs(fmriprep, task=("motor",))
    with pytest.raises(NothingSelectedError):
        find_runs(fmriprep, filters={"session": "3"})
    (tmp_path / "empty").mkdir()
    _write_json(tmp_path / "empty" / "dataset_description.json", {"Name": "x", "BIDSVersion": "1.10.0"})
    with pytest.raises(MissingInputError, match="no BOLD runs"):
        find_runs(tmp_path / "empty")


def test_raw_runs_mni_header_and_native(tmp_path):
    root = tmp_path / "raw"
    _write_json(root / "dataset_description.json", {"Name": "raw", "BIDSVersion": "1.10.0"})
    for sub, code in (("01", 4), ("02", 1)):
        func = root / f"sub-{sub}" / "func"
        func.mkdir(parents=True)
        img = nib.Nifti1Image(np.zeros((4, 4, 4, 5), np.float32), np.diag([4.0, 4.0, 4.0, 1.0]))
        img.header.set_sform(img.affine, code=code)
        nib.save(img, func / f"sub-{sub}_task-rest_bold.nii.gz")
        _write_json(func / f"sub-{sub}_task-rest_bold.json", {"RepetitionTime": 2.0, "TaskName": "rest"})
    kinds = {r.subject: r.kind for r in find_runs(root)}
    assert kinds == {"01": "volume", "02": "raw"}


def test_fmriprep_output_preferred_over_raw_unless_prefer_raw(tmp_path):
    """--preproc auto takes fMRIPrep's MNI run; --preproc minimal (prefer_raw) the raw one."""
    root = tmp_path / "raw"
    _write_json(root / "dataset_description.json", {"Name": "raw", "BIDSVersion": "1.10.0"})
    func = root / "sub-01" / "func"
    func.mkdir(parents=True)
    img = nib.Nifti1Image(np.zeros((4, 4, 4, 5), np.float32), np.diag([4.0, 4.0, 4.0, 1.0]))
    img.header.set_sform(img.affine, code=1)
    nib.save(img, func / "sub-01_task-rest_bold.nii.gz")
    _write_json(func / "sub-01_task-rest_bold.json", {"RepetitionTime": 2.0, "TaskName": "rest"})
    deriv = root / "derivatives" / "fmriprep"
    _write_json(deriv / "dataset_description.json", {"Name": "fMRIPrep", "BIDSVersion": "1.10.0",
                                                     "DatasetType": "derivative", "GeneratedBy": [{"Name": "fMRIPrep"}]})
    dfunc = deriv / "sub-01" / "func"
    dfunc.mkdir(parents=True)
    nib.save(img, dfunc / f"sub-01_task-rest_space-{SPACE}_desc-preproc_bold.nii.gz")
    _write_json(dfunc / f"sub-01_task-rest_space-{SPACE}_desc-preproc_bold.json", {"RepetitionTime": 2.0})
    (auto,) = find_runs(root)
    assert auto.kind == "volume" and auto.space == SPACE and auto.dataset == deriv.resolve()
    (minimal,) = find_runs(root, prefer_raw=True)
    assert minimal.kind == "raw" and minimal.path == (func / "sub-01_task-rest_bold.nii.gz").resolve()


def test_load_filters_both_forms(tmp_path):
    assert load_filters(None) == {}
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"bold": {"session": "1", "task": ["rest", "motor"]}, "t1w": {"datatype": "anat"}}))
    assert load_filters(nested) == {"session": "1", "task": ["rest", "motor"]}
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"session": "1", "run": None}))
    assert load_filters(str(flat)) == {"session": "1", "run": None}
    roi = tmp_path / "roi.json"
    roi.write_text(json.dumps({"timeseries": {"atlas": "CC200"}}))
    assert load_filters(roi) == {"atlas": "CC200"}
    bad = tmp_path / "bad.json"
    bad.write_text("{session: 1")
    with pytest.raises(UsageError, match="not valid JSON"):
        load_filters(bad)
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    with pytest.raises(UsageError, match="JSON object"):
        load_filters(arr)
    with pytest.raises(MissingInputError, match="not found"):
        load_filters(tmp_path / "missing.json")


def test_read_sidecar_inheritance(tmp_path):
    root = tmp_path / "ds"
    func = root / "sub-01" / "ses-1" / "func"
    func.mkdir(parents=True)
    bold = func / "sub-01_ses-1_task-rest_run-1_bold.nii.gz"
    bold.write_bytes(b"")
    _write_json(root / "task-rest_bold.json", {"RepetitionTime": 3.0, "TaskName": "rest", "EchoTime": 0.03})
    _write_json(root / "task-motor_bold.json", {"RepetitionTime": 9.0, "TaskName": "motor"})  # other task
    _write_json(root / "task-rest_events.json", {"RepetitionTime": 8.0})  # other suffix
    assert read_sidecar(bold, root) == {"RepetitionTime": 3.0, "TaskName": "rest", "EchoTime": 0.03}

    _write_json(root / "sub-01" / "sub-01_task-rest_bold.json", {"EchoTime": 0.025})
    _write_json(func / "sub-01_ses-1_task-rest_run-1_bold.json", {"RepetitionTime": 2.0})
    _write_json(func / "sub-01_ses-1_task-rest_run-2_bold.json", {"RepetitionTime": 7.0})  # other run
    meta = read_sidecar(bold, root)
    assert meta == {"RepetitionTime": 2.0, "TaskName": "rest", "EchoTime": 0.025}

    (func / "sub-01_ses-1_task-rest_run-1_bold.json").write_text("{\"RepetitionTime\": 2.0,")
    with pytest.raises(DataError, match="malformed JSON") as exc:
        read_sidecar(bold, root)
    assert "sub-01_ses-1_task-rest_run-1_bold.json" in str(exc.value) and "Fix" in str(exc.value)


def test_malformed_sidecar_is_kept_per_run(fmriprep, tmp_path):
    ds = shutil.copytree(fmriprep, tmp_path / "ds")
    bad = ds / "sub-01" / "ses-2" / "func" / f"sub-01_ses-2_task-rest_space-{SPACE}_desc-preproc_bold.json"
    bad.write_text("{not json")
    runs = {r.run_id: r for r in find_runs(ds)}
    assert len(runs) == 4
    assert "malformed JSON" in runs["sub-01_ses-2_task-rest"].metadata_error
    assert runs["sub-01_ses-2_task-rest"].metadata == {}
    assert all(r.metadata_error is None for k, r in runs.items() if k != "sub-01_ses-2_task-rest")

"""Group level with --label: bad label tables end with one line naming the table and the fix, the
documented exit code, no traceback, no partial label outputs; the QC table is still written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from conftest import assert_no_partial_files, run_cli

KW = {"n_subjects": 4, "n_volumes": 30}


@pytest.fixture(scope="module")
def processed(datasets, tmp_path_factory) -> Path:
    """Participant-level outputs of a four-participant dataset (computed once for the module)."""
    out = tmp_path_factory.mktemp("group") / "out"
    res = run_cli(datasets.template(**KW), out, "participant")
    assert res.code == 0, res.stderr
    return out


@pytest.fixture()
def setup(datasets, processed, tmp_path, guard):
    src = datasets.copy(tmp_path / "in", **KW)
    out = tmp_path / "out"
    shutil.copytree(processed, out)
    return src, out


def labels_file(tmp_path: Path, rows: list[tuple]) -> Path:
    (tmp_path / "labels").mkdir()
    p = tmp_path / "labels" / "labels.tsv"
    pd.DataFrame(rows, columns=["participant_id", "diagnosis", "age"]).to_csv(p, sep="\t", index=False)
    return p


CASES = {
    "duplicate-ids": (65, "duplicate participant_id 02", "keep one row per participant"),
    "one-class": (65, "has one class only ('TD')", "at least two classes"),
    "non-numeric-regression": (65, "regression target 'age' has non-numeric values ['young']", "--task-type classification"),
    "label-column-absent": (64, "label column 'handedness' is not in the table", "pass --label with one of those columns"),
    "fewer-participants-than-folds": (65, "4 labelled participants for 5 folds", "lower --folds"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_labels(setup, tmp_path, guard, case):
    src, out = setup
    table = src / "participants.tsv"
    args = ["--label", "diagnosis"]
    if case == "duplicate-ids":
        df = pd.read_csv(table, sep="\t", dtype=str)
        pd.concat([df, df.iloc[[1]]]).to_csv(table, sep="\t", index=False)
    elif case == "one-class":
        table = labels_file(tmp_path, [(f"sub-0{i}", "TD", 20 + i) for i in range(1, 5)])
        args += ["--labels-file", table]
    elif case == "non-numeric-regression":
        table = labels_file(tmp_path, [(f"sub-0{i}", "TD", "young" if i == 2 else 20 + i) for i in range(1, 5)])
        args = ["--label", "age", "--task-type", "regression", "--labels-file", table, "--folds", "2"]
    elif case == "label-column-absent":
        args = ["--label", "handedness"]
    else:
        args += ["--folds", "5"]
    guard.protect(src)
    if table != src / "participants.tsv":
        guard.protect(table.parent)
    before = sorted(p.name for p in (out / "group").glob("*")) if (out / "group").exists() else []
    res = run_cli(src, out, "group", *args)
    code, what, fix = CASES[case]
    assert res.code == code, res.stderr
    assert "Traceback" not in res.stderr
    line = res.line_with(what)
    assert line.startswith(f"bids_fmrilm: error: {table}: ") and fix in line.split(". Fix: ")[1], line
    assert before == []
    assert sorted(p.name for p in (out / "group").glob("*")) == ["qc_runs.json", "qc_runs.tsv"]
    assert len(pd.read_csv(out / "group" / "qc_runs.tsv", sep="\t")) == 4
    assert_no_partial_files(out)
    if case == "label-column-absent":
        res = run_cli(src, out, "group", *args, "--debug")
        assert res.code == code and "Traceback (most recent call last)" in res.stderr

"""The BIDS-App end to end: command line, participant and group levels, outputs, re-runs."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bids_fmrilm import __version__

from conftest import (
    VALIDATOR,
    assert_no_partial_files,
    run_cli,
    shared_path,
    timeseries_files,
    tree_hashes,
    tree_mtimes,
)

N_VOLUMES = 40
SPACE = "MNI152NLin6Asym"
CONFOUNDS = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z",
             *[f"{c}_derivative1" for c in ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")],
             "white_matter", "csf"]
ALL_RUNS = ["sub-01_ses-1_task-rest", "sub-01_ses-2_task-rest", "sub-02_ses-1_task-rest",
            "sub-03_ses-1_task-motor", "sub-03_ses-1_task-rest"]


def run_ids(out: Path) -> list[str]:
    """Run ids (source entities) of the time series written under ``out``."""
    return sorted(re.sub(r"_space-[^_]+", "", p.name.split("_atlas-")[0]) for p in timeseries_files(out))


def summary_counts(res) -> tuple[int, int, int]:
    m = re.search(r"bids_fmrilm: (\d+) done, (\d+) skipped, (\d+) failed", res.stderr)
    assert m, res.stderr
    return tuple(int(x) for x in m.groups())


def output_hashes(out: Path) -> dict[str, str]:
    """Hashes of what a participant run computes (the per-run files and the ROI table; not the report)."""
    return {k: v for k, v in tree_hashes(out).items()
            if (k.startswith("sub-") or k.startswith("atlas-")) and "/figures/" not in k and not k.endswith(".html")}


def report_hashes(out: Path) -> dict[str, str]:
    """Hashes of the participant reports and their figures."""
    return {k: v for k, v in tree_hashes(out).items()
            if not k.startswith("group/") and ("/figures/" in k or k.endswith(".html"))}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def sim(datasets, work) -> dict:
    """sub-01 with sessions 1 and 2; sub-02 with session 1; sub-03 with session 1, tasks rest and motor."""
    root = datasets.copy(work / "input", n_subjects=3, sessions=("1", "2"))
    shutil.rmtree(root / "sub-02" / "ses-2")
    shutil.rmtree(root / "sub-03" / "ses-2")
    func = root / "sub-03" / "ses-1" / "func"
    for f in sorted(func.iterdir()):
        if "task-rest" in f.name:
            dest = func / f.name.replace("task-rest", "task-motor")
            if f.suffix == ".json":
                meta = json.loads(f.read_text())
                dest.write_text(json.dumps({**meta, "TaskName": "motor"}))
            else:
                shutil.copy(f, dest)
    return {"root": root, "hashes": tree_hashes(root)}


@pytest.fixture(scope="module")
def first(sim, work) -> dict:
    """The participant level over the whole simulated dataset."""
    out = work / "out_a"
    res = run_cli(sim["root"], out, "participant")
    return {"out": out, "res": res, "mtimes": tree_mtimes(out), "hashes": output_hashes(out)}


@pytest.fixture(scope="module")
def grouped(sim, first) -> dict:
    res = run_cli(sim["root"], first["out"], "group")
    return {"out": first["out"], "res": res}


def test_version():
    res = run_cli("--version")
    assert res.code == 0
    assert res.stdout == f"bids_fmrilm, version {__version__}\n"
    assert run_cli("-v").stdout == res.stdout


def test_help_lists_flags():
    res = run_cli("--help")
    assert res.code == 0
    for flag in ("BIDS_DIR", "OUTPUT_DIR", "ANALYSIS_LEVEL", "--participant-label", "--session-label", "--task",
                 "--bids-filter-file", "--derivatives", "--atlas", "--target-tr", "--model", "--device",
                 "--quantization", "--work-dir", "--nprocs", "--skip-bids-validation", "--seed", "--force",
                 "--label", "--debug", "--version", "participant|group", "Exit codes"):
        assert flag in res.stdout, flag


def test_usage_errors_exit_64(sim, work):
    res = run_cli(sim["root"], work / "o", "subject")
    assert res.code == 64 and "Traceback" not in res.stderr
    res = run_cli(sim["root"], work / "o", "participant", "--nprocs", "0")
    assert res.code == 64
    assert not (work / "o").exists()
    res = run_cli(sim["root"], work / "o", "participant", "--model", str(work / "no-model"))
    assert res.code == 66 and "Fix" in res.stderr and "no-model" in res.stderr
    assert not (work / "o").exists()


def test_participant_outputs(sim, first):
    out, res = first["out"], first["res"]
    assert res.code == 0, res.stderr
    assert summary_counts(res) == (5, 0, 0)
    assert "Traceback" not in res.stderr
    assert run_ids(out) == ALL_RUNS
    assert_no_partial_files(out)
    assert not list((out / "logs").glob("*_crash.txt"))
    rois = pd.read_csv(out / "atlas-Seitzman300_dseg.tsv", sep="\t")
    assert list(rois.columns) == ["index", "name", "network", "x", "y", "z"] and len(rois) == 300
    for tsv in timeseries_files(out):
        assert f"_space-{SPACE}_atlas-Seitzman300_timeseries.tsv.gz" in tsv.name
        df = pd.read_csv(tsv, sep="\t", na_values=["n/a"])
        assert df.shape == (N_VOLUMES - 1, 300)  # the non-steady-state first volume is dropped
        assert list(df.columns) == rois["name"].tolist()
        meta = json.loads(tsv.with_name(tsv.name.replace(".tsv.gz", ".json")).read_text())
        assert meta["RepetitionTime"] == 2.0
        assert meta["SourceRepetitionTime"] == 2.0
        assert meta["Confounds"] == CONFOUNDS
        assert meta["SourceVolumes"] == N_VOLUMES
        assert meta["DroppedNonSteadyVolumes"] == 1
        assert meta["Volumes"] == N_VOLUMES - 1
        assert meta["Atlas"] == "Seitzman300" and meta["ROITable"] == "atlas-Seitzman300_dseg.tsv"
        assert re.fullmatch(r"[0-9a-f]{12}", meta["SettingsHash"])
        assert meta["MeanFramewiseDisplacement"] > 0
        assert meta["Sources"][0].endswith(tsv.name.split("_atlas-")[0] + "_desc-preproc_bold.nii.gz")
        # ROIs without voxels are n/a columns, every other column is a finite, cleaned series
        empty = set(meta["ROIsWithoutVoxels"]) | set(meta["ROIsWithoutSignal"])
        assert set(df.columns[df.isna().all()]) == empty
        assert len(empty) < 30
        vals = df.drop(columns=sorted(empty)).to_numpy()
        assert np.isfinite(vals).all()
        assert (vals.std(axis=0) > 0).all()
        # the simulated network structure survives: regions of one network correlate, others do not
        kept = df.drop(columns=sorted(empty))
        net = rois.set_index("name").loc[kept.columns, "network"].to_numpy()
        corr = np.corrcoef(kept.to_numpy().T)
        same = (net[:, None] == net[None]) & ~np.eye(len(net), dtype=bool)
        assert corr[same].mean() > 0.2 > 0.05 > abs(corr[net[:, None] != net[None]].mean())
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "bids_fmrilm" and desc["GeneratedBy"][0]["Version"] == __version__
    assert desc["SourceDatasets"][0]["URL"] == sim["root"].resolve().as_uri()
    ignore = (out / ".bidsignore").read_text().splitlines()
    assert "*_timeseries.tsv.gz" in ignore and "logs" in ignore
    summaries = list((out / "logs").glob("participant_*_summary.tsv"))
    assert len(summaries) == 1
    summary = pd.read_csv(summaries[0], sep="\t")
    assert summary["run"].tolist() == ALL_RUNS and set(summary["status"]) == {"done"}
    assert (summary["exit_code"] == 0).all()


def test_group_qc_table(grouped):
    out, res = grouped["out"], grouped["res"]
    assert res.code == 0, res.stderr
    qc = pd.read_csv(out / "group" / "qc_runs.tsv", sep="\t", dtype={"participant_id": str})
    assert len(qc) == 5
    assert sorted(qc["run"]) == ALL_RUNS
    assert qc["participant_id"].tolist() == ["sub-01", "sub-01", "sub-02", "sub-03", "sub-03"]
    assert (qc["volumes"] == N_VOLUMES - 1).all()
    assert (qc["source_volumes"] == N_VOLUMES).all()
    assert (qc["repetition_time"] == 2.0).all() and (qc["source_repetition_time"] == 2.0).all()
    assert (qc["n_rois"] == 300).all()
    assert (qc["mean_fd"] > 0).all()
    for _, row in qc.iterrows():
        assert (out / row["file"]).is_file()
        meta = json.loads((out / row["file"].replace(".tsv.gz", ".json")).read_text())
        assert row["rois_without_voxels"] == len(meta["ROIsWithoutVoxels"])
        assert row["mean_fd"] == pytest.approx(meta["MeanFramewiseDisplacement"], rel=1e-5)
    summary = json.loads((out / "group" / "qc_runs.json").read_text())["Summary"]
    assert summary["Runs"] == 5 and summary["Participants"] == 3
    assert summary["RepetitionTimes"] == [2.0] and summary["MedianVolumes"] == N_VOLUMES - 1
    assert summary["MeanFD"] == pytest.approx(qc["mean_fd"].mean(), rel=1e-5)


def test_group_label_selection(sim, grouped, work):
    out = work / "out_group_sel"
    shutil.copytree(grouped["out"], out)
    res = run_cli(sim["root"], out, "group", "--participant-label", "sub-03")
    assert res.code == 0, res.stderr
    qc = pd.read_csv(out / "group" / "qc_runs.tsv", sep="\t")
    assert sorted(qc["run"]) == ["sub-03_ses-1_task-motor", "sub-03_ses-1_task-rest"]


def test_group_without_participant_outputs(sim, work):
    res = run_cli(sim["root"], work / "no_outputs", "group")
    assert res.code == 66
    assert "Fix" in res.line_with(str(work / "no_outputs"))


def validator_errors(root: Path) -> list[dict]:
    proc = subprocess.run([str(VALIDATOR), str(root), "--format", "json"], capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stdout)
    return [i for i in report["issues"]["issues"] if i.get("severity") == "error"]


def test_participant_output_passes_bids_validator(first, work):
    out = work / "validate_participant"
    shutil.copytree(first["out"], out, ignore=shutil.ignore_patterns("group"))  # as the participant level left it
    assert (out / "logs").is_dir() and (out / ".bids_fmrilm.lock").exists()
    assert validator_errors(out) == []


def test_group_output_passes_bids_validator(grouped):
    assert validator_errors(grouped["out"]) == []


def test_output_reindexes_with_pybids(first):
    from bids.layout import BIDSLayout

    layout = BIDSLayout(first["out"], validate=False, is_derivative=True)
    assert layout.get_subjects() == ["01", "02", "03"]
    files = layout.get(suffix="timeseries", extension=".tsv.gz")
    assert sorted(Path(f.path) for f in files) == timeseries_files(first["out"])
    assert {f.entities["space"] for f in files} == {SPACE}
    assert {f.entities["atlas"] for f in files} == {"Seitzman300"}
    assert sorted(layout.get_sessions()) == ["1", "2"]
    assert sorted(layout.get_tasks()) == ["motor", "rest"]
    sidecar = layout.get(subject="02", suffix="timeseries", extension=".json")
    assert len(sidecar) == 1 and sidecar[0].get_dict()["RepetitionTime"] == 2.0


def test_rerun_skips_complete_runs(sim, first, monkeypatch):
    import bids_fmrilm.levels.participant as participant

    def no_recompute(run, settings):
        raise AssertionError(f"{run.run_id} recomputed although complete")

    monkeypatch.setattr(participant, "extract_signals", no_recompute)  # a skip reads no image
    res = run_cli(sim["root"], first["out"], "participant")
    assert res.code == 0, res.stderr
    assert summary_counts(res) == (0, 5, 0)
    assert tree_mtimes(first["out"]) == first["mtimes"]
    assert output_hashes(first["out"]) == first["hashes"]


def test_force_recomputes(sim, first, work):
    out = work / "out_force"
    shutil.copytree(first["out"], out)  # copies keep the mtimes
    before = tree_mtimes(out)
    assert before == first["mtimes"]
    res = run_cli(sim["root"], out, "participant", "--force", "--participant-label", "02")
    assert res.code == 0, res.stderr
    assert summary_counts(res) == (1, 0, 0)
    after = tree_mtimes(out)
    changed = sorted(k for k in after if after[k] != before[k])
    # the report's figures are rewritten only when their content changes (same data: unchanged)
    assert changed == sorted(k for k in before if k.startswith("sub-02/") and "/figures/" not in k)
    assert len(changed) == 3  # time series TSV + JSON, descriptors JSON
    assert output_hashes(out) == first["hashes"]  # recomputed, same bytes


def test_changed_settings_recompute(sim, first, work):
    out = work / "out_settings"
    shutil.copytree(first["out"], out)
    res = run_cli(sim["root"], out, "participant", "--participant-label", "01", "--target-tr", "1.5")
    assert res.code == 0, res.stderr
    assert summary_counts(res) == (2, 0, 0)
    meta = json.loads(next(out.glob("sub-01/ses-1/func/*_timeseries.json")).read_text())
    assert meta["RepetitionTime"] == 1.5 and meta["Volumes"] == math.ceil((N_VOLUMES - 1) * 2.0 / 1.5)


def test_same_seed_outputs_byte_identical(sim, first, work):
    out = work / "out_b"
    res = run_cli(sim["root"], out, "participant", "--seed", "0")
    assert res.code == 0, res.stderr
    assert output_hashes(out) == first["hashes"]
    assert len(first["hashes"]) == 3 * len(ALL_RUNS) + 1  # series TSV + JSON and descriptors per run, + ROI table
    # report: carpet + FC figure per run and one page per participant, byte-identical too
    rep = report_hashes(out)
    assert rep == report_hashes(first["out"])
    assert len([k for k in rep if "/figures/" in k]) == 2 * len(ALL_RUNS)
    assert sorted(k for k in rep if k.endswith(".html")) == ["sub-01.html", "sub-02.html", "sub-03.html"]


def test_nprocs_2_identical(sim, first, work):
    out = work / "out_c"
    res = run_cli(sim["root"], out, "participant", "--nprocs", "2")
    assert res.code == 0, res.stderr
    assert summary_counts(res) == (5, 0, 0)
    assert output_hashes(out) == first["hashes"]
    assert_no_partial_files(out)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--participant-label", "01", "02"], ALL_RUNS[:3]),
        (["--participant-label", "sub-03"], ALL_RUNS[3:]),
        (["--participant_label", "sub-01", "--participant-label", "03"], [ALL_RUNS[i] for i in (0, 1, 3, 4)]),
        (["--session-label", "2"], ["sub-01_ses-2_task-rest"]),
        (["--session-label", "ses-1", "--participant-label", "01"], ["sub-01_ses-1_task-rest"]),
        (["--task", "motor"], ["sub-03_ses-1_task-motor"]),
    ],
    ids=["labels-space-separated", "label-sub-prefix", "labels-repeated", "session", "session-prefix", "task"],
)
def test_selection(sim, first, work, args, expected):
    out = work / ("sel_" + "_".join(a.strip("-") for a in args))
    res = run_cli(sim["root"], out, "participant", *args)
    assert res.code == 0, res.stderr
    assert run_ids(out) == expected
    selected = {k: v for k, v in first["hashes"].items()
                if k.startswith("atlas-") or any(Path(k).name.startswith(r + "_") for r in expected)}
    assert len(selected) == 3 * len(expected) + 1
    assert output_hashes(out) == selected  # the same bytes as when all runs are processed


def test_label_before_positionals(sim, work):
    out = work / "sel_before"
    res = run_cli("--participant-label", "02", sim["root"], out, "participant")
    assert res.code == 0, res.stderr
    assert run_ids(out) == ["sub-02_ses-1_task-rest"]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"bold": {"subject": "01", "session": "1"}}, ["sub-01_ses-1_task-rest"]),
        ({"session": "1", "task": ["motor"]}, ["sub-03_ses-1_task-motor"]),
    ],
    ids=["fmriprep-form", "flat-form"],
)
def test_bids_filter_file(sim, work, filters, expected, tmp_path):
    ff = tmp_path / "filters.json"
    ff.write_text(json.dumps(filters))
    out = work / f"filter_{len(expected)}_{expected[0]}"
    res = run_cli(sim["root"], out, "participant", "--bids-filter-file", ff)
    assert res.code == 0, res.stderr
    assert run_ids(out) == expected


def test_nipy_real_run_schaefer400tian(work):
    nipy = shared_path("data", "bids-nipy-functional")
    atlases = shared_path("atlases")
    before = tree_hashes(nipy)
    out = work / "nipy"
    res = run_cli(nipy, out, "participant", "--atlas", "schaefer400tian", "--skip-bids-validation",
                  env={"BIDS_FMRILM_ATLAS_DIR": str(atlases)})
    assert res.code == 0, res.stderr
    (tsv,) = timeseries_files(out)
    assert tsv.name == "sub-01_task-rest_atlas-Schaefer400Tian_timeseries.tsv.gz"
    meta = json.loads(tsv.with_name(tsv.name.replace(".tsv.gz", ".json")).read_text())
    assert meta["RepetitionTime"] == 2.0 and meta["SourceVolumes"] == 20 and meta["Volumes"] == 20
    assert meta["Confounds"] == []
    n_empty = len(meta["ROIsWithoutVoxels"])
    assert 300 < n_empty < 450  # three slices: most of the 450 regions get no voxel, some do
    df = pd.read_csv(tsv, sep="\t", na_values=["n/a"])
    assert df.shape == (20, 450)
    covered = [c for c in df.columns if c not in set(meta["ROIsWithoutVoxels"]) | set(meta["ROIsWithoutSignal"])]
    assert len(covered) == 450 - n_empty - len(meta["ROIsWithoutSignal"]) > 0
    assert np.isfinite(df[covered].to_numpy()).all()
    assert df.drop(columns=covered).isna().all().all()
    assert tree_hashes(nipy) == before


def test_abide_20_participants(work):
    abide = shared_path("data", "abide-cc200")
    atlases = shared_path("atlases")
    subs = sorted(p.name for p in abide.glob("sub-*"))[:20]
    assert len(subs) == 20
    out = work / "abide"
    env = {"BIDS_FMRILM_ATLAS_DIR": str(atlases)}
    res = run_cli(abide, out, "participant", "--participant-label", *subs, env=env)
    assert res.code == 0, res.stderr
    assert summary_counts(res) == (20, 0, 0)
    files = timeseries_files(out)
    assert [p.name.split("_")[0] for p in files] == subs
    for tsv in files:
        meta = json.loads(tsv.with_name(tsv.name.replace(".tsv.gz", ".json")).read_text())
        src = json.loads((abide / meta["Sources"][0].split(":", 2)[2]).with_suffix("").with_suffix(".json").read_text())
        assert meta["SourceRepetitionTime"] == src["RepetitionTime"]
        assert meta["RepetitionTime"] == 2.0
        assert meta["Volumes"] == math.ceil(meta["SourceVolumes"] * src["RepetitionTime"] / 2.0)
        df = pd.read_csv(tsv, sep="\t", na_values=["n/a"])
        assert df.shape == (meta["Volumes"], 200)
        flat = set(meta["ROIsWithoutSignal"])
        assert set(df.columns[df.isna().all()]) == flat
    res = run_cli(abide, out, "group", env=env)
    assert res.code == 0, res.stderr
    qc = pd.read_csv(out / "group" / "qc_runs.tsv", sep="\t")
    participants = pd.read_csv(abide / "participants.tsv", sep="\t").set_index("participant_id")
    assert qc["participant_id"].tolist() == subs
    # ROI inputs carry no confounds: mean FD comes from participants.tsv
    assert qc["mean_fd"].to_numpy() == pytest.approx(participants.loc[subs, "fd_mean"].to_numpy(), rel=1e-4)


def test_input_dataset_unchanged(sim, first, grouped):
    """Runs last in this module: nothing above wrote into the input dataset."""
    assert tree_hashes(sim["root"]) == sim["hashes"]

"""Faults: a killed run, two processes sharing an output folder, a read-only output, a full disk.
Nothing is lost: a re-run completes the outputs byte-identically, no temporary or half-written file
survives, and the input dataset is never written to."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CLI_EXE, WIDE, assert_no_partial_files, check_refused, run_cli, timeseries_files

from .conftest import check_run_failed, done_runs, summary

SIX_RUNS = {"n_subjects": 3, "sessions": ("1", "2"), "n_volumes": 30}
ALL_SIX = sorted(f"sub-0{s}_ses-{ses}_task-rest" for s in (1, 2, 3) for ses in (1, 2))


def output_hashes(out: Path) -> dict[str, str]:
    """Hashes of the derivatives (not the per-invocation logs and the lock file)."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()
            and p.relative_to(out).parts[0] != "logs" and p.name != ".bids_fmrilm.lock"}


def popen(*args) -> subprocess.Popen:
    return subprocess.Popen([str(CLI_EXE), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **WIDE})


@pytest.fixture()
def six(datasets, tmp_path, guard) -> Path:
    return guard.protect(datasets.copy(tmp_path / "in", **SIX_RUNS))


@pytest.mark.timeout(300)
def test_kill_9_then_rerun_is_byte_identical(six, tmp_path):
    from bids_fmrilm.bids.writer import temp_prefix

    ref = tmp_path / "ref"
    res = run_cli(six, ref, "participant")
    assert res.code == 0, res.stderr
    assert done_runs(ref) == ALL_SIX

    out = tmp_path / "out"
    proc = popen(six, out, "participant", "--nprocs", "1")
    try:
        deadline = time.time() + 240
        while not list(out.glob("sub-*/**/func/*_timeseries.json")):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "no output appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(list(out.glob("sub-*/**/func/*_timeseries.json"))) < 6, "the run ended before it could be killed"
    # what a kill in the middle of a write leaves: a temporary file named for the dead process
    victim = out / "sub-03" / "ses-2" / "func" / "sub-03_ses-2_task-rest_space-MNI152NLin6Asym_atlas-Seitzman300_timeseries.tsv.gz"
    victim.parent.mkdir(parents=True, exist_ok=True)
    stale = victim.parent / f"{temp_prefix(victim, proc.pid)}abcd1234.tmp"
    stale.write_bytes(b"half a file")
    # ... and a temporary file of a process that still runs (this one): it must be left alone
    live = out / f"{temp_prefix(out / 'x.json')}live0000.tmp"
    live.write_bytes(b"being written")
    n_done_before = len(list(out.glob("sub-*/**/func/*_timeseries.json")))

    res = run_cli(six, out, "participant", "--nprocs", "1")  # the re-run (in this live process)
    assert res.code == 0, res.stderr
    assert "Traceback" not in res.stderr
    removed = re.search(r"removed (\d+) temporary files left by an interrupted run", res.stderr)
    assert removed and int(removed.group(1)) >= 1, res.stderr  # ours, and any the kill left mid-write
    assert not stale.exists() and live.exists()
    live.unlink()
    assert_no_partial_files(out)
    assert output_hashes(out) == output_hashes(ref)
    tab = summary(out)
    assert sorted(tab.index) == ALL_SIX
    assert (tab["status"] == "skipped").sum() == n_done_before
    assert set(tab["status"]) <= {"done", "skipped"}


@pytest.mark.timeout(300)
def test_two_processes_share_one_output(ds, tmp_path, guard):
    from bids_fmrilm.bids.writer import BIDSIGNORE

    src = guard.protect(ds)  # two participants, one run each
    out = tmp_path / "out"
    procs = [popen(src, out, "participant", "--participant-label", lab) for lab in ("01", "02")]
    results = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert "Traceback" not in err
    assert_no_partial_files(out)
    assert done_runs(out) == ["sub-01_task-rest", "sub-02_task-rest"]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["BIDSVersion"]
    assert [g["Name"] for g in desc["GeneratedBy"]] == ["bids_fmrilm"]
    assert desc["SourceDatasets"] == [{"URL": src.resolve().as_uri()}]
    assert desc["DatasetLinks"] == {"raw": src.resolve().as_uri()}
    lines = (out / ".bidsignore").read_text().splitlines()
    assert len(lines) == len(set(lines)) and set(lines) == set(BIDSIGNORE)
    assert len(list((out / "logs").glob("participant_*_summary.tsv"))) == 2
    assert not list((out / "logs").glob("*_crash.txt"))


def test_read_only_output(ds, tmp_path, guard, tmpfs):
    guard.protect(ds)
    mnt = tmpfs(64, read_only=True)
    if mnt is None:  # no mount: /proc refuses new folders even to root
        targets = [Path("/proc/bids_fmrilm_out")]
        if os.path.exists(targets[0]):
            pytest.skip("no read-only mount and /proc/bids_fmrilm_out exists")
    else:
        targets = [mnt / "deriv", mnt]
    for out in targets:
        res = run_cli(ds, out, "participant")
        line = check_refused(res, out, 73, str(out))
        assert "writable OUTPUT_DIR" in line
        assert not out.exists() or not any(out.iterdir())
    check_res = run_cli(ds, targets[0], "participant", "--debug")
    assert check_res.code == 73 and "Traceback (most recent call last)" in check_res.stderr


def test_disk_full(ds, tmp_path, guard, tmpfs, monkeypatch):
    """The second run does not fit: exit 74 'no space left', its temporary and half-written files removed."""
    guard.protect(ds)
    mnt = tmpfs(150)
    if mnt is not None:
        out = mnt / "deriv"
    else:  # no mount: the writer's fsync reports ENOSPC for the second run's descriptors
        import bids_fmrilm.bids.writer as writer

        real_fsync = os.fsync

        def fsync(fd):
            if "sub-02" in os.readlink(f"/proc/self/fd/{fd}") and "features" in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_fsync(fd)

        monkeypatch.setattr(writer.os, "fsync", fsync)
        out = tmp_path / "deriv"
    res = run_cli(ds, out, "participant")
    line = check_run_failed(res, out, 74, str(out / "sub-02"), failed="sub-02_task-rest", good=("sub-01_task-rest",))
    assert "no space left on device" in line and "free disk space" in line
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not list(out.glob("sub-02/**/*.*"))  # nothing of the failed run: no TSV, no descriptors, no JSON


def test_stale_temp_files_rules(tmp_path):
    """Dead process of this host or older than a day: removed; a live process's or another host's recent one: kept."""
    from bids_fmrilm.bids.writer import _HOST, remove_stale_temp_files, temp_prefix

    dead = subprocess.Popen(["true"])
    dead.wait()
    d = tmp_path / "out" / "sub-01" / "func"
    d.mkdir(parents=True)
    target = d / "x_timeseries.tsv.gz"
    files = {
        "dead": d / f"{temp_prefix(target, dead.pid)}aaaa1111.tmp",
        "live": d / f"{temp_prefix(target)}bbbb2222.tmp",
        "other_host": d / f".x_timeseries.tsv.gz.{_HOST}zz.{dead.pid}.cccc3333.tmp",
        "old_other_host": d / f".x_timeseries.tsv.gz.{_HOST}zz.{dead.pid}.dddd4444.tmp",
        "old_unnamed": d / ".x_timeseries.tsv.gz.eeee5555.tmp",
        "output": target,
    }
    for p in files.values():
        p.write_bytes(b"x")
    two_days_ago = time.time() - 2 * 86400
    for k in ("old_other_host", "old_unnamed"):
        os.utime(files[k], (two_days_ago, two_days_ago))
    removed = remove_stale_temp_files(tmp_path / "out")
    assert sorted(removed) == sorted(files[k] for k in ("dead", "old_other_host", "old_unnamed"))
    assert all(files[k].exists() for k in ("live", "other_host", "output"))

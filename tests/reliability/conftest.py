"""Helpers of the reliability tests: input-dataset guards, clean-failure checks, temporary mounts.

Every test hashes the input dataset before and after (``guard``): the input is never written to,
whatever happens to the run.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from conftest import assert_no_partial_files, check_refused, run_cli, timeseries_files  # tests/conftest.py

SPACE = "MNI152NLin6Asym"
N_VOLUMES = 30


def input_hashes(root: Path) -> dict[bytes, str]:
    """Content of every entry under ``root``: file hashes, link targets, folders (byte paths, links not followed)."""
    out: dict[bytes, str] = {}
    broot = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, broot)
            if os.path.islink(p):
                out[rel] = "link:" + os.fsdecode(os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = "dir"
            else:
                with open(p, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


class InputGuard:
    """Hashes input datasets when protected and asserts they are unchanged (also at teardown)."""

    def __init__(self):
        self.roots: dict[Path, dict[bytes, str]] = {}

    def protect(self, root: Path) -> Path:
        self.roots[Path(root)] = input_hashes(root)
        return Path(root)

    def check(self) -> None:
        for root, before in self.roots.items():
            after = input_hashes(root)
            assert after == before, f"input dataset {root} changed: " + ", ".join(
                os.fsdecode(k) for k in sorted(set(after) ^ set(before) | {k for k in before if after.get(k) != before[k]}))


@pytest.fixture()
def guard():
    g = InputGuard()
    yield g
    g.check()


@pytest.fixture()
def ds(datasets, tmp_path, guard) -> Path:
    """A fresh two-participant fMRIPrep-style dataset; the test breaks sub-01 then calls ``guard.protect``."""
    return datasets.copy(tmp_path / "in", n_subjects=2, n_volumes=N_VOLUMES)


def func(root: Path, sub: str = "01") -> Path:
    return root / f"sub-{sub}" / "func"


def bold(root: Path, sub: str = "01") -> Path:
    return func(root, sub) / f"sub-{sub}_task-rest_space-{SPACE}_desc-preproc_bold.nii.gz"


def sidecar(root: Path, sub: str = "01") -> Path:
    return func(root, sub) / f"sub-{sub}_task-rest_space-{SPACE}_desc-preproc_bold.json"


def confounds(root: Path, sub: str = "01") -> Path:
    return func(root, sub) / f"sub-{sub}_task-rest_desc-confounds_timeseries.tsv"


def summary(out: Path) -> pd.DataFrame:
    """The newest ``logs/participant_*_summary.tsv``, indexed by run."""
    files = sorted(Path(out).glob("logs/participant_*_summary.tsv"), key=lambda p: p.stat().st_mtime_ns)
    assert files, f"no summary table under {out}/logs"
    return pd.read_csv(files[-1], sep="\t", keep_default_na=False).set_index("run")


def done_runs(out: Path) -> list[str]:
    return sorted(p.name.split("_space-")[0].split("_atlas-")[0] for p in timeseries_files(out))


def check_run_failed(res, out: Path, code: int, where: str, failed: str = "sub-01_task-rest",
                     good: tuple[str, ...] = ("sub-02_task-rest",), hint: str = "Fix") -> str:
    """Run ``failed`` failed with ``code`` and one line naming ``where`` and a fix; the good runs were done."""
    assert res.code == code, res.stderr
    assert "Traceback" not in res.stderr
    line = res.line_with(where)
    assert hint in line, line
    assert line.startswith("ERROR "), line
    assert_no_partial_files(out)
    assert done_runs(out) == sorted(good)
    assert not [p for p in timeseries_files(out) if p.name.startswith(failed + "_")]
    crash = list((out / "logs").glob(f"{failed}_*_crash.txt"))
    assert len(crash) == 1, crash
    assert where in crash[0].read_text()
    tab = summary(out)
    assert tab.loc[failed, "status"] == "failed"
    assert int(tab.loc[failed, "exit_code"]) == code
    assert where in tab.loc[failed, "reason"]
    assert (tab.drop(index=failed)["status"] == "done").all()
    return line


def check_done(res, out: Path, good: tuple[str, ...] = ("sub-01_task-rest", "sub-02_task-rest")) -> None:
    assert res.code == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert_no_partial_files(out)
    assert done_runs(out) == sorted(good)
    assert (summary(out)["status"] == "done").all()


def check_debug_traceback(*args, code: int) -> None:
    """The same call with ``--debug`` exits the same way and shows a traceback."""
    res = run_cli(*args, "--debug")
    assert res.code == code, res.stderr
    assert "Traceback (most recent call last)" in res.stderr


def _mount(args: list[str]) -> bool:
    try:
        return subprocess.run(args, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture()
def tmpfs(tmp_path):
    """``tmpfs(size_kb, read_only=False)``: a small tmpfs mounted on a fresh folder (root only), unmounted after."""
    mounted: list[Path] = []

    def make(size_kb: int, read_only: bool = False) -> Path:
        mnt = tmp_path / f"mnt{len(mounted)}"
        mnt.mkdir()
        opts = f"size={size_kb}k" + (",ro" if read_only else "")
        if os.geteuid() != 0 or not _mount(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)]):
            return None
        mounted.append(mnt)
        return mnt

    yield make
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)

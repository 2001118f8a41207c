"""Shared helpers for the BIDS-App tests: simulated datasets, running the command line, file checks."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BIN = Path(sys.executable).parent
CLI_EXE = BIN / "bids_fmrilm"
VALIDATOR = BIN / "bids-validator-deno"

# rich wraps log lines at the console width (80 when stderr is not a terminal); a wide console
# keeps each message on one line so that tests can find it whole
WIDE = {"COLUMNS": "1000"}

# Tests of the signal and descriptor steps run without the packaged default model (its LLM pass
# would multiply their run time); tests of model outputs pass --model explicitly.
os.environ.setdefault("BIDS_FMRILM_MODEL", "none")


@dataclass
class CliResult:
    code: int
    stderr: str
    stdout: str

    def lines(self) -> list[str]:
        return [ln.rstrip() for ln in self.stderr.splitlines() if ln.strip()]

    def line_with(self, text: str) -> str:
        """The one stderr line that holds ``text`` (fails when none does)."""
        hits = [ln for ln in self.lines() if text in ln]
        assert hits, f"no stderr line contains {text!r}:\n{self.stderr}"
        return hits[0]


@contextlib.contextmanager
def _env(extra: dict[str, str]):
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_cli(*args, env: dict[str, str] | None = None) -> CliResult:
    """Run ``bids_fmrilm`` in this process (as the console script does) and capture its output."""
    from bids_fmrilm.cli import _run, bids_app_command, expand_multi_values

    err, out = io.StringIO(), io.StringIO()
    with _env({**WIDE, **(env or {})}), contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = _run(bids_app_command, expand_multi_values([str(a) for a in args]), "bids_fmrilm")
    return CliResult(code, err.getvalue(), out.getvalue())


def run_cli_subprocess(*args, env: dict[str, str] | None = None, timeout: float = 120) -> CliResult:
    """Run the installed ``bids_fmrilm`` console script."""
    proc = subprocess.run([str(CLI_EXE), *[str(a) for a in args]], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **WIDE, **(env or {})})
    return CliResult(proc.returncode, proc.stderr, proc.stdout)


def shared_path(*parts: str) -> Path:
    """A path under ``../shared``; skips the test when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not available: {p}")
    return p


def tree_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` by relative path."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def tree_mtimes(root: Path, pattern: str = "sub-*/**/*") -> dict[str, int]:
    root = Path(root)
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.glob(pattern)) if p.is_file()}


def timeseries_files(out: Path) -> list[Path]:
    return sorted(Path(out).glob("sub-*/**/func/*_timeseries.tsv.gz"))


def assert_no_partial_files(out: Path) -> None:
    """No temporary files, and every time-series TSV has its JSON (and vice versa)."""
    out = Path(out)
    if not out.exists():
        return
    tmps = [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".part")]
    assert not tmps, f"temporary files left behind: {tmps}"
    for tsv in timeseries_files(out):
        assert tsv.with_name(tsv.name[: -len(".tsv.gz")] + ".json").is_file(), f"TSV without JSON: {tsv}"
    for js in out.glob("sub-*/**/func/*_timeseries.json"):
        assert js.with_name(js.name[: -len(".json")] + ".tsv.gz").is_file(), f"JSON without TSV: {js}"


class DatasetFactory:
    """Simulated fMRIPrep-style datasets, each simulated once per session and copied on demand."""

    def __init__(self, base: Path):
        self.base = base
        self._cache: dict[tuple, Path] = {}

    def template(self, **kw) -> Path:
        from bids_fmrilm.simulate import make_fmriprep_dataset

        kw = {"n_subjects": 2, "n_volumes": 40, "voxel_mm": 8.0, "tr": 2.0, "sessions": (), "seed": 0, **kw}
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kw.items()))
        if key not in self._cache:
            root = self.base / f"sim{len(self._cache)}"
            make_fmriprep_dataset(root, **kw)
            self._cache[key] = root
        return self._cache[key]

    def copy(self, dest: Path, **kw) -> Path:
        """A fresh copy of a simulated dataset at ``dest``."""
        shutil.copytree(self.template(**kw), dest)
        return Path(dest)


@pytest.fixture(scope="session")
def datasets(tmp_path_factory) -> DatasetFactory:
    return DatasetFactory(tmp_path_factory.mktemp("simulated"))


def check_refused(res, out: Path, code: int, where: str, hint: str = "Fix") -> str:
    """The whole call was refused with one line (naming ``where``, with ``hint``) before any output."""
    assert res.code == code, res.stderr
    assert "Traceback" not in res.stderr
    line = res.line_with(where)
    assert line.startswith("bids_fmrilm: error: "), line
    assert hint in line, line
    out = Path(out)
    assert not out.exists() or not any(out.glob("sub-*")), list(out.rglob("*"))
    return line

"""Writing BIDS-Derivatives: BIDS names, atomic files, a shared ``dataset_description.json``.

Every file is written to a temporary name in its destination folder and renamed into place, so a
killed process leaves no half-written output, and a file that exists is complete. Several
participant-level processes may share one output folder: the dataset-level files are written
under an exclusive file lock and merged, never clobbered.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import io
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import __version__
from ..errors import CantCreateError, IOFailure
from .layout import ENTITY_ORDER, Run

CODE_URL = "https://github.com/bids-fmrilm/bids_fmrilm"
BIDSIGNORE = [
    "*_timeseries.tsv.gz",
    "*_timeseries.json",
    "*_features.json",
    "*_features.tsv.gz",
    "*_tokens.tsv.gz",
    "*_tokens.json",
    "*_embedding.tsv.gz",
    "*_embedding.json",
    "*_description.json",
    "*_predictions.tsv",
    "*_predictions.json",
    "*_forecast.tsv.gz",
    "*_forecast.json",
    "*.html",
    # no trailing slash: bids-validator-deno ignores .bidsignore lines ending in "/"
    "figures",
    "group",
    "logs",
    "atlas-*_dseg.tsv",
    ".bids_fmrilm.lock",
]


def _os_error(exc: OSError, path: Path) -> Exception:
    if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return CantCreateError(f"cannot write here ({exc.strerror})", path=path,
                               fix="choose a writable OUTPUT_DIR")
    if exc.errno == errno.ENOSPC:
        return IOFailure("no space left on device", path=path, fix="free disk space or choose another OUTPUT_DIR")
    return IOFailure(f"cannot write ({exc.strerror or exc})", path=path)


_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def temp_prefix(path: Path, pid: int | None = None) -> str:
    """Prefix of the temporary files written for ``path``: ``.<name>.<host>.<pid>.``.

    Host and process id let a later run tell files of a killed process from those of a live one.
    """
    return f".{Path(path).name}.{_HOST}.{os.getpid() if pid is None else pid}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists
        return True
    return True


def remove_stale_temp_files(root: Path, max_age_s: float = 86400.0) -> list[Path]:
    """Remove temporary files (``.*.tmp``) that a killed process left under ``root``.

    A temporary file is stale when the process that wrote it (named in the file name) no longer
    runs on this host, or when it is older than ``max_age_s`` (files of other hosts on shared
    storage, or of older versions). Files of live processes are kept, so several participant-level
    processes can share an output folder.
    """
    removed: list[Path] = []
    now = time.time()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            if not (name.startswith(".") and name.endswith(".tmp")):
                continue
            p = Path(dirpath) / name
            parts = name.split(".")
            try:
                mine = len(parts) >= 5 and parts[-4] == _HOST and parts[-3].isdigit()
                stale = (mine and not _pid_alive(int(parts[-3]))) or now - p.lstat().st_mtime > max_age_s
                if stale:
                    p.unlink()
                    removed.append(p)
            except OSError:
                continue
    return removed


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise _os_error(exc, path) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise _os_error(exc, path) from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; if the block succeeds, make it readable by all and
    swap it onto ``path`` (an existing folder is replaced only once the new one is complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield tmp
        for p in [tmp, *tmp.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.rename(path, old)
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: Path, data: bytes) -> Path:
    """Write bytes atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def write_json(path: Path, obj: Any) -> Path:
    """Write JSON atomically (sorted keys off: readers see fields in a meaningful order).

    NaN and infinite values are written as ``null``: standard JSON has no NaN.
    """
    text = json.dumps(_finite(obj), indent=2, default=_json_default, allow_nan=False) + "\n"
    return write_bytes(path, text.encode("utf-8"))


def _finite(o: Any) -> Any:
    """``o`` with NaN/inf floats (also in numpy arrays and scalars) replaced by None."""
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_finite(v) for v in o]
    if isinstance(o, np.ndarray):
        return _finite(o.tolist())
    if isinstance(o, float | np.floating):
        return float(o) if np.isfinite(o) else None
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def tsv_bytes(df: pd.DataFrame, float_format: str = "%.6g") -> bytes:
    """TSV text of a frame, ``n/a`` for missing values."""
    return df.to_csv(sep="\t", index=False, na_rep="n/a", float_format=float_format).encode("utf-8")


def write_tsv(path: Path, df: pd.DataFrame, float_format: str = "%.6g") -> Path:
    """Write a TSV (gzipped when the name ends in ``.gz``; mtime 0, so equal data give equal bytes)."""
    data = tsv_bytes(df, float_format)
    if str(path).endswith(".gz"):
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
            gz.write(data)
        data = buf.getvalue()
    return write_bytes(path, data)


def read_json(path: Path) -> dict[str, Any] | None:
    """Read a JSON object; None when absent, unreadable or not an object."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # ValueError: JSONDecodeError, UnicodeDecodeError
        return None
    return obj if isinstance(obj, dict) else None


class DerivativesWriter:
    """Names and writes the derivatives of runs under one output folder.

    Parameters
    ----------
    output_dir : path
        Root of the derivatives dataset (created if needed).
    source_dir : path
        The input dataset (recorded in ``SourceDatasets``).
    """

    def __init__(self, output_dir: str | Path, source_dir: str | Path | None = None):
        self.root = Path(output_dir)
        self.source_dir = Path(source_dir) if source_dir else None

    def init_dataset(self, model_id: str | None = None) -> None:
        """Create the folder, ``dataset_description.json`` and ``.bidsignore`` (safe concurrently)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise _os_error(exc, self.root) from None
            # whatever the reason (EROFS, EACCES, ENOENT under /proc ...), OUTPUT_DIR cannot be created
            raise CantCreateError(f"output folder cannot be created ({exc.strerror or exc})", path=self.root,
                                  fix="choose a writable OUTPUT_DIR") from None
        if not os.access(self.root, os.W_OK):
            raise CantCreateError("output folder is not writable", path=self.root, fix="choose a writable OUTPUT_DIR")
        with self._lock():
            desc = read_json(self.root / "dataset_description.json") or {}
            new = {
                "Name": desc.get("Name", "bids_fmrilm derivatives"),
                "BIDSVersion": "1.10.0",
                "DatasetType": "derivative",
                "GeneratedBy": [
                    {
                        "Name": "bids_fmrilm",
                        "Version": __version__,
                        "CodeURL": CODE_URL,
                        **({"Container": {"Type": os.environ["BIDS_FMRILM_CONTAINER"],
                                          "Tag": f"bids_fmrilm:{__version__}"}}
                           if os.environ.get("BIDS_FMRILM_CONTAINER") else {}),
                    }
                ],
            }
            sources = list(desc.get("SourceDatasets", []))
            if self.source_dir is not None:
                entry = {"URL": self.source_dir.resolve().as_uri()}
                if entry not in sources:
                    sources.append(entry)
            if sources:
                new["SourceDatasets"] = sources
                new["DatasetLinks"] = {"raw": sources[0]["URL"]}
            models = sorted(set(desc.get("ModelIDs", [])) | ({model_id} if model_id else set()))
            if models:
                new["ModelIDs"] = models
            if new != desc:
                write_json(self.root / "dataset_description.json", new)
            ignore = self.root / ".bidsignore"
            lines = ignore.read_text().splitlines() if ignore.exists() else []
            merged = lines + [x for x in BIDSIGNORE if x not in lines]
            if merged != lines:
                write_bytes(ignore, ("\n".join(merged) + "\n").encode())

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        lock = self.root / ".bids_fmrilm.lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _os_error(exc, lock) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def path(self, run: Run, suffix: str, extension: str, **entities: Any) -> Path:
        """BIDS path of a derivative of ``run`` (source entities + given ones, in BIDS order).

        Entities given as None are dropped; e.g. ``path(run, "timeseries", ".tsv.gz", atlas="CC200")``.
        """
        ents = dict(run.source_entities())
        if run.space:
            ents["space"] = run.space
        ents.update(entities)
        name = "_".join(f"{short}-{ents[long]}" for long, short in ENTITY_ORDER if ents.get(long) is not None)
        folder = self.root / f"sub-{ents['subject']}"
        if ents.get("session") is not None:
            folder = folder / f"ses-{ents['session']}"
        return folder / "func" / f"{name}_{suffix}{extension}"

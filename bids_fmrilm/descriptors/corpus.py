"""The descriptor corpus: one JSON line of features, z-scores, levels and text per run.

Two passes: features of every run (in parallel), then -- against a given reference, or one built
from the runs themselves -- z-scores, categorical levels and a seeded text description per run.

Runs are read directly from a derivative folder of ROI time series
(``sub-*/[ses-*/]func/*_timeseries.tsv[.gz]`` with a JSON sidecar giving ``RepetitionTime``) by
:func:`load_roi_run`, a small function meant to be swapped for the shared signal pipeline later.

The output is resumable: lines already in ``OUT.jsonl`` are kept (a partial last line is
dropped), their runs are skipped, and every new line is written and flushed on its own.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from .features import compute_features, signal_mask
from .reference import build_reference, save_reference, zscore
from .text import describe, level_of

logger = logging.getLogger(__name__)

HIGH_PASS_HZ = 0.008
"""High-pass cutoff (Hz) of the cleaning applied by :func:`load_roi_run`."""

TS_PATTERNS = ("sub-*/func/*_timeseries.tsv.gz", "sub-*/ses-*/func/*_timeseries.tsv.gz",
               "sub-*/func/*_timeseries.tsv", "sub-*/ses-*/func/*_timeseries.tsv")

ATLAS_TABLES = {"cc200": "CC200_centroids.csv"}
"""Atlas name (lower case) to ROI-centroid file searched in ``$BIDS_FMRILM_ATLAS_DIR``."""

_ENTITY = re.compile(r"([a-zA-Z]+)-([a-zA-Z0-9]+)")


# --------------------------------------------------------------------------------------- reading
def find_runs(input_dir: str | os.PathLike, participant_label: Sequence[str] | None = None) -> list[Path]:
    """ROI time-series files of a derivative folder, sorted.

    Parameters
    ----------
    input_dir : path
        Root of the derivative dataset.
    participant_label : sequence of str, optional
        Keep these subjects only (with or without the ``sub-`` prefix).
    """
    root = Path(input_dir)
    found: set[Path] = set()
    for pat in TS_PATTERNS:
        found.update(root.glob(pat))
    if participant_label:
        keep = {p.removeprefix("sub-") for p in participant_label}
        found = {p for p in found if parse_entities(p).get("subject") in keep}
    return sorted(found)


def parse_entities(path: str | os.PathLike) -> dict[str, str]:
    """BIDS entities of a file name (``sub`` -> ``subject``, ``ses`` -> ``session``...)."""
    name = Path(path).name.split(".")[0]
    long = {"sub": "subject", "ses": "session", "task": "task", "run": "run", "acq": "acquisition",
            "atlas": "atlas", "desc": "desc", "space": "space", "rec": "reconstruction", "echo": "echo"}
    out = {}
    for part in name.split("_"):
        m = _ENTITY.fullmatch(part)
        if m:
            out[long.get(m.group(1), m.group(1))] = m.group(2)
    return out


def _sidecar(tsv_path: Path) -> dict:
    stem = tsv_path.name.split(".")[0]
    side = tsv_path.with_name(stem + ".json")
    if side.is_file():
        with open(side, encoding="utf-8") as fh:
            return json.load(fh)
    return {}


def load_roi_run(tsv_path: str | os.PathLike) -> tuple[np.ndarray, float, dict]:
    """Read and clean one run of ROI time series.

    Parameters
    ----------
    tsv_path : path
        ``*_timeseries.tsv[.gz]``: header row of ROI names, one row per volume, ``n/a`` for
        missing values; its JSON sidecar must give ``RepetitionTime`` (s).

    Returns
    -------
    ts : ndarray of shape (n_volumes, n_rois)
        Detrended, high-passed (:data:`HIGH_PASS_HZ`), unstandardized series. Columns without
        signal (all-NaN, mostly NaN or zero-variance) are left out of the cleaning and returned
        as all-NaN.
    tr : float
        Repetition time in seconds.
    meta : dict
        ``columns`` (ROI names), ``atlas`` (from the ``atlas-`` entity or the sidecar's
        ``Atlas``), ``n_no_signal`` and ``sidecar``.
    """
    from nilearn import signal

    tsv_path = Path(tsv_path)
    side = _sidecar(tsv_path)
    tr = side.get("RepetitionTime")
    if tr is None or not np.isfinite(float(tr)) or float(tr) <= 0:
        raise ValueError(f"{tsv_path}: the JSON sidecar gives no valid RepetitionTime")
    tr = float(tr)
    df = pd.read_csv(tsv_path, sep="\t", na_values=["n/a"], keep_default_na=True)
    raw = df.to_numpy(dtype=float)
    ok = signal_mask(raw)
    # Volumes with a NaN in a column with signal are censored; clean the remaining ones.
    rows = np.all(np.isfinite(raw[:, ok]), axis=1)
    ts = np.full(raw.shape, np.nan)
    if ok.any() and rows.sum() >= 3:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            ts[np.ix_(rows, ok)] = signal.clean(
                raw[np.ix_(rows, ok)], detrend=True, standardize=False, high_pass=HIGH_PASS_HZ, t_r=tr
            )
    ents = parse_entities(tsv_path)
    meta = {
        "columns": [str(c) for c in df.columns],
        "atlas": ents.get("atlas") or side.get("Atlas") or "unknown",
        "n_no_signal": int((~ok).sum()),
        "sidecar": side,
    }
    return ts, tr, meta


def _atlas_dirs() -> list[Path]:
    env = os.environ.get("BIDS_FMRILM_ATLAS_DIR", "")
    return [Path(p) for p in env.split(os.pathsep) if p]


@lru_cache(maxsize=8)
def _atlas_table(atlas: str, dirs: tuple[str, ...]) -> pd.DataFrame | None:
    fname = ATLAS_TABLES.get(atlas.lower())
    if not fname:
        return None
    for d in dirs:
        path = Path(d) / fname
        if path.is_file():
            break
    else:
        return None
    from bids_fmrilm.signals.atlas import assign_networks

    t = pd.read_csv(path)
    t.columns = [c.strip() for c in t.columns]
    idx = t["ROI number"].astype(int).to_numpy()
    xyz = t[["x", "y", "z"]].to_numpy(dtype=float)
    return pd.DataFrame(
        {
            "index": idx,
            "name": [f"ROI{i:03d}" for i in idx],
            "network": assign_networks(xyz),
            "x": xyz[:, 0],
            "y": xyz[:, 1],
            "z": xyz[:, 2],
        }
    )


def roi_table(atlas: str, columns: Sequence[str]) -> pd.DataFrame:
    """ROI table (``index, name, network, x, y, z``) matching the columns of a run.

    Known atlases (:data:`ATLAS_TABLES`) are read from ``$BIDS_FMRILM_ATLAS_DIR`` and get networks
    from :func:`bids_fmrilm.signals.atlas.assign_networks`; columns are matched by name, else by
    position when the counts agree. Anything else gets ``unassigned`` networks (global features
    only).
    """
    table = _atlas_table(atlas, tuple(str(d) for d in _atlas_dirs()))
    cols = [str(c) for c in columns]
    if table is not None:
        by_name = table.set_index("name")
        if set(cols) <= set(by_name.index):
            return by_name.loc[cols].reset_index()[["index", "name", "network", "x", "y", "z"]]
        if len(table) == len(cols):
            return table.assign(name=cols)
        logger.warning("ROI columns do not match the %s table; networks unassigned", atlas)
    return pd.DataFrame(
        {"index": np.arange(1, len(cols) + 1), "name": cols, "network": "unassigned",
         "x": np.nan, "y": np.nan, "z": np.nan}
    )


def read_phenotype(input_dir: str | os.PathLike) -> dict[str, dict]:
    """``participants.tsv`` as ``{subject label: {column: value}}`` (``n/a`` -> ``None``)."""
    path = Path(input_dir) / "participants.tsv"
    if not path.is_file():
        return {}
    df = pd.read_csv(path, sep="\t", na_values=["n/a"], dtype={"participant_id": str})
    out = {}
    for rec in df.to_dict(orient="records"):
        clean = {}
        for k, v in rec.items():
            if isinstance(v, (float, np.floating)) and not np.isfinite(v):
                v = None
            elif isinstance(v, np.generic):
                v = v.item()
            clean[k] = v
        out[str(rec["participant_id"]).removeprefix("sub-")] = clean
    return out


# ----------------------------------------------------------------------------- feature records
def run_record(tsv_path: str | os.PathLike, input_dir: str | os.PathLike, phenotype: Mapping | None = None) -> dict:
    """Feature record of one run: ``run``, ``atlas``, ``tr``, ``features``, ``phenotype``, ``qc``.

    ``phenotype["fd_mean"]``, when present, gives ``motion.fd_mean``.
    """
    tsv_path = Path(tsv_path)
    ts, tr, meta = load_roi_run(tsv_path)
    rois = roi_table(meta["atlas"], meta["columns"])
    phenotype = dict(phenotype or {})
    fd_mean = phenotype.get("fd_mean")
    try:
        fd_mean = float(fd_mean) if fd_mean is not None else None
    except (TypeError, ValueError):
        fd_mean = None
    feats = compute_features(ts, rois, tr, fd_mean=fd_mean)
    ents = parse_entities(tsv_path)
    run = {"path": tsv_path.relative_to(input_dir).as_posix()}
    for k in ("subject", "session", "task", "run"):
        run[k] = ents.get(k)
    return {
        "run": run,
        "atlas": meta["atlas"],
        "tr": tr,
        "features": feats,
        "phenotype": phenotype,
        "qc": {"n_volumes": int(ts.shape[0]), "n_rois": int(ts.shape[1]), "n_rois_no_signal": meta["n_no_signal"]},
    }


def _run_record_task(args: tuple[str, str, dict, str]) -> dict:
    tsv, root, phen, atlas_env = args
    if atlas_env:
        os.environ["BIDS_FMRILM_ATLAS_DIR"] = atlas_env
    try:
        return run_record(tsv, root, phen)
    except Exception as exc:  # one bad run must not stop the corpus
        return {"run": {"path": Path(tsv).relative_to(root).as_posix()}, "error": f"{type(exc).__name__}: {exc}"}


def compute_records(
    paths: Sequence[Path],
    input_dir: str | os.PathLike,
    phenotype: Mapping[str, Mapping] | None = None,
    nprocs: int = 1,
    progress: bool = True,
) -> list[dict]:
    """Feature records of many runs, in input order, with ``nprocs`` worker processes.

    Runs that fail to load get a record with an ``error`` message instead of ``features``.
    """
    phenotype = phenotype or {}
    root = str(Path(input_dir))
    env = os.environ.get("BIDS_FMRILM_ATLAS_DIR", "")
    tasks = [(str(p), root, dict(phenotype.get(parse_entities(p).get("subject", ""), {})), env) for p in paths]
    out: list[dict] = []
    with _progress(progress) as prog:
        task_id = prog.add_task("features", total=len(tasks))
        if nprocs and nprocs > 1 and len(tasks) > 1:
            with ProcessPoolExecutor(max_workers=nprocs) as ex:
                for rec in ex.map(_run_record_task, tasks, chunksize=max(1, min(8, len(tasks) // (4 * nprocs)))):
                    out.append(rec)
                    prog.advance(task_id)
        else:
            for t in tasks:
                out.append(_run_record_task(t))
                prog.advance(task_id)
    return out


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        disable=not enabled, transient=True,
    )


# ------------------------------------------------------------------------------------- corpus
def read_corpus(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """Lines of a corpus file; a partial (unparsable) last line is ignored.

    Parameters
    ----------
    repair : bool
        Also truncate the file after its last complete line, so appending continues cleanly.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines, good_end, pos = [], 0, 0
    for raw in data.splitlines(keepends=True):
        pos += len(raw)
        if not raw.endswith(b"\n"):
            break
        text = raw.strip()
        if not text:
            good_end = pos
            continue
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            break
        good_end = pos
    if repair and good_end < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
    return lines


def _text_seed(seed: int, key: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**32)


def corpus_line(record: Mapping, reference: Mapping, seed: int = 0) -> dict:
    """Complete corpus entry of a feature record: adds ``z``, ``levels``, ``text``, ``reference_id``.

    The text seed combines ``seed`` with the run path, so each run gets its own phrasing and the
    corpus is reproducible.
    """
    z = zscore(record["features"], reference)
    return {
        "run": record["run"],
        "atlas": record.get("atlas"),
        "tr": record.get("tr"),
        "features": record["features"],
        "z": z,
        "levels": {k: level_of(v) for k, v in z.items()},
        "text": describe(record["features"], z, seed=_text_seed(seed, record["run"]["path"])),
        "reference_id": reference["id"],
        "phenotype": record.get("phenotype", {}),
        "qc": record.get("qc", {}),
    }


def build_corpus(
    records: Iterable[Mapping],
    out_jsonl: str | os.PathLike,
    reference: Mapping | None = None,
    seed: int = 0,
    reference_name: str = "corpus",
    reference_filter: Callable[[Mapping], bool] | None = None,
    progress: bool = False,
) -> dict:
    """Write the corpus lines of feature records (resumable).

    Parameters
    ----------
    records : iterable of dict
        Feature records (``run`` with a unique ``path``, ``atlas``, ``tr``, ``features``,
        ``phenotype``), e.g. from :func:`compute_records`. Records with an ``error`` are skipped.
    out_jsonl : path
        Output file; existing complete lines are kept and their runs skipped.
    reference : dict, optional
        Reference to z-score against. Without one, a reference is built from the records that
        pass ``reference_filter`` (all by default).
    seed : int
        Base seed of the text phrasing.

    Returns
    -------
    dict
        ``reference`` (the one used), ``written``, ``skipped`` (already present), ``failed``.
    """
    out_jsonl = Path(out_jsonl)
    records = list(records)
    failed = [r for r in records if "error" in r or r.get("features") is None]
    good = [r for r in records if not ("error" in r or r.get("features") is None)]
    if reference is None:
        pool = [r for r in good if reference_filter is None or reference_filter(r)]
        if not pool:
            raise ValueError("no runs to build the reference from")
        reference = build_reference([r["features"] for r in pool], name=reference_name)
    existing = read_corpus(out_jsonl, repair=True)
    done = {e["run"]["path"] for e in existing}
    other_refs = {e.get("reference_id") for e in existing} - {reference["id"]}
    if other_refs:
        raise ValueError(
            f"{out_jsonl} holds lines z-scored against another reference ({', '.join(map(str, other_refs))}); "
            "write to a new file or pass the same reference"
        )
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    with open(out_jsonl, "a", encoding="utf-8") as fh, _progress(progress) as prog:
        task_id = prog.add_task("corpus", total=len(good))
        for rec in good:
            key = rec["run"]["path"]
            if key in done:
                skipped += 1
            else:
                fh.write(json.dumps(corpus_line(rec, reference, seed), allow_nan=False) + "\n")
                fh.flush()
                done.add(key)
                written += 1
            prog.advance(task_id)
    return {"reference": reference, "written": written, "skipped": skipped,
            "failed": [(r["run"]["path"], r.get("error")) for r in failed]}


def build_corpus_from_dir(
    input_dir: str | os.PathLike,
    out_jsonl: str | os.PathLike,
    reference: Mapping | None = None,
    reference_sites: Sequence[str] | None = None,
    save_reference_to: str | os.PathLike | None = None,
    nprocs: int = 1,
    seed: int = 0,
    participant_label: Sequence[str] | None = None,
    progress: bool = True,
) -> dict:
    """Build (or resume) the descriptor corpus of a folder of ROI time-series derivatives.

    Parameters
    ----------
    input_dir : path
        Derivative dataset with ``sub-*/[ses-*/]func/*_timeseries.tsv[.gz]`` and, optionally,
        ``participants.tsv`` (all columns go to ``phenotype``; ``fd_mean`` feeds motion).
    out_jsonl : path
        Corpus file (appended to; runs already in it are skipped).
    reference : dict, optional
        Reference to z-score against; by default one is built from the runs.
    reference_sites : sequence of str, optional
        Build the reference from runs whose ``site`` (``participants.tsv``) is one of these.
    save_reference_to : path, optional
        Write the reference used as JSON.
    nprocs : int
        Worker processes for the feature pass.
    seed : int
        Base seed of the text phrasing.
    participant_label : sequence of str, optional
        Restrict to these subjects.

    Returns
    -------
    dict
        As :func:`build_corpus`, plus ``n_runs``.
    """
    input_dir = Path(input_dir)
    paths = find_runs(input_dir, participant_label)
    if not paths:
        raise FileNotFoundError(f"{input_dir}: no sub-*/[ses-*/]func/*_timeseries.tsv[.gz] files")
    phenotype = read_phenotype(input_dir)
    # Features of runs already in the corpus are reused, so resuming does not recompute them.
    existing = {e["run"]["path"]: e for e in read_corpus(out_jsonl)}
    todo, records = [], {}
    for p in paths:
        rel = p.relative_to(input_dir).as_posix()
        if rel in existing:
            e = existing[rel]
            records[rel] = {k: e[k] for k in ("run", "atlas", "tr", "features", "phenotype", "qc") if k in e}
        else:
            todo.append(p)
    for rec in compute_records(todo, input_dir, phenotype, nprocs=nprocs, progress=progress):
        records[rec["run"]["path"]] = rec
    ordered = [records[p.relative_to(input_dir).as_posix()] for p in paths]

    filt, name = None, input_dir.name
    if reference_sites:
        sites = {s.strip() for s in reference_sites if s.strip()}
        filt = lambda r: str((r.get("phenotype") or {}).get("site")) in sites  # noqa: E731
        name = f"{input_dir.name}[site={','.join(sorted(sites))}]"
    result = build_corpus(ordered, out_jsonl, reference=reference, seed=seed, reference_name=name,
                          reference_filter=filt, progress=progress)
    if save_reference_to:
        save_reference(result["reference"], save_reference_to)
    result["n_runs"] = len(paths)
    return result

"""The descriptor corpus: one JSON line of features, z-scores, levels and text per run.

Two passes: features of every run (in parallel), then -- against a given reference, or one built
from the runs themselves -- z-scores, categorical levels and a seeded text description per run.

Runs are found and cleaned by the same code as the participant level
(:func:`bids_fmrilm.bids.layout.find_runs`, :func:`bids_fmrilm.signals.pipeline.extract_signals`),
so the corpus and the participant level's descriptors agree: ROI time-series derivatives and
fMRIPrep derivatives in MNI space both work, and series are at the model TR.

The output is resumable: lines already in ``OUT.jsonl`` are kept (a partial last line is
dropped), their runs are skipped, and every new line is written and flushed on its own.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from ..bids.layout import Run, find_runs
from ..config import SignalSettings
from ..signals.pipeline import RunSignals, extract_signals
from .features import compute_features
from .reference import build_reference, save_reference, zscore
from .text import describe, level_of

logger = logging.getLogger(__name__)


def run_features(sig: RunSignals, phenotype: Mapping | None = None) -> dict:
    """Descriptor features of a run's cleaned signals (the participant level uses the same call).

    Motion comes from the run's framewise displacement when confounds gave it, else from the
    ``fd_mean`` field of ``phenotype`` (a participants.tsv row), when it is a number.
    """
    try:
        fd_mean = float((phenotype or {}).get("fd_mean"))
    except (TypeError, ValueError):
        fd_mean = None
    fd = sig.fd if sig.fd is not None and len(sig.fd) else None
    return compute_features(sig.timeseries, sig.atlas.rois, sig.tr,
                            fd_mean=sig.mean_fd if fd is not None else fd_mean, fd=fd)


def read_phenotype(input_dir: str | os.PathLike) -> dict[str, dict]:
    """``participants.tsv`` as ``{subject label: {column: value}}`` (``n/a`` -> ``None``).

    Empty when the file is absent, unreadable or has no ``participant_id``; a repeated
    participant keeps its first row (the group level reports duplicates as an error).
    """
    path = Path(input_dir) / "participants.tsv"
    try:
        df = pd.read_csv(path, sep="\t", na_values=["n/a"], dtype={"participant_id": str})
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if "participant_id" not in df:
        return {}
    df = df.drop_duplicates("participant_id")
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
def run_record(run: Run, settings: SignalSettings | None = None, phenotype: Mapping | None = None) -> dict:
    """Feature record of one run: ``run``, ``atlas``, ``tr``, ``features``, ``phenotype``, ``qc``.

    The run goes through the same signal pipeline as the participant level
    (:func:`bids_fmrilm.signals.pipeline.extract_signals`: cleaning, resampling to the model TR).
    """
    settings = settings or SignalSettings()
    sig = extract_signals(run, settings)
    phenotype = dict(phenotype or {})
    feats = run_features(sig, phenotype)
    info = {"path": run.relpath()}
    for k in ("subject", "session", "task", "run"):
        v = run.entities.get(k)
        info[k] = None if v is None else str(v)
    return {
        "run": info,
        "atlas": sig.atlas.name,
        "tr": sig.tr,
        "features": feats,
        "phenotype": phenotype,
        "qc": {"n_volumes": int(sig.timeseries.shape[0]), "n_rois": int(sig.atlas.n_rois),
               "n_rois_no_signal": len(sig.empty_rois) + len(sig.flat_rois)},
    }


def _run_record_task(args: tuple[Run, SignalSettings, dict]) -> dict:
    run, settings, phen = args
    try:
        return run_record(run, settings, phen)
    except Exception as exc:  # one bad run must not stop the corpus
        msg = exc.one_line() if hasattr(exc, "one_line") else f"{type(exc).__name__}: {exc}"
        return {"run": {"path": run.relpath()}, "error": msg}


def compute_records(
    runs: Sequence[Run],
    settings: SignalSettings | None = None,
    phenotype: Mapping[str, Mapping] | None = None,
    nprocs: int = 1,
    progress: bool = True,
) -> list[dict]:
    """Feature records of many runs, in input order, with ``nprocs`` worker processes.

    Runs that fail to load get a record with an ``error`` message instead of ``features``.
    """
    phenotype = phenotype or {}
    settings = settings or SignalSettings()
    tasks = [(r, settings, dict(phenotype.get(str(r.entities.get("subject", "")), {}))) for r in runs]
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
    settings: SignalSettings | None = None,
) -> dict:
    """Build (or resume) the descriptor corpus of a dataset the BIDS-App accepts.

    Parameters
    ----------
    input_dir : path
        ROI time-series derivatives (``sub-*/[ses-*/]func/*_timeseries.tsv[.gz]``) or fMRIPrep
        derivatives in MNI space, and, optionally, ``participants.tsv`` (all columns go to
        ``phenotype``; ``fd_mean`` feeds motion when the run has no confounds).
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
    settings : SignalSettings, optional
        Signal pipeline settings (atlas, model TR); the defaults of the BIDS-App otherwise.

    Returns
    -------
    dict
        As :func:`build_corpus`, plus ``n_runs``.
    """
    input_dir = Path(input_dir)
    runs = find_runs(input_dir, participant_label=tuple(participant_label or ()))
    phenotype = read_phenotype(input_dir)
    # Features of runs already in the corpus are reused, so resuming does not recompute them.
    existing = {e["run"]["path"]: e for e in read_corpus(out_jsonl)}
    todo, records = [], {}
    for r in runs:
        rel = r.relpath()
        if rel in existing:
            e = existing[rel]
            records[rel] = {k: e[k] for k in ("run", "atlas", "tr", "features", "phenotype", "qc") if k in e}
        else:
            todo.append(r)
    for rec in compute_records(todo, settings, phenotype, nprocs=nprocs, progress=progress):
        records[rec["run"]["path"]] = rec
    ordered = [records[r.relpath()] for r in runs]

    filt, name = None, input_dir.name
    if reference_sites:
        sites = {s.strip() for s in reference_sites if s.strip()}
        filt = lambda r: str((r.get("phenotype") or {}).get("site")) in sites  # noqa: E731
        name = f"{input_dir.name}[site={','.join(sorted(sites))}]"
    result = build_corpus(ordered, out_jsonl, reference=reference, seed=seed, reference_name=name,
                          reference_filter=filt, progress=progress)
    if save_reference_to:
        save_reference(result["reference"], save_reference_to)
    result["n_runs"] = len(runs)
    return result

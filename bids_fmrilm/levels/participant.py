"""Participant level: every selected run to its derivatives (a map over runs).

Each run is processed independently: one bad run is reported (one line on the console, a crash
report under ``logs/``) and never stops the others. Outputs are written atomically and the JSON
sidecar is written last, so it marks a complete run; a re-run skips runs whose sidecar records
the same settings, and ``--force`` redoes them.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .. import __version__
from ..bids.layout import Run, find_runs, read_dataset_description
from ..bids.validate import validate_dataset
from ..bids.writer import DerivativesWriter, read_json, remove_stale_temp_files, write_bytes, write_json, write_tsv
from ..config import Config
from ..descriptors.corpus import read_phenotype
from ..errors import BidsAppError, CantCreateError, ExitCode, UsageError
from ..signals.atlas import clean_name
from ..signals.pipeline import atlas_entity, atlas_for_run, extract_signals, signals_frame

log = logging.getLogger("bids_fmrilm")


@dataclass
class RunResult:
    """Outcome of one run: ``status`` is ``done``, ``skipped`` or ``failed``."""

    run_id: str
    source: str
    status: str
    reason: str = ""
    code: int = 0
    outputs: tuple[str, ...] = ()
    seconds: float = 0.0
    traceback: str = ""


def check_paths(cfg: Config) -> None:
    """Refuse an output (or work) folder equal to or inside the input dataset."""
    bids = cfg.bids_dir.resolve()
    for name, p in (("OUTPUT_DIR", cfg.output_dir), ("--work-dir", cfg.work_dir)):
        if p is None:
            continue
        rp = p.resolve()
        if rp == bids or bids in rp.parents:
            raise UsageError(f"{name} {p} is inside the input dataset", path=cfg.bids_dir,
                             fix=f"choose a {name} outside BIDS_DIR (the input is never written to)")
        blocker = next((q for q in (rp, *rp.parents) if q.exists() and not q.is_dir()), None)
        if blocker is not None:  # mkdir would fail with EEXIST/ENOTDIR, which read as I/O errors (74)
            raise CantCreateError(f"{name} cannot be created: {blocker} is not a folder", path=p,
                                  fix=f"remove {blocker} or choose another {name}")


def select_runs(cfg: Config) -> list[Run]:
    """Validate (raw datasets) and find the runs the command line selects."""
    desc = read_dataset_description(cfg.bids_dir)
    if not cfg.skip_bids_validation:
        if str(desc.get("DatasetType", "raw")).lower() == "raw":
            warnings = validate_dataset(cfg.bids_dir)
            log.info("BIDS validation passed (%d warnings)", len(warnings))
        else:
            log.info("input is a derivatives dataset: BIDS validation skipped")
    filters = dict(cfg.bids_filters)
    return find_runs(cfg.bids_dir, cfg.derivatives, cfg.participant_label, cfg.session_label, cfg.task, filters,
                     prefer_raw=cfg.preproc == "minimal")


def settings_record(cfg: Config) -> dict[str, Any]:
    """What a run's outputs depend on; a change forces recomputation."""
    import dataclasses
    import hashlib

    ref = descriptor_reference(cfg)
    blob = f"{cfg.signals.digest()}|{ref['id']}|{cfg.seed}"
    return {"Version": __version__, "Signals": dataclasses.asdict(cfg.signals), "DescriptorReference": ref["id"],
            "Seed": cfg.seed, "SettingsHash": hashlib.sha256(blob.encode()).hexdigest()[:12]}


def descriptor_reference(cfg: Config) -> dict[str, Any]:
    """The normative reference descriptors are z-scored against (``--descriptor-reference`` or packaged)."""
    from ..descriptors.reference import DEFAULT_REFERENCE

    return _load_descriptor_reference(str(cfg.descriptor_reference or DEFAULT_REFERENCE))


@lru_cache(maxsize=4)
def _load_descriptor_reference(path_str: str) -> dict[str, Any]:
    """Read and check a reference once per process (every run needs it twice)."""
    from ..descriptors.reference import load_reference
    from ..errors import DataError, MissingInputError

    path = Path(path_str)
    if not path.is_file():
        raise MissingInputError("descriptor reference not found", path=path,
                                fix="give a JSON written by fmrilm corpus --save-reference")
    try:
        ref = load_reference(path)
        ref["id"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"not a descriptor reference ({exc.__class__.__name__}: {exc})", path=path,
                        fix="give a JSON written by fmrilm corpus --save-reference") from None
    return ref


def write_descriptors(run: Run, sig, cfg: Config, writer: DerivativesWriter, atlas: str,
                      phenotype: dict[str, Any] | None, record: dict[str, Any]) -> Path:
    """``*_atlas-<A>_desc-descriptors_features.json``: features, z-scores, levels and text.

    The same features and text as a line of ``fmrilm corpus`` for this run.
    """
    from ..descriptors.corpus import corpus_line, run_features

    ref = descriptor_reference(cfg)
    line = corpus_line({"run": {"path": run.relpath()}, "features": run_features(sig, phenotype)}, ref, cfg.seed)
    path = writer.path(run, "features", ".json", atlas=atlas, desc="descriptors")
    write_json(path, {
        "Description": "Imaging descriptors of the run: features, robust z-scores against the reference, levels, text",
        "Text": line["text"],
        "ReferenceID": ref["id"],
        "ReferenceName": ref.get("name"),
        "Features": line["features"],
        "ZScores": line["z"],
        "Levels": line["levels"],
        **record,
    })
    return path


def run_atlas_name(run: Run, cfg: Config) -> str | None:
    """The atlas entity of a run's outputs, known before any image is read (None: refused raw run)."""
    if run.kind == "roi":
        return run.entities.get("atlas")
    if run.kind == "volume" or (run.kind == "raw" and cfg.preproc != "none"):
        return clean_name(atlas_for_run(run, cfg.signals).name)
    return None


def process_run(run: Run, cfg: Config, phenotype: dict[str, Any] | None = None) -> RunResult:
    """Compute and write the derivatives of one run; never raises for data problems.

    The time series sidecar is written last: it marks the run complete.
    """
    t0 = time.time()
    writer = DerivativesWriter(cfg.output_dir, cfg.bids_dir)
    record = settings_record(cfg)
    started: list[Path] = []  # outputs of this run being (re)written: removed together if one fails
    try:
        sig = None
        # the atlas entity is needed for the names; for ROI inputs it is the input's own. Known
        # before any image is read, so that a re-run skips complete runs without recomputing them
        atlas_name = run_atlas_name(run, cfg)
        pre = None  # raw scanner-space run: the minimal preprocessing (bids_fmrilm.preprocessing)
        if run.kind == "raw" and cfg.preproc != "none":
            from ..preprocessing.outputs import with_preproc_record

            record = with_preproc_record(record, cfg)
        if atlas_name is not None:
            done = _complete(writer.path(run, "timeseries", ".json", atlas=atlas_name), record)
            if done and not cfg.force:
                return RunResult(run.run_id, run.relpath(), "skipped", "complete, same settings", 0, (), time.time() - t0)
        if run.kind == "raw" and cfg.preproc != "none":
            from ..preprocessing.outputs import output_paths, preprocess_for, write_outputs
            from ..signals.parcellate import load_header
            from ..signals.pipeline import _header_tr, repetition_time

            tr = repetition_time(run, _header_tr(load_header(run.path)))  # bad TR: fail before the heavy work
            pre = preprocess_for(run, cfg, tr)
        try:
            sig = extract_signals(run, cfg.signals, preprocessed=pre)
            if pre is not None:
                started += output_paths(run, pre, writer, cfg.save_preproc)
                write_outputs(run, pre, writer, cfg.save_preproc)
        finally:
            if pre is not None and not cfg.debug:
                pre.cleanup()
        atlas = atlas_entity(sig)
        ts_path = writer.path(run, "timeseries", ".tsv.gz", atlas=atlas)
        js_path = writer.path(run, "timeseries", ".json", atlas=atlas)
        if not cfg.force and _complete(js_path, record):
            return RunResult(run.run_id, run.relpath(), "skipped", "complete, same settings", 0, (), time.time() - t0)
        table = cfg.output_dir / f"atlas-{atlas}_dseg.tsv"
        if not table.exists():
            write_bytes(table, sig.atlas.roi_table_tsv().encode())
        started = [js_path, ts_path, writer.path(run, "features", ".json", atlas=atlas, desc="descriptors")] + started
        write_tsv(ts_path, signals_frame(sig))
        feat_path = write_descriptors(run, sig, cfg, writer, atlas, phenotype, record)
        meta = {
            "RepetitionTime": sig.tr,
            "Atlas": sig.atlas.name,
            "AtlasSource": sig.atlas.source,
            "AtlasDigest": sig.atlas.digest(),
            "ROITable": table.name,
            "Sources": [f"bids:raw:{run.relpath()}"],
            "CleaningSteps": sig.steps,
            "Confounds": sig.confound_names,
            **sig.qc(),
            **({"Preprocessing": pre.record()} if pre is not None else {}),
            **record,
        }
        write_json(js_path, meta)
        return RunResult(run.run_id, run.relpath(), "done", "", 0, (str(ts_path), str(feat_path), str(js_path)),
                         time.time() - t0)
    except BidsAppError as exc:
        _remove_outputs(started)
        tb = _crash_report(cfg, run, exc)
        return RunResult(run.run_id, run.relpath(), "failed", exc.one_line(), int(exc.code), (), time.time() - t0, tb)
    except Exception as exc:  # a bug or an unforeseen input: reported, other runs go on
        _remove_outputs(started)
        tb = _crash_report(cfg, run, exc)
        reason = f"{run.relpath()}: unexpected {exc.__class__.__name__}: {exc}".splitlines()[0]
        return RunResult(run.run_id, run.relpath(), "failed", reason, int(ExitCode.ERROR), (), time.time() - t0, tb)


def _remove_outputs(paths: list[Path]) -> None:
    """Remove a run's half-written outputs (the sidecar first: without it the run reads as not done)."""
    for p in paths:
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass


def _complete(json_path: Path, record: dict[str, Any]) -> bool:
    meta = read_json(json_path)
    return bool(meta) and meta.get("SettingsHash") == record["SettingsHash"] and meta.get("Version") == record["Version"]


def _crash_report(cfg: Config, run: Run, exc: BaseException) -> str:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    text = f"run: {run.relpath()}\nerror: {exc}\n\n" + tb
    try:
        write_bytes(cfg.output_dir / "logs" / f"{run.run_id}_{run.path.name.split('.')[0][-40:]}_crash.txt", text.encode())
    except BidsAppError:
        pass
    return tb


def run_participant(cfg: Config, progress: bool = True) -> list[RunResult]:
    """Run the participant level over all selected runs.

    Returns the per-run results (also summarised on the console and in ``logs/``).
    """
    check_paths(cfg)
    if cfg.model is not None:
        from .model_outputs import LoadedModel

        LoadedModel(cfg.model, cfg)  # a bad --model or --adapter fails here, before any run is processed
    elif cfg.adapter is not None:
        raise UsageError("--adapter needs a --model checkpoint", path=cfg.adapter,
                         fix="pass --model with the checkpoint the adapter was trained on")
    runs = select_runs(cfg)
    writer = DerivativesWriter(cfg.output_dir, cfg.bids_dir)
    writer.init_dataset()
    stale = remove_stale_temp_files(cfg.output_dir)
    if stale:
        log.info("removed %d temporary files left by an interrupted run", len(stale))
    descriptor_reference(cfg)  # a bad --descriptor-reference fails here, once, not per run
    phenotypes = read_phenotype(cfg.bids_dir)
    results: list[RunResult] = []
    bar = _progress(progress)
    with bar:
        task = bar.add_task("runs", total=len(runs))
        if cfg.nprocs > 1 and len(runs) > 1:
            with ProcessPoolExecutor(max_workers=cfg.nprocs) as pool:
                futures = {pool.submit(process_run, r, cfg, phenotypes.get(r.subject)): r for r in runs}
                for fut in as_completed(futures):
                    results.append(fut.result())
                    _report(results[-1], cfg)
                    bar.advance(task)
        else:
            for r in runs:
                results.append(process_run(r, cfg, phenotypes.get(r.subject)))
                _report(results[-1], cfg)
                bar.advance(task)
    if cfg.model is not None:
        from .model_outputs import run_model_pass

        named = [(r, a) for r in runs if (a := run_atlas_name(r, cfg)) is not None]
        results = run_model_pass(cfg, named, results, progress)
    results.sort(key=lambda r: (r.run_id, r.source))
    _write_summary(cfg, results)
    write_reports(cfg, sorted({r.subject for r in runs}))
    return results


def write_reports(cfg: Config, subjects: list[str]) -> None:
    """``sub-<label>.html`` per participant, from the files written (a failure is a warning)."""
    from ..reports.participant import build_participant_report

    for sub in subjects:
        try:
            path = build_participant_report(cfg.output_dir, sub)
            if path is not None:
                log.info("report: %s", path)
        except Exception as exc:  # a report problem never fails the runs
            log.warning("report for sub-%s not written: %s: %s", sub, exc.__class__.__name__, exc)
            if cfg.debug:
                log.debug("%s", traceback.format_exc())


def _report(res: RunResult, cfg: Config) -> None:
    if res.status == "failed":
        log.error("%s", res.reason)
        if cfg.debug and res.traceback:
            log.debug("%s failed:\n%s", res.run_id, res.traceback.rstrip())


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled or not os.isatty(2), transient=True)


def _write_summary(cfg: Config, results: list[RunResult]) -> None:
    import pandas as pd

    df = pd.DataFrame([{"run": r.run_id, "source": r.source, "status": r.status, "exit_code": r.code,
                        "seconds": round(r.seconds, 2), "reason": r.reason} for r in results])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = cfg.output_dir / "logs" / f"participant_{stamp}_{os.getpid()}_summary.tsv"
    n = 1
    while path.exists():  # a second run in the same second (in-process): keep both tables
        path = path.with_name(f"participant_{stamp}_{os.getpid()}-{n}_summary.tsv")
        n += 1
    write_tsv(path, df)


def exit_code(results: list[RunResult]) -> int:
    """0 when every run is done or skipped, else the exit code of the first failed run."""
    failed = [r for r in results if r.status == "failed"]
    return failed[0].code if failed else 0

"""The participant level's side of the minimal pipeline: run it for a raw run, write its outputs.

Outputs (under ``sub-<L>/[ses-<S>/]func/`` of OUTPUT_DIR, BIDS-Derivatives names as fMRIPrep's):

* ``<run>_desc-confounds_timeseries.tsv``: fMRIPrep column names, one row per kept volume (no JSON
  sidecar: the group level reads ``*_timeseries.json`` as run outputs; the columns are described
  in the run's time series JSON, ``Preprocessing.Confounds``).
* ``<run>_from-bold_to-T1w_mode-image_xfm.mat`` (ITK rigid: T1w points -> EPI reference points, the
  map that resamples the BOLD reference into T1w space), ``<run>_from-T1w_to-<space>_mode-image_desc-affine_xfm.mat``
  and ``..._desc-warp_xfm.nii.gz`` (ANTs affine and SyN displacement field; with
  ``antsApplyTransforms -t warp -t affine`` they bring the T1w to the template). Without a usable
  T1w: ``<run>_from-bold_to-<space>_mode-image_desc-{affine,warp}_xfm.*``.
* with ``--save-preproc``: ``<run>_space-<space>_desc-preproc_bold.nii.gz`` (+ ``.json``) and its
  ``desc-brain_mask``.
* ``.bidsignore`` gains the transform and confounds patterns (:data:`BIDSIGNORE`).
* ``sub-<L>/figures/<run>_desc-registration_bold.png`` (template edges over the normalised mean
  EPI) and ``<run>_desc-fd_bold.png`` (framewise displacement).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..bids.layout import Run, find_t1w
from ..bids.writer import DerivativesWriter, atomic_path, write_bytes, write_json, write_tsv
from .pipeline import PreprocOptions, PreprocResult, preprocess_run

log = logging.getLogger("bids_fmrilm")


def options_for(cfg) -> PreprocOptions:
    """Pipeline options of a :class:`bids_fmrilm.config.Config`.

    ``BIDS_FMRILM_PREPROC_RESOLUTION`` (mm, default 2) changes the output grid: a developer knob
    for fast tests on coarse grids, not a user setting.
    """
    import os

    res = float(os.environ.get("BIDS_FMRILM_PREPROC_RESOLUTION", "2") or 2)
    return PreprocOptions(resolution=res, omp_nthreads=cfg.threads_per_run())


def with_preproc_record(record: dict[str, Any], cfg) -> dict[str, Any]:
    """A raw run's settings record: the preprocessing settings take part in its hash."""
    opts = options_for(cfg).digest_fields()
    blob = json.dumps({"hash": record["SettingsHash"], "preproc": opts}, sort_keys=True)
    return {**record, "PreprocessingSettings": opts,
            "SettingsHash": hashlib.sha256(blob.encode()).hexdigest()[:12]}


def preprocess_for(run: Run, cfg, tr: float | None = None) -> PreprocResult:
    """Run the minimal pipeline on ``run`` in a work folder (``-w``/``preproc/<run>``, else a temporary one)."""
    if cfg.work_dir is not None:
        work = Path(cfg.work_dir) / "preproc" / run.run_id
        shutil.rmtree(work, ignore_errors=True)
    else:
        work = Path(tempfile.mkdtemp(prefix=f"bids_fmrilm_{run.run_id}_"))
    t1w = find_t1w(run)
    try:
        return preprocess_run(run, options_for(cfg), work, t1w=t1w, tr=tr)
    except BaseException:
        if not cfg.debug:
            shutil.rmtree(work, ignore_errors=True)
        raise


def _xfm_path(writer: DerivativesWriter, run: Run, name: str) -> Path:
    folder = writer.path(run, "xfm", ".mat").parent
    return folder / f"{run.run_id}_{name}"


def output_paths(run: Run, pre: PreprocResult, writer: DerivativesWriter, save_preproc: bool) -> list[Path]:
    """Every file :func:`write_outputs` writes (to remove them together when the run fails)."""
    sub = writer.root / f"sub-{run.subject}" / "figures"
    paths = [writer.path(run, "timeseries", ".tsv", desc="confounds"),
             sub / f"{run.run_id}_desc-registration_bold.png", sub / f"{run.run_id}_desc-fd_bold.png"]
    paths += [_xfm_path(writer, run, name) for name in pre.transforms]
    if save_preproc:
        paths += [writer.path(run, "bold", ".json", space=pre.space, desc="preproc"),
                  writer.path(run, "bold", ".nii.gz", space=pre.space, desc="preproc"),
                  writer.path(run, "mask", ".nii.gz", space=pre.space, desc="brain")]
    return paths


BIDSIGNORE = ["*_xfm.mat", "*_xfm.nii.gz", "*_desc-confounds_timeseries.tsv"]
"""Outputs the BIDS validator does not know (transforms; confounds without fMRIPrep's sidecar)."""


def _extend_bidsignore(writer: DerivativesWriter) -> None:
    path = writer.root / ".bidsignore"
    with writer._lock():  # the file is shared by concurrent participant-level processes
        lines = path.read_text().splitlines() if path.exists() else []
        merged = lines + [x for x in BIDSIGNORE if x not in lines]
        if merged != lines:
            write_bytes(path, ("\n".join(merged) + "\n").encode())


def write_outputs(run: Run, pre: PreprocResult, writer: DerivativesWriter, save_preproc: bool) -> list[Path]:
    """Write the confounds, transforms, figures (and the series with ``save_preproc``), atomically."""
    from .figures import fd_figure, registration_figure

    paths = output_paths(run, pre, writer, save_preproc)
    conf_tsv, fig_reg, fig_fd = paths[:3]
    # no JSON sidecar: the group level reads every *_timeseries.json as a run's; the columns are
    # described in the run's time series JSON ("Preprocessing")
    write_tsv(conf_tsv, pre.confounds, float_format="%.8g")
    for name, src in pre.transforms.items():
        write_bytes(_xfm_path(writer, run, name), Path(src).read_bytes())
    write_bytes(fig_reg, registration_figure(pre.mean_bold, pre.template.t1,
                                             f"{run.run_id}: template edges on the normalised mean EPI"))
    write_bytes(fig_fd, fd_figure(pre.confounds["framewise_displacement"].to_numpy(), pre.tr,
                                  f"{run.run_id}: framewise displacement"))
    _extend_bidsignore(writer)
    if save_preproc:
        write_json(paths[-3], {
            "Description": "BOLD after the bids_fmrilm minimal preprocessing (ANTsPy): non-steady-state volumes "
                           "discarded, head motion corrected and normalised in one resampling",
            "RepetitionTime": pre.tr, "TaskName": run.entities.get("task"), "SkullStripped": False,
            "SpatialReference": pre.space, "Sources": [f"bids:raw:{run.relpath()}"],
            "NonSteadyStateVolumesDiscarded": pre.n_dropped})
        with atomic_path(paths[-2]) as tmp:
            with open(pre.bold, "rb") as src, gzip.open(tmp, "wb", compresslevel=1) as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
        write_bytes(paths[-1], Path(pre.mask).read_bytes())
    return paths

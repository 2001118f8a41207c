"""Group level: reduce over what the participant level wrote (never recomputes signals).

Writes ``group/qc_runs.tsv``, one row per run found in the output folder: participant, run,
volumes, TR, ROIs without voxels or signal, mean framewise displacement (from the run's
confounds, else from ``participants.tsv``'s ``fd_mean``), and a JSON summary beside it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..bids.layout import strip_prefix
from ..bids.writer import read_json, write_json, write_tsv
from ..config import Config
from ..descriptors.corpus import read_phenotype
from ..errors import DataError, MissingInputError
from .participant import check_paths

log = logging.getLogger("bids_fmrilm")

QC_COLUMNS = ["participant_id", "run", "file", "volumes", "source_volumes", "repetition_time",
              "source_repetition_time", "n_rois", "rois_without_voxels", "rois_without_signal", "mean_fd"]


def collect_qc(output_dir: Path, phenotypes: dict[str, dict] | None = None,
               participant_label: tuple[str, ...] = ()) -> pd.DataFrame:
    """QC table from the participant level's ``*_timeseries.json`` sidecars.

    ``phenotypes`` (participants.tsv rows by label, :func:`read_phenotype`) give ``fd_mean`` for
    runs whose sidecar has no framewise displacement.
    """
    rows = []
    subs = {strip_prefix(s, "sub") for s in participant_label}
    fd_lookup = {}
    for label, row in (phenotypes or {}).items():
        try:
            fd_lookup[f"sub-{label}"] = float(row.get("fd_mean"))
        except (TypeError, ValueError):
            pass
    for js in sorted(Path(output_dir).glob("sub-*/**/func/*_timeseries.json")):
        meta = read_json(js)
        if not meta or "RepetitionTime" not in meta:
            continue
        sub = js.name.split("_")[0]
        if subs and strip_prefix(sub, "sub") not in subs:
            continue
        tsv = js.with_name(js.name[: -len(".json")] + ".tsv.gz")
        n_rois = None
        if tsv.exists():
            n_rois = len(pd.read_csv(tsv, sep="\t", nrows=0).columns)
        fd = meta.get("MeanFramewiseDisplacement")
        if fd is None:
            fd = fd_lookup.get(sub)
        rows.append({
            "participant_id": sub,
            "run": re.sub(r"_space-[A-Za-z0-9]+", "", js.name.split("_atlas-")[0]),
            "file": str(tsv.relative_to(output_dir)),
            "volumes": meta.get("Volumes"),
            "source_volumes": meta.get("SourceVolumes"),
            "repetition_time": meta.get("RepetitionTime"),
            "source_repetition_time": meta.get("SourceRepetitionTime"),
            "n_rois": n_rois,
            "rois_without_voxels": len(meta.get("ROIsWithoutVoxels", [])),
            "rois_without_signal": len(meta.get("ROIsWithoutSignal", [])),
            "mean_fd": None if fd is None or (isinstance(fd, float) and np.isnan(fd)) else float(fd),
        })
    return pd.DataFrame(rows, columns=QC_COLUMNS)


def run_group(cfg: Config) -> pd.DataFrame:
    """Run the group level; returns the QC table it wrote."""
    check_paths(cfg)
    qc = collect_qc(cfg.output_dir, read_phenotype(cfg.bids_dir), cfg.participant_label)
    if qc.empty:
        raise MissingInputError("no participant-level outputs (*_timeseries.json) found", path=cfg.output_dir,
                                fix="run the participant level into this OUTPUT_DIR first")
    group = cfg.output_dir / "group"
    write_tsv(group / "qc_runs.tsv", qc, float_format="%.6g")
    summary = {
        "Runs": int(len(qc)),
        "Participants": int(qc["participant_id"].nunique()),
        "RepetitionTimes": sorted({float(x) for x in qc["source_repetition_time"].dropna()}),
        "MedianVolumes": float(qc["volumes"].median()),
        "RunsWithEmptyROIs": int((qc["rois_without_voxels"] > 0).sum()),
        "RunsWithFlatROIs": int((qc["rois_without_signal"] > 0).sum()),
        "MeanFD": None if qc["mean_fd"].isna().all() else float(qc["mean_fd"].mean()),
    }
    write_json(group / "qc_runs.json", {"Description": "One row per run processed at the participant level",
                                        "Summary": summary})
    log.info("group QC: %d runs of %d participants -> %s", summary["Runs"], summary["Participants"], group / "qc_runs.tsv")
    if cfg.label:
        run_label_analysis(cfg, qc)
    from ..reports.group import build_group_report

    report = build_group_report(cfg.output_dir)
    log.info("group report: %s", report)
    return qc


def run_label_analysis(cfg: Config, qc: pd.DataFrame) -> dict:
    """Cross-validated prediction of ``cfg.label`` from what the participant level wrote.

    Methods on the same folds: chance (training-fold frequencies or mean), linear model on FC,
    and with an fMRI-LM (``cfg.model``) the zero-shot answer, a linear probe on its embeddings and
    few-shot LoRA adaptation for each ``--shots`` K (:mod:`.fewshot`). Writes under ``group/``:
    ``label-<L>_predictions.tsv`` (out-of-fold predictions per participant and method),
    ``label-<L>_metrics.tsv`` and ``.json`` (metrics with bootstrap 95 % intervals),
    ``label-<L>_learningcurve.tsv`` (few-shot metrics over K) and ``label-<L>_adapter/`` (the
    adapter trained on every labelled participant, for ``participant --adapter``).
    """
    from .crossval import (bootstrap_ci, chance_baseline, fc_features, linear_baseline, make_folds, metrics, out_of_fold,
                           within_fold_auroc)
    from .labels import load_labels

    table = cfg.labels_file or (cfg.bids_dir / "participants.tsv")
    labels = load_labels(table, cfg.label, cfg.task_type, cfg.cv_group)
    files = {}
    for _, row in qc.iterrows():
        files.setdefault(strip_prefix(row["participant_id"], "sub"), []).append(cfg.output_dir / row["file"])
    pids = [p for p in labels.values.index if p in files]
    no_data = sorted(set(labels.values.index) - set(pids))
    if no_data:
        log.warning("%d labelled participants have no participant-level output and are left out", len(no_data))
    if labels.excluded:
        log.warning("%d participants have no %s label and are excluded", len(labels.excluded), cfg.label)
    runs, meta = _token_runs(cfg, pids)
    if runs is not None:
        no_tokens = [p for p in pids if p not in runs]
        if no_tokens:
            log.warning("%d labelled participants have no fMRI-LM tokens and are left out of every method "
                        "(same participants and folds for all): %s", len(no_tokens), ", ".join(no_tokens[:5]))
            no_data = sorted(no_data + no_tokens)
            pids = [p for p in pids if p in runs]
    sub = labels.values.loc[pids]
    labels = type(labels)(labels.name, labels.task_type, sub, labels.excluded,
                          labels.groups.loc[pids] if labels.groups is not None else None)
    if labels.task_type == "classification" and sub.nunique() < 2:
        raise DataError(f"the participants with outputs have one {cfg.label} class only ({sub.iloc[0]!r})", path=table,
                        fix="process participants of every class at the participant level")
    try:
        folds = make_folds(labels, pids, cfg.folds, cfg.seed)
    except DataError as exc:  # too few participants or groups: name the labels table
        if exc.path is not None:
            raise
        raise DataError(exc.message, path=table, fix=exc.fix) from None
    X = np.stack([fc_features(files[p]) for p in pids])
    y = labels.values.to_numpy()
    classes = labels.classes or None
    preds = {
        "chance": chance_baseline(y, folds, classes),
        "fc_linear": out_of_fold(lambda yt: linear_baseline(labels.task_type, yt, cfg.seed), X, y, folds, classes),
    }
    group = cfg.output_dir / "group"
    stem = f"label-{re.sub(r'[^A-Za-z0-9]', '', cfg.label)}"
    fm_result = None
    if runs is not None:
        from .fewshot import AdaptSettings, final_adapter, fmrilm_cv, parse_shots

        shots = parse_shots(cfg.shots)
        settings = AdaptSettings(steps=cfg.adapt_steps, validation=cfg.adapt_validation, seed=cfg.seed,
                                 device=cfg.device, quantization=cfg.quantization)
        fm_result = fmrilm_cv(cfg.model, meta, cfg.label, labels.task_type, classes, pids, y, folds, runs, shots, settings)
        preds.update(fm_result.predictions)
        final_adapter(cfg.model, meta, group / f"{stem}_adapter", cfg.label, labels.task_type, classes, pids, y, runs,
                      shots[-1] if shots else None, settings)
    fold_of = np.empty(len(pids), int)
    for k, (_, test) in enumerate(folds.splits):
        fold_of[test] = k
    out = pd.DataFrame({"participant_id": [f"sub-{p}" for p in pids], "fold": fold_of, cfg.label: y})
    if labels.groups is not None:
        out[labels.groups.name] = labels.groups.to_numpy()
    rows = []
    for method, pred in preds.items():
        if classes:
            for j, c in enumerate(classes):
                out[f"{method}_p_{c}"] = pred[:, j]
            out[f"{method}_prediction"] = np.asarray(classes)[np.argmax(pred, axis=1)]
        else:
            out[f"{method}_prediction"] = pred
        m = metrics(y, pred, classes)
        ci = bootstrap_ci(y, pred, classes, seed=cfg.seed)
        wf, wf_ci = within_fold_auroc(y, pred, classes, folds, seed=cfg.seed)
        if np.isfinite(wf):
            m["auroc_within_fold"], ci["auroc_within_fold"] = wf, wf_ci
        for k, v in m.items():
            rows.append({"method": method, "metric": k, "value": v,
                         "ci_low": ci.get(k, [np.nan])[0], "ci_high": ci.get(k, [np.nan, np.nan])[1]})
    write_tsv(group / f"{stem}_predictions.tsv", out)
    mt = pd.DataFrame(rows)
    write_tsv(group / f"{stem}_metrics.tsv", mt, float_format="%.4f")
    result = {
        "Label": cfg.label, "TaskType": labels.task_type, "Classes": classes,
        "Participants": len(pids), "Excluded": labels.excluded, "WithoutOutputs": no_data,
        "Folds": len(folds.splits), "GroupedBy": folds.grouping, "Seed": cfg.seed,
        "Features": f"Fisher-z FC upper triangle ({X.shape[1]} values) averaged over runs",
        "Metrics": {m: {r["metric"]: [r["value"], r["ci_low"], r["ci_high"]] for r in rows if r["method"] == m}
                    for m in preds},
    }
    if fm_result is not None:
        curve = learning_curve(mt, fm_result.adaptation)
        write_tsv(group / f"{stem}_learningcurve.tsv", curve, float_format="%.4f")
        result.update({
            "Model": {"Path": str(cfg.model), "ID": meta.get("id")},
            "Prompt": fm_result.prompt.to_dict() if fm_result.prompt else "regression: quantile bins of each fold's targets",
            "Shots": cfg.shots, "AdaptationSteps": cfg.adapt_steps, "AdaptationValidation": cfg.adapt_validation,
            "Adaptation": fm_result.adaptation,
            "Adapter": f"{stem}_adapter",
        })
    write_json(group / f"{stem}_metrics.json", json_safe(result))
    for m in preds:
        log.info("%s %s: %s", cfg.label, m, ", ".join(f"{r['metric']} {r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
                                                  for r in rows if r["method"] == m))
    return result


def _token_runs(cfg: Config, pids: list[str]):
    """Token runs per participant and the checkpoint's metadata (hashes checked once, here) when
    an fMRI-LM checkpoint is in use, else ``(None, None)``."""
    if not cfg.model:
        return None, None
    from ..model.checkpoint import is_checkpoint, read_meta
    from .fewshot import read_token_runs

    if not is_checkpoint(cfg.model):
        log.warning("--model %s is not an fMRI-LM checkpoint: the fMRI-LM methods are skipped", cfg.model)
        return None, None
    meta = read_meta(cfg.model)
    runs = read_token_runs(cfg.output_dir, pids, cfg.model, meta)
    if not runs:
        log.warning("no fMRI-LM tokens in %s (participant level run with --model none?): the fMRI-LM methods are "
                    "skipped", cfg.output_dir)
        return None, None
    return runs, meta


def learning_curve(metrics_table: pd.DataFrame, adaptation: list[dict]) -> pd.DataFrame:
    """One row per (K, metric): few-shot value with its interval and mean training participants."""
    ad = pd.DataFrame(adaptation)
    rows = []
    for k, grp in ad.groupby("shots", sort=False):
        m = metrics_table[metrics_table["method"] == f"fmrilm_fewshot_{k}"]
        for _, r in m.iterrows():
            rows.append({"shots": k, "training_participants": float(grp["participants"].mean()),
                         "metric": r["metric"], "value": r["value"], "ci_low": r["ci_low"], "ci_high": r["ci_high"]})
    return pd.DataFrame(rows, columns=["shots", "training_participants", "metric", "value", "ci_low", "ci_high"])


def json_safe(obj):
    """Replace NaN/inf by None so the JSON is standard."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj

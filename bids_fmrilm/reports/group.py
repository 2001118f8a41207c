"""``group/group.html``: the group report, built from the files the group level wrote.

Sections: run QC (``qc_runs.tsv``), then per analysed label (``label-<L>_metrics.json``) the
metrics of every method with bootstrap intervals, ROC curves (binary labels), confusion matrices
of the best few-shot adapter and the FC baseline (classification) or predicted-vs-true scatter
(regression), and the few-shot learning curve over K against the baselines. Figures are inline
SVG; the page has no external dependency and is rewritten only when its bytes change.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from ..bids.writer import read_json
from .participant import CSS, _fig_to_svg, _plt, _table, _write_if_changed

METHOD_NAMES = {"chance": "chance (training-fold prior)", "fc_linear": "linear model on FC",
                "fmrilm_zeroshot": "fMRI-LM zero-shot", "fmrilm_embedding_probe": "linear probe on fMRI-LM embeddings",
                "fmrilm_encoder_probe": "linear probe on the fMRI-LM encoder's run representation"}


def method_name(m: str) -> str:
    if m.startswith("fmrilm_fewshot_"):
        return f"fMRI-LM few-shot LoRA, K={m.rsplit('_', 1)[1]}"
    return METHOD_NAMES.get(m, m)


def _fewshot_methods(methods: list[str]) -> list[str]:
    return [m for m in methods if m.startswith("fmrilm_fewshot_")]


def roc_figure(pred: pd.DataFrame, label: str, classes: list[str], methods: list[str]) -> bytes:
    from sklearn.metrics import roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    pos = pred[label].astype(str).to_numpy() == classes[1]
    for m in methods:
        col = f"{m}_p_{classes[1]}"
        if col not in pred or m == "chance":
            continue
        fpr, tpr, _ = roc_curve(pos, pred[col].to_numpy())
        ax.plot(fpr, tpr, lw=1.4, label=method_name(m))
    ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls="--", label="chance")
    ax.set_xlabel(f"false positive rate ({classes[0]} called {classes[1]})")
    ax.set_ylabel(f"true positive rate ({classes[1]})")
    ax.legend(fontsize=6.5, loc="lower right")
    ax.set_title(f"ROC, out-of-fold ({classes[1]} positive)", fontsize=9)
    return _fig_to_svg(fig)


def confusion_figure(pred: pd.DataFrame, label: str, classes: list[str], methods: list[str]) -> bytes:
    from sklearn.metrics import confusion_matrix

    plt = _plt()
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.0), squeeze=False)
    for ax, m in zip(axes[0], methods):
        cm = confusion_matrix(pred[label].astype(str), pred[f"{m}_prediction"].astype(str), labels=classes)
        ax.imshow(cm, cmap="Blues")
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="#000" if cm[i, j] < cm.max() / 2 else "#fff")
        ax.set_xticks(range(len(classes)), classes, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(method_name(m), fontsize=8)
    return _fig_to_svg(fig)


def scatter_figure(pred: pd.DataFrame, label: str, methods: list[str]) -> bytes:
    plt = _plt()
    fig, axes = plt.subplots(1, len(methods), figsize=(3.3 * len(methods), 3.2), squeeze=False)
    y = pred[label].to_numpy(float)
    for ax, m in zip(axes[0], methods):
        ax.scatter(y, pred[f"{m}_prediction"].to_numpy(float), s=8, alpha=0.7)
        lo, hi = float(np.min(y)), float(np.max(y))
        ax.plot([lo, hi], [lo, hi], color="#999", lw=0.8, ls="--")
        ax.set_xlabel(f"true {label}")
        ax.set_ylabel("predicted (out-of-fold)")
        ax.set_title(method_name(m), fontsize=8)
    return _fig_to_svg(fig)


def learning_curve_figure(curve: pd.DataFrame, metrics: pd.DataFrame, metric: str) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    c = curve[curve["metric"] == metric]
    x = np.arange(len(c))
    ax.errorbar(x, c["value"], yerr=[c["value"] - c["ci_low"], c["ci_high"] - c["value"]], fmt="o-", capsize=3,
                label="fMRI-LM few-shot LoRA")
    ax.set_xticks(x, [f"K={k}\n({n:.0f} part.)" for k, n in zip(c["shots"], c["training_participants"])], fontsize=7)
    styles = {"fc_linear": "--", "fmrilm_zeroshot": ":", "fmrilm_embedding_probe": "-.", "fmrilm_encoder_probe": (0, (5, 1)), "chance": (0, (1, 3))}
    for m, ls in styles.items():
        row = metrics[(metrics["method"] == m) & (metrics["metric"] == metric)]
        if len(row) and np.isfinite(row["value"].iloc[0]):
            ax.axhline(row["value"].iloc[0], ls=ls, lw=1, color="#555" if m != "fc_linear" else "#c33", label=method_name(m))
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_xlabel("labelled participants per class used for adaptation")
    ax.legend(fontsize=6.5)
    ax.set_title("Learning curve (out-of-fold, 95 % bootstrap intervals)", fontsize=9)
    return _fig_to_svg(fig)


def _svg(data: bytes) -> str:
    text = data.decode()
    return text[text.index("<svg"):]


def _label_section(group: Path, js: Path) -> str:
    res = read_json(js) or {}
    stem = js.name[: -len("_metrics.json")]
    label = str(res.get("Label", stem))
    parts = [f"<h2>Label: {html.escape(label)} ({html.escape(str(res.get('TaskType')))})</h2>",
             f"<p class='meta'>{res.get('Participants')} participants, {res.get('Folds')} folds grouped by "
             f"{html.escape(str(res.get('GroupedBy')))}, seed {res.get('Seed')}; excluded without a label: "
             f"{len(res.get('Excluded') or [])}; without outputs: {len(res.get('WithoutOutputs') or [])}.</p>"]
    if res.get("Model"):
        parts.append(f"<p class='meta'>fMRI-LM {html.escape(str(res['Model'].get('ID')))}, adapter trained on every "
                     f"labelled participant: <code>{html.escape(str(res.get('Adapter')))}/</code> (use with "
                     "<code>participant --adapter</code>).</p>")
    mt_path, pred_path = group / f"{stem}_metrics.tsv", group / f"{stem}_predictions.tsv"
    if not (mt_path.is_file() and pred_path.is_file()):
        return "".join(parts)
    mt = pd.read_csv(mt_path, sep="\t")
    wide = mt.assign(cell=[f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in zip(mt["value"], mt["ci_low"], mt["ci_high"])])
    wide = wide.pivot(index="method", columns="metric", values="cell").reindex(list(dict.fromkeys(mt["method"])))
    wide.index = [method_name(m) for m in wide.index]
    wide.columns.name = None
    parts.append(_table(wide.reset_index(names="method")))
    pred = pd.read_csv(pred_path, sep="\t", dtype={label: str} if res.get("Classes") else None)
    methods = list(dict.fromkeys(mt["method"]))
    few = _fewshot_methods(methods)
    if res.get("Classes"):
        classes = [str(c) for c in res["Classes"]]
        if len(classes) == 2:
            parts.append(_svg(roc_figure(pred, label, classes, methods)))
        shown = [m for m in (few[-1:] + ["fc_linear"]) if f"{m}_prediction" in pred]
        parts.append(_svg(confusion_figure(pred, label, classes, shown)))
        metric = "balanced_accuracy"
        if len(classes) == 2:  # the within-fold AUROC is free of fold offsets (see crossval.within_fold_auroc)
            metric = "auroc_within_fold" if (mt["metric"] == "auroc_within_fold").any() else "auroc"
    else:
        shown = [m for m in (few[-1:] + ["fc_linear"]) if f"{m}_prediction" in pred]
        parts.append(_svg(scatter_figure(pred, label, shown)))
        metric = "pearson_r"
    curve_path = group / f"{stem}_learningcurve.tsv"
    if curve_path.is_file():
        curve = pd.read_csv(curve_path, sep="\t", dtype={"shots": str})
        if len(curve):
            parts.append(_svg(learning_curve_figure(curve, mt, metric)))
    return "".join(parts)


def build_group_report(output_dir: Path) -> Path | None:
    """Write ``group/group.html`` from ``group/qc_runs.tsv`` and every ``label-*_metrics.json``."""
    group = Path(output_dir) / "group"
    qc_path = group / "qc_runs.tsv"
    if not qc_path.is_file():
        return None
    qc = pd.read_csv(qc_path, sep="\t")
    summary = (read_json(group / "qc_runs.json") or {}).get("Summary", {})
    body = ["<h1>bids_fmrilm group report</h1>",
            f"<p>{summary.get('Runs', len(qc))} runs of {summary.get('Participants', qc['participant_id'].nunique())} "
            f"participants; repetition times {summary.get('RepetitionTimes')}; median volumes "
            f"{summary.get('MedianVolumes')}; mean FD {summary.get('MeanFD')}.</p>",
            "<h2>Run QC</h2>",
            _table(qc[["participant_id", "run", "volumes", "repetition_time", "n_rois", "rois_without_voxels",
                       "rois_without_signal", "mean_fd"]].head(200))]
    if len(qc) > 200:
        body.append(f"<p class='meta'>{len(qc) - 200} more rows in qc_runs.tsv</p>")
    for js in sorted(group.glob("label-*_metrics.json")):
        body.append(_label_section(group, js))
    doc = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>bids_fmrilm group</title>"
           f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    return _write_if_changed(group / "group.html", doc.encode())

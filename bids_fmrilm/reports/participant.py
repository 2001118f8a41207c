"""``sub-<label>.html``: the participant report, built from what the participant level wrote.

Like MRIQC's reports, it reads the derivative files (never recomputes): per run a carpet plot of
the ROI series, the FC matrix ordered by network, the token timeline, the descriptor table with
z-scores and text, and, when the fMRI-LM ran, the generated description, the predictions with
their probabilities and the forecast of the held-back patch against what was observed. Figures
are SVG files under ``sub-<label>/figures/``; the HTML has no external dependency.
"""

from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..bids.writer import read_json, write_bytes


def _write_if_changed(path: Path, data: bytes) -> Path:
    """Atomic write, skipped when the file already holds these bytes (a re-run changes nothing)."""
    try:
        if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
            return path
    except OSError:
        pass
    return write_bytes(path, data)


def _fig_to_svg(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return buf.getvalue().encode()


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "bids_fmrilm"  # identical SVGs across runs
    return plt


def _network_order(out: Path, atlas: str, columns: list[str]) -> tuple[np.ndarray, list[str]]:
    table = out / f"atlas-{atlas}_dseg.tsv"
    nets = ["n/a"] * len(columns)
    if table.is_file():
        t = pd.read_csv(table, sep="\t", dtype=str, keep_default_na=False)
        if "network" in t and "name" in t:
            by = dict(zip(t["name"], t["network"]))
            nets = [by.get(c, "n/a") or "n/a" for c in columns]
    order = np.array(sorted(range(len(columns)), key=lambda i: (nets[i], i)))
    return order, [nets[i] for i in order]


def carpet_figure(ts: np.ndarray, nets: list[str], tr: float) -> bytes:
    plt = _plt()
    z = (ts - ts.mean(0)) / np.where(ts.std(0) > 0, ts.std(0), 1)
    fig, ax = plt.subplots(figsize=(9, 3.2))
    ax.imshow(z.T, aspect="auto", cmap="gray", vmin=-2.5, vmax=2.5, interpolation="nearest",
              extent=(0, len(ts) * tr, len(nets), 0))
    _network_ticks(ax, nets)
    ax.set_xlabel("time (s)")
    ax.set_title("ROI time series (z-scored per ROI, ordered by network)", fontsize=9)
    return _fig_to_svg(fig)


def _network_ticks(ax, nets: list[str], axis: str = "y") -> None:
    bounds, labels, start = [], [], 0
    for i in range(1, len(nets) + 1):
        if i == len(nets) or nets[i] != nets[start]:
            bounds.append(i)
            labels.append(((start + i) / 2, nets[start]))
            start = i
    if len(labels) > 1:
        ticks, names = zip(*labels)
        if axis in ("y", "both"):
            ax.set_yticks(ticks)
            ax.set_yticklabels(names, fontsize=6)
            for b in bounds[:-1]:
                ax.axhline(b - 0.5, color="tab:red", lw=0.4)
        if axis == "both":
            ax.set_xticks(ticks)
            ax.set_xticklabels(names, fontsize=6, rotation=90)
            for b in bounds[:-1]:
                ax.axvline(b - 0.5, color="tab:red", lw=0.4)


def fc_figure(ts: np.ndarray, nets: list[str]) -> bytes:
    plt = _plt()
    with np.errstate(all="ignore"):
        fc = np.nan_to_num(np.corrcoef(ts.T))
    np.fill_diagonal(fc, 0)
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    im = ax.imshow(fc, cmap="RdBu_r", vmin=-0.8, vmax=0.8, interpolation="nearest")
    _network_ticks(ax, nets, "both")
    fig.colorbar(im, ax=ax, shrink=0.7, label="Pearson r")
    ax.set_title("Functional connectivity, ordered by network", fontsize=9)
    return _fig_to_svg(fig)


def token_figure(tokens: np.ndarray, nets: list[str], patch_seconds: float) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 3.0))
    ax.imshow(tokens.T, aspect="auto", cmap="tab20b", interpolation="nearest",
              extent=(0, tokens.shape[0] * patch_seconds, tokens.shape[1], 0))
    _network_ticks(ax, nets)
    ax.set_xlabel("time (s)")
    ax.set_title(f"fMRI tokens (codebook index per ROI and {patch_seconds:g}-s patch)", fontsize=9)
    return _fig_to_svg(fig)


def forecast_figure(df: pd.DataFrame, tr: float) -> bytes:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 2.8), gridspec_kw={"width_ratios": [2, 1]})
    rois = list(dict.fromkeys(df["roi"]))[:4]
    for k, r in enumerate(rois):
        d = df[df["roi"] == r]
        t = d["volume"].to_numpy() * tr
        axes[0].plot(t, d["observed"].to_numpy() + 3 * k, color="k", lw=1)
        axes[0].plot(t, d["predicted"].to_numpy() + 3 * k, color="tab:orange", lw=1, ls="--")
    axes[0].set_yticks([3 * k for k in range(len(rois))])
    axes[0].set_yticklabels(rois, fontsize=6)
    axes[0].set_xlabel("time (s)")
    axes[0].set_title("held-back patch: observed (black) vs forecast (orange)", fontsize=9)
    axes[1].scatter(df["observed"], df["predicted"], s=2, alpha=0.4)
    lim = float(np.nanmax(np.abs(df[["observed", "predicted"]].to_numpy()))) or 1.0
    axes[1].plot([-lim, lim], [-lim, lim], color="gray", lw=0.6)
    axes[1].set_xlabel("observed")
    axes[1].set_ylabel("forecast")
    axes[1].set_title("all ROIs", fontsize=9)
    fig.tight_layout()
    return _fig_to_svg(fig)


def _fd(v: Any) -> str:
    try:
        return f"{float(v):.3f} mm"
    except (TypeError, ValueError):
        return "n/a"


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, border=0, classes="t", float_format=lambda v: f"{v:.3f}", na_rep="n/a")


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-top:1em}h3{font-size:1em}
table.t{border-collapse:collapse;font-size:.85em;margin:.5em 0}table.t td,table.t th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left}
.text{background:#f6f6f6;padding:.7em;border-left:3px solid #69c;font-size:.9em}
img{max-width:100%}.meta{color:#666;font-size:.8em}.warn{color:#a40}"""


def _descriptor_table(feat: dict[str, Any], n: int = 15) -> pd.DataFrame:
    from ..descriptors.text import CORE_FEATURES, feature_subject

    z = feat.get("ZScores") or {}
    vals = feat.get("Features") or {}
    levels = feat.get("Levels") or {}
    keys = [k for k in CORE_FEATURES if k in z]
    keys += sorted((k for k in z if k not in keys and z[k] is not None), key=lambda k: -abs(float(z[k])))[: max(0, n - len(keys))]
    return pd.DataFrame([{"descriptor": feature_subject(k), "value": vals.get(k), "z": z.get(k),
                          "level": str(levels.get(k, "")).replace("_", " ")} for k in keys])


def build_participant_report(out: Path, subject: str) -> Path | None:
    """Write ``sub-<subject>.html`` and its figures from the files under ``out/sub-<subject>``.

    Returns the report path, or None when the participant has no time series yet.
    """
    from ..signals.pipeline import read_roi_timeseries

    sub_dir = out / f"sub-{subject}"
    series = sorted(sub_dir.glob("**/func/*_timeseries.tsv.gz"))
    if not series:
        return None
    fig_dir = sub_dir / "figures"
    parts = [f"<h1>bids_fmrilm report: sub-{html.escape(subject)}</h1>"]
    model_ids = set()
    for ts_path in series:
        stem = ts_path.name[: -len("_timeseries.tsv.gz")]
        meta = read_json(ts_path.with_name(stem + "_timeseries.json")) or {}
        if not meta:
            continue  # incomplete run
        ts, columns = read_roi_timeseries(ts_path)
        atlas = str(meta.get("Atlas", ""))
        atlas_ent = next((p.split("-", 1)[1] for p in stem.split("_") if p.startswith("atlas-")), atlas)
        tr = float(meta.get("RepetitionTime", 2.0))
        order, nets = _network_order(out, atlas_ent, columns)
        ts_o = ts[:, order]
        base = stem.replace(f"_atlas-{atlas_ent}", "")
        figs: list[tuple[str, str]] = []

        def fig(name: str, data: bytes, caption: str) -> None:
            path = fig_dir / f"{stem}_desc-{name}_figure.svg"
            _write_if_changed(path, data)
            figs.append((path.relative_to(out).as_posix(), caption))

        fig("carpet", carpet_figure(ts_o, nets, tr), "Carpet plot")
        fig("fc", fc_figure(ts_o, nets), "Connectivity")
        parts.append(f"<h2>{html.escape(base)}</h2><p class='meta'>atlas {html.escape(atlas_ent)}, "
                     f"{ts.shape[1]} ROIs, {ts.shape[0]} volumes at TR {tr:g} s; "
                     f"mean FD {_fd(meta.get('MeanFramewiseDisplacement'))}</p>")
        feat = read_json(ts_path.with_name(f"{stem}_desc-descriptors_features.json"))
        tok_path = ts_path.with_name(f"{stem}_desc-fmrilm_tokens.tsv.gz")
        tok_meta = read_json(ts_path.with_name(f"{stem}_desc-fmrilm_tokens.json"))
        if tok_meta and tok_path.is_file():
            tokens = pd.read_csv(tok_path, sep="\t").to_numpy()[:, order]
            fig("tokens", token_figure(tokens, nets, float(tok_meta.get("PatchSeconds", 16))), "Tokens")
            model_ids.add(tok_meta.get("ModelID"))
        fc_path = ts_path.with_name(f"{stem}_desc-fmrilm_forecast.tsv.gz")
        fc_meta = read_json(ts_path.with_name(f"{stem}_desc-fmrilm_forecast.json"))
        if fc_meta and fc_path.is_file():
            fig("forecast", forecast_figure(pd.read_csv(fc_path, sep="\t"), tr), "Forecast")
        for src, cap in figs:
            parts.append(f"<h3>{cap}</h3><img src='{html.escape(src)}' alt='{cap}'>")
        if fc_meta:
            parts.append(f"<p class='meta'>forecast MSE {fc_meta['MSE']:.3f} (predict the median: "
                         f"{fc_meta['BaselineMSEZero']:.3f}; repeat the previous patch: "
                         f"{fc_meta['BaselineMSEPersistence']:.3f}); token accuracy {fc_meta['TokenAccuracy']:.3f}</p>")
        if feat:
            parts.append("<h3>Descriptors (z-scores against the reference)</h3>")
            parts.append(f"<div class='text'>{html.escape(str(feat.get('Text', '')))}</div>")
            parts.append(_table(_descriptor_table(feat)))
        desc = read_json(ts_path.with_name(f"{stem}_desc-fmrilm_description.json"))
        if desc:
            parts.append("<h3>Generated description (fMRI-LM)</h3>"
                         f"<div class='text'>{html.escape(str(desc.get('Text', '')))}</div>")
        pred_path = ts_path.with_name(f"{stem}_desc-fmrilm_predictions.tsv")
        if pred_path.is_file():
            pred = pd.read_csv(pred_path, sep="\t")
            pcols = [c for c in pred.columns if c.startswith("p_")]
            pred["probabilities"] = [", ".join(f"{c[2:]} {row[c]:.2f}" for c in pcols if pd.notna(row[c]))
                                     for _, row in pred.iterrows()]
            parts.append("<h3>Zero-shot predictions (research use, not diagnoses)</h3>")
            parts.append(_table(pred[["task", "prediction", "probability", "probabilities"]]))
    if model_ids:
        parts.insert(1, f"<p class='meta'>model {html.escape(', '.join(sorted(map(str, model_ids))))}</p>")
    doc = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
           f"<title>sub-{html.escape(subject)}</title><style>{CSS}</style></head><body>"
           + "\n".join(parts) + "</body></html>\n")
    path = out / f"sub-{subject}.html"
    _write_if_changed(path, doc.encode())
    return path

"""Compare the held-out figures of two checkpoints (e.g. the packaged default and a retraining).

Each figure of the model card (tokenizer: reconstruction R², codebook usage, perplexity, fMRI→text
recall; stages 2 and 3: next-patch token accuracy, task AUROC or balanced accuracy, description
agreement) is set beside the other checkpoint's, with the noise a second training on the same
held-out runs would show: the sampling standard error of the figure (Hanley & McNeil for AUROC,
binomial for proportions and for each class's recall in a balanced accuracy). Two independent estimates differ by up to ``2·√2·SE`` (95 %); a
difference inside that band reproduces within noise. Figures without a sampling error (R²,
perplexity, codebook usage, token accuracy over ~3·10⁵ correlated tokens) are reported with
their relative difference only.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd


def _se_auroc(a: float, n_pos: int, n_neg: int) -> float:
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    return math.sqrt((a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg))


def _se_prop(p: float, n: float) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def heldout_figures(checkpoint: str | os.PathLike) -> dict[tuple[str, str], tuple[float, float | None]]:
    """``{(stage, figure): (value, standard error or None)}`` of a checkpoint's held-out metrics."""
    from .checkpoint import read_meta

    path = Path(checkpoint)
    meta = read_meta(path, verify=False, check_format=False)
    out: dict[tuple[str, str], tuple[float, float | None]] = {}
    tok_json = path / "tokenizer" / "tokenizer.json"
    tok = (json.loads(tok_json.read_text()).get("metrics") or {}).get("heldout") if tok_json.is_file() else None
    if tok:
        n = tok.get("n_runs", 0)
        out["tokenizer", "reconstruction R²"] = (tok["recon_r2"], None)
        out["tokenizer", "k-means R² (same-bits baseline)"] = (tok["kmeans_r2"], None)
        out["tokenizer", "codebook usage"] = (tok["codebook_usage"], None)
        out["tokenizer", "perplexity"] = (tok["perplexity"], None)
        for k in (1, 5):
            v = tok[f"recall_at_{k}"]
            out["tokenizer", f"fMRI→text recall@{k} among {tok.get('n_candidates')}"] = (v, _se_prop(v, n))
    for stage, m in (meta.get("metrics") or {}).items():
        if m.get("next_patch"):
            out[stage, "next-patch token accuracy"] = (m["next_patch"]["token_accuracy"], None)
        for task, t in (m.get("tasks") or {}).items():
            fm, counts = t.get("fmrilm", {}), list(t.get("class_counts", {}).values())
            if "auroc" in fm and len(counts) == 2 and min(counts) > 0:
                out[stage, f"{task} AUROC"] = (fm["auroc"], _se_auroc(fm["auroc"], counts[1], counts[0]))
            elif "balanced_accuracy" in fm and any(counts):
                # the mean of per-class recalls: binomial errors of each class's recall (taken at the mean)
                v, present = fm["balanced_accuracy"], [c for c in counts if c > 0]
                se = math.sqrt(sum(_se_prop(v, c) ** 2 for c in present)) / len(present)
                out[stage, f"{task} balanced accuracy"] = (v, se)
        d = m.get("descriptions")
        if d:
            out[stage, "description level agreement"] = (d["agreement"], _se_prop(d["agreement"], d["statements"]))
    return out


def compare_checkpoints(a: str | os.PathLike, b: str | os.PathLike) -> pd.DataFrame:
    """One row per held-out figure both checkpoints have: values, difference, noise band, verdict.

    Columns: ``stage``, ``figure``, ``a``, ``b``, ``difference`` (b − a), ``noise`` (``2·√2·SE`` of
    a's figure, NaN without a sampling error), ``within_noise`` (True/False, None without one).
    """
    fa, fb = heldout_figures(a), heldout_figures(b)
    rows: list[dict[str, Any]] = []
    for key, (va, se) in fa.items():
        if key not in fb:
            continue
        vb = fb[key][0]
        noise = 2 * math.sqrt(2) * se if se is not None else float("nan")
        rows.append({"stage": key[0], "figure": key[1], "a": va, "b": vb, "difference": vb - va, "noise": noise,
                     "within_noise": bool(abs(vb - va) <= noise) if se is not None else None})
    return pd.DataFrame(rows, columns=["stage", "figure", "a", "b", "difference", "noise", "within_noise"])


def markdown(table: pd.DataFrame, a_name: str = "a", b_name: str = "b") -> str:
    """The comparison as a Markdown table."""
    lines = [f"| stage | figure | {a_name} | {b_name} | difference | noise (2·√2·SE) | within noise |",
             "|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        verdict = {True: "yes", False: "**no**", None: "n/a"}[r.within_noise]
        noise = "n/a" if math.isnan(r.noise) else f"{r.noise:.3f}"
        lines.append(f"| {r.stage} | {r.figure} | {r.a:.4f} | {r.b:.4f} | {r.difference:+.4f} | {noise} | {verdict} |")
    return "\n".join(lines)


def _click_command():
    import click

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.argument("checkpoint_a", type=click.Path(exists=True, file_okay=False, path_type=Path))
    @click.argument("checkpoint_b", type=click.Path(exists=True, file_okay=False, path_type=Path))
    @click.option("--check", is_flag=True, help="Exit with 1 when a figure with a sampling error differs beyond noise.")
    def compare_models_command(checkpoint_a: Path, checkpoint_b: Path, check: bool) -> None:
        """Held-out figures of CHECKPOINT_A and CHECKPOINT_B side by side, with the noise band
        (e.g. the packaged default model and a run of scripts/train_default_model.sh)."""
        from .checkpoint import read_meta

        table = compare_checkpoints(checkpoint_a, checkpoint_b)
        ids = [str(read_meta(p, verify=False, check_format=False).get("id")) for p in (checkpoint_a, checkpoint_b)]
        click.echo(markdown(table, f"A `{ids[0]}`", f"B `{ids[1]}`"))
        outside = int((table["within_noise"] == False).sum())  # noqa: E712 (None = no sampling error)
        with_se = int(table["within_noise"].notna().sum())
        click.echo(f"\n{with_se - outside} of {with_se} figures with a sampling error agree within noise; "
                   f"{len(table) - with_se} without one (compare their values).")
        if check and outside:
            raise SystemExit(1)

    return compare_models_command


compare_models_command = _click_command()

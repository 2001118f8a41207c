"""Model card (``README.md``) of an fMRI-LM checkpoint, written from its ``fmrilm.json``."""

from __future__ import annotations

import json
from typing import Any

from .calibration import READOUT_ALONE, UNSEEN


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _metric_rows(metrics: dict[str, Any]) -> list[str]:
    rows = []
    for stage, m in metrics.items():
        np_ = m.get("next_patch")
        if np_:
            rows.append(f"| {stage} | next-patch token accuracy | {_fmt(np_['token_accuracy'])} | most frequent token "
                        f"{_fmt(np_['most_frequent_token'])}; per ROI {_fmt(np_['most_frequent_token_per_roi'])}; "
                        f"repeat previous {_fmt(np_['repeat_previous_patch'])} |")
        for name, t in (m.get("tasks") or {}).items():
            fm = t.get("fmrilm", {})
            fc = t.get("fc_logistic", {})
            key = "auroc" if "auroc" in fm else "balanced_accuracy"
            parts = [(label, t.get(k, {}).get(key)) for label, k in (
                ("uncalibrated", "fmrilm_uncalibrated"), ("LLM alone, calibrated", "fmrilm_llm_calibrated"),
                ("readout score alone", "readout_score"))]
            rows.append(f"| {stage} | {name} {key} (n={t['n']}) | {_fmt(fm.get(key))} | FC logistic "
                        f"{_fmt(fc.get(key, 'n/a'))}; majority accuracy {_fmt(t.get('majority_accuracy'))}"
                        + "".join(f"; {label} {_fmt(v)}" for label, v in parts if v is not None) + " |")
        d = m.get("descriptions")
        if d:
            rows.append(f"| {stage} | description level agreement ({d['statements']} statements) | "
                        f"{_fmt(d['agreement'])} | another run's levels {_fmt(d['agreement_other_run'])}; "
                        f"always typical {_fmt(d['agreement_always_typical'])}"
                        + (f"; unguided decoding {_fmt(d['unguided']['agreement'])}" if d.get("unguided") else "")
                        + " |")
    return rows


def model_card(meta: dict[str, Any]) -> str:
    """Markdown model card: data and licence terms, intended use, inputs, held-out metrics."""
    tr = meta.get("training", {})
    base = meta.get("base_llm", {})
    atlas = meta.get("atlas", {})
    lines = [
        f"# fMRI-LM checkpoint `{meta.get('id', '')}` (stage: {meta.get('stage', '?')})",
        "",
        "A causal language model that reads fMRI tokens and text (bids_fmrilm; after fMRI-LM, arXiv 2511.21760).",
        "",
        "## Intended use",
        "Research on resting-state fMRI: run-level descriptions, embeddings, zero-shot predictions and",
        "forecasts, and few-shot adaptation to a study's own labels. **Not for clinical use**: predictions",
        "of sex, age group or diagnosis are research outputs with the held-out accuracy below, not diagnoses.",
        "",
        "## Inputs",
        f"- Atlas: {atlas.get('name', '?')} ({len(atlas.get('coords', []))} ROIs); other atlases with MNI centroids work",
        "  through the tokenizer's coordinate embeddings, with unmeasured accuracy.",
        f"- Repetition time: {meta.get('tr')} s (runs are resampled to it); patch length {meta.get('patch_len')} volumes.",
        f"- Scaling: {json.dumps(meta.get('scaling'))}",
        f"- Base LLM: `{base.get('id')}` (sha256 prefix {base.get('hash')}), referenced, not copied.",
        "",
        "## Training data",
        f"- Corpus: {tr.get('pretrain', {}).get('corpus', tr.get('instruct', {}).get('corpus', '?'))}",
        f"- Training sites: {', '.join(tr.get('train_sites', []))}",
        f"- Held-out sites (never trained on): {', '.join(tr.get('heldout_sites', []))} ({tr.get('n_heldout_runs')} runs)",
        "- ABIDE data are shared for non-commercial research under the ABIDE/1000 Functional Connectomes",
        "  terms (CC BY-NC-SA); a model trained on them inherits those terms.",
        "",
        "## Training",
    ]
    for stage in ("pretrain", "instruct"):
        s = tr.get(stage)
        if s:
            lines.append(f"- {stage}: {s['steps']} steps, {s['n_train_runs']} runs, seed {s['seed']}, "
                         f"{s['train_wall_s']} s on {s['device']} (quantization {s['quantization']})")
    ro = meta.get("readout")
    if ro:
        cf = ro.get("crossfit") or {}
        shown = [f"{n} {k} {_fmt(v)}" for n, d in cf.items() for k, v in d.items()
                 if not n.startswith("z:") or n.split(":", 1)[1] in {"fc_within.mean", "fc_between.mean"}]
        lines += ["", "## Run readout",
                  f"The LLM reads one position carrying the run readout: {ro.get('n_components')} whitened principal",
                  f"components of the tokenizer's run vector and {ro.get('values', 0) - ro.get('n_components', 0)} linear "
                  "scores (phenotype log-odds, age, descriptor z-scores),",
                  f"fitted on {ro.get('n_train_runs')} training runs of {ro.get('n_sites')} sites and frozen "
                  "(model/readout.py). Leave-one-site-out figures of the scores on the training sites: "
                  + ("; ".join(shown) if shown else "n/a") + "."]
        alone = sorted(n for n, v in (ro.get("features") or {}).items() if v == "signal")
        if len(ro.get("feature_sets") or {}) > 1:
            lines.append(f"Each score reads every feature or the signal statistics alone, whichever generalised better "
                         f"across the training sites: {len(alone)} of {len(ro.get('features') or {})} read the signal "
                         "statistics alone" + (f" (among them {', '.join(alone[:8])})" if alone else "") + ".")
        if ro.get("components_from"):
            lines.append("The scores were refitted after training on more signal statistics per region than the "
                         f"{ro['components_from'].get('n_features')} features the LLM was trained with; the principal "
                         "components it learned to read were kept.")
    cal = meta.get("calibration") or {}
    if cal:
        lines += ["", "## Answer calibration",
                  "Zero-shot answers are calibrated (model/calibration.py): per task one temperature and one offset per",
                  "answer, fitted class-balanced on the model's own answers of training runs "
                  f"({max(c.get('n', 0) for c in cal.values())} runs at most"
                  + (f"; {sum(c.get('fitted_on') == UNSEEN for c in cal.values())} of {len(cal)} tasks on answers "
                     "training never showed the LLM, replayed from the training record"
                     if any("fitted_on" in c for c in cal.values()) else "")
                  + (f"; {n_alone} on the readout's score alone, cross-fitted by site: the LLM read every "
                     "training site, so its unseen answers cannot show how it does on a new one"
                     if (n_alone := sum(c.get("fitted_on") == READOUT_ALONE for c in cal.values())) else "") + ")"
                  + (", fused with the run readout's own score of the task (late fusion, one fitted weight; the "
                     "held-out rows show the LLM alone and the readout score alone)"
                     if any(c.get("weight") and c.get("fitted_on") != READOUT_ALONE for c in cal.values()) else "")
                  + ": "
                  + "; ".join(f"{n} scale {c['scale']:.2f}" + (f", readout weight {c['weight']:+.2f}" if c.get("weight")
                                                                 else "")
                              + (" (readout alone: " + ((c.get("selection") or {}).get("reason")
                                                         or "the unseen answers did not support the LLM's") + ")"
                                 if (c.get("selection") or {}).get("chosen") == "checkpoint" else "")
                              for n, c in sorted(cal.items())) + "."]
    lines += ["", "## Held-out metrics (site-disjoint)", ""]
    rows = _metric_rows(meta.get("metrics", {}))
    if rows:
        lines += ["| stage | metric | fMRI-LM | baselines (same split) |", "|---|---|---|---|", *rows]
    else:
        lines.append("No held-out evaluation was run.")
    lines += ["", "## Information gates (held-out sites, beside FC logistic regression on the same split)", ""]
    from .gates import gate_table, gates_passed, information_gates

    gates = information_gates(meta)
    lines += [*gate_table(gates), "",
              "All gates pass." if gates_passed(gates) else "Not every gate passes (or was measured): read the "
              "figures above as what this checkpoint carries, not as a validated model."]
    lines += ["", "## Tasks (constrained answers)", ""]
    for t in meta.get("tasks", []):
        lines.append(f"- `{t['name']}`: {t['question']} — answers: {', '.join(t['answers'])}")
    return "\n".join(lines) + "\n"

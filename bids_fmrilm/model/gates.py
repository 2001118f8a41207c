"""Information gates of an fMRI-LM checkpoint: does the model carry the brain's signal?

Four gates, all on the checkpoint's held-out sites, each beside the FC baseline of the same split:

1. a linear probe on the tokenizer's run representation reaches diagnosis AUROC >= logistic
   regression on FC (from the tokenizer's ``metrics.heldout.probe``);
2. the zero-shot answers of the last stage reach diagnosis and sex AUROC >= FC logistic and
   >= :data:`MIN_ZERO_SHOT_AUROC`;
3. every descriptor question (``desc:*``) reaches balanced accuracy >= :data:`MIN_DESCRIPTOR_BACC`;
4. generated descriptions, as the participant level writes them (guided to state the levels of
   the model's own descriptor answers), state the run's levels with agreement >=
   :data:`MIN_AGREEMENT` and repeat no sentence; the unguided agreement is shown beside it.

:func:`information_gates` computes them from a checkpoint's metadata; the model card prints them
and the training commands store them in ``fmrilm.json`` (``gates``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

MIN_ZERO_SHOT_AUROC = 0.65
MIN_DESCRIPTOR_BACC = 0.80
MIN_AGREEMENT = 0.85
GATE_LABELS = ("diagnosis", "sex")


def repeated_sentences(text: str) -> int:
    """Number of sentences of ``text`` that repeat an earlier one (case and spacing ignored)."""
    seen, n = set(), 0
    for s in re.split(r"(?<=[.!?])\s+", text.strip()):
        key = " ".join(s.lower().split()).rstrip(".!?")
        if not key:
            continue
        n += key in seen
        seen.add(key)
    return n


def _ok(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _gate(number: int, name: str, value, threshold, baseline=None, passed=None, detail: str = "") -> dict:
    if passed is None:
        passed = _ok(value) and value >= max(t for t in (threshold, baseline) if _ok(t))
    return {"gate": number, "name": name, "value": value, "threshold": threshold, "fc_baseline": baseline,
            "passed": bool(passed) if _ok(value) else None, "detail": detail}


def information_gates(meta: dict[str, Any], tokenizer_meta: dict[str, Any] | None = None,
                      labels: Sequence[str] = GATE_LABELS) -> list[dict[str, Any]]:
    """The gates of a checkpoint (``fmrilm.json`` content) as rows.

    Each row: ``gate`` (1-4), ``name``, ``value``, ``threshold``, ``fc_baseline`` (same split, or
    None), ``passed`` (None when the figure was not measured) and ``detail``. ``tokenizer_meta``
    (the tokenizer's ``tokenizer.json``) defaults to ``meta["tokenizer"]``.
    """
    rows: list[dict[str, Any]] = []
    tok = (tokenizer_meta if tokenizer_meta is not None else meta.get("tokenizer")) or {}
    probe = (tok.get("metrics", {}).get("heldout", {}) or {}).get("probe") or tok.get("probe") or {}
    d = probe.get("diagnosis")
    rows.append(_gate(1, "linear probe on the run representation, diagnosis AUROC",
                      d.get("probe_auroc") if d else None, None, d.get("fc_logistic_auroc") if d else None))
    stages = meta.get("metrics", {})
    last = stages.get("instruct") or (list(stages.values())[-1] if stages else {})
    tasks = last.get("tasks", {}) if last else {}
    for label in labels:
        t = tasks.get(label, {})
        rows.append(_gate(2, f"zero-shot {label} AUROC", t.get("fmrilm", {}).get("auroc"), MIN_ZERO_SHOT_AUROC,
                          t.get("fc_logistic", {}).get("auroc")))
    for name, t in sorted(tasks.items()):
        if name.startswith("desc:"):
            v = t.get("fmrilm", {}).get("balanced_accuracy")
            # FC logistic is shown for reference; the gate is the absolute threshold
            rows.append(_gate(3, f"{name} balanced accuracy", v, MIN_DESCRIPTOR_BACC,
                              t.get("fc_logistic", {}).get("balanced_accuracy"),
                              passed=_ok(v) and v >= MIN_DESCRIPTOR_BACC))
    if not any(r["gate"] == 3 for r in rows):
        rows.append(_gate(3, "descriptor questions balanced accuracy", None, MIN_DESCRIPTOR_BACC))
    desc = (last or {}).get("descriptions") or {}
    rows.append(_gate(4, "description level agreement", desc.get("agreement"), MIN_AGREEMENT,
                      detail=(f"always typical {desc['agreement_always_typical']:.3f}"
                              + (f", unguided decoding {desc['unguided']['agreement']:.3f}" if desc.get("unguided") else ""))
                      if desc else ""))
    rep = desc.get("runs_with_repeated_sentences")
    rows.append(_gate(4, "descriptions with a repeated sentence", rep, 0,
                      passed=None if rep is None else rep == 0, detail=f"of {desc.get('n_runs')} runs" if desc else ""))
    return rows


def gates_passed(rows: list[dict[str, Any]]) -> bool:
    """True when every gate was measured and passed."""
    return all(r["passed"] for r in rows)


def gate_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table of gate rows."""
    def f(v):
        return f"{v:.3f}" if isinstance(v, float) else ("n/a" if v is None else str(v))

    out = ["| gate | figure | value | needs | FC logistic (same split) | passed |", "|---|---|---|---|---|---|"]
    for r in rows:
        need = ">= FC" if r["threshold"] is None else (f"== {r['threshold']}" if r["threshold"] == 0
                                                         else f">= {r['threshold']}")
        if r["gate"] == 2:
            need += " and >= FC"
        passed = {True: "yes", False: "**no**", None: "not measured"}[r["passed"]]
        out.append(f"| {r['gate']} | {r['name']} | {f(r['value'])} | {need} | {f(r['fc_baseline'])} | {passed} |")
    return out

"""Held-out evaluation of an fMRI-LM, each figure beside a baseline on the same split.

- Zero-shot classification (sex, diagnosis, age group): AUROC / balanced accuracy of the
  constrained-answer probabilities on held-out sites (calibrated when the checkpoint carries an
  answer calibration, the uncalibrated figures beside them) vs logistic regression on FC fitted
  on the training sites, and vs chance.
- Descriptor questions: accuracy vs the training sites' majority answer.
- Next-patch token accuracy (teacher forced) vs the most frequent training token, the most
  frequent token of each ROI, and repeating the previous patch's token.
- Generated descriptions: agreement of the levels they state with the run's true descriptor
  levels, vs the same statements scored against another held-out run's levels (chance) and vs
  always saying "typical". The figures are those of the descriptions as the participant level
  writes them (decoding guided to state the levels of the model's own descriptor answers); the
  unguided descriptions' figures are kept beside them (``descriptions.unguided``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..model.tasks import Task


def _task_metrics(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """The group level's metrics (:func:`~bids_fmrilm.levels.crossval.metrics`) of answer indices
    ``y`` against answer probabilities, plus accuracy. For three or more answers the one-vs-rest
    AUROC is stored as ``auroc_ovr`` (only when every answer occurs), so ``auroc`` always means a
    two-answer task (the model card shows it, else balanced accuracy)."""
    from ..levels.crossval import metrics

    if len(np.unique(y)) < 2:
        return {"auroc": float("nan"), "balanced_accuracy": float("nan")}
    answers = [str(k) for k in range(proba.shape[1])]
    out = metrics(np.asarray(y).astype(str), proba, answers)
    if len(answers) > 2:
        ovr = out.pop("auroc")
        if np.isfinite(ovr):
            out["auroc_ovr"] = ovr
    out["accuracy"] = float(np.mean(y == proba.argmax(1)))
    return out


def fc_logistic(fc_train: np.ndarray, y_train: np.ndarray, fc_test: np.ndarray, seed: int = 0) -> np.ndarray:
    """Class probabilities of the FC baseline (PCA + LogisticRegressionCV, fitted on training sites)."""
    from ..levels.crossval import linear_baseline

    model = linear_baseline("classification", y_train, seed=seed)
    model.fit(fc_train.astype(np.float32), y_train)
    proba = np.zeros((len(fc_test), int(y_train.max()) + 1))
    proba[:, model.classes_] = model.predict_proba(fc_test.astype(np.float32))
    return proba


READOUT_ONLY_SCALE = float(np.exp(-4.0))
"""The LLM answer's weight (calibration scale, the fit's lower bound) in a calibration that starts
from the readout's score alone."""

MIN_UNSEEN = 24
"""Fewest answers of a task the LLM never trained on for its calibration to be fitted on those
alone; with fewer, it is fitted on every scored training answer (and records so)."""


def _flat(n_runs: int, n_answers: int) -> np.ndarray:
    """Uniform answer probabilities: a calibration fitted on them reads the readout's score alone."""
    return np.full((n_runs, n_answers), 1.0 / n_answers)


def fit_answer_calibration(fm, tasks: Sequence[Task], data, idx: np.ndarray, roi: torch.Tensor,
                           readouts: np.ndarray | None = None, max_runs: int = 256, seed: int = 0,
                           log: Callable[[str], None] = print, exposed: np.ndarray | None = None) -> dict[str, dict]:
    """Answer calibration (:mod:`~bids_fmrilm.model.calibration`) of every task on training runs.

    Up to ``max_runs`` of the runs ``idx`` are scored zero-shot as at inference (their first
    patches, their cross-fitted readouts), and each task with at least two answers among them gets
    a calibration fitted on the runs that have an answer. Returns ``{task name: calibration}``.

    ``exposed`` (n_runs, n_tasks) bool, from :func:`~bids_fmrilm.training.lm.llm_exposure`: the
    answers training showed the LLM. Each task is then fitted on the answers the LLM never saw
    (when there are at least :data:`MIN_UNSEEN`), and the runs scored are those with the most
    such answers. A calibration fitted on memorised answers measures the LLM's in-sample
    confidence: it weighs the LLM's answer above the readout's score (whose training-run values
    are cross-fitted, so honest) and loses to the readout alone on sites the model never saw.
    A task the readout scores starts from the readout alone, calibrated on every answered run of
    ``idx``. The readout's training-run scores are cross-fitted leave-one-site-out, so they show
    how it does on a site it never saw; the LLM's answers of a site it trained on do not (an answer
    it never saw still comes from a site, a scanner and often a run it read). The LLM's answer
    therefore gets weight only from the unseen answers of sites whose runs training never showed
    the LLM at all, and only where participant-grouped cross-validation on them prefers a fit
    pulled towards the readout-alone start
    (:func:`~bids_fmrilm.model.calibration.refit_calibration`, recorded as ``selection``); with
    fewer than :data:`MIN_UNSEEN` such answers the readout alone is kept (``selection`` says why).
    Without ``exposed`` a seeded random subset of ``idx`` is scored and every task is fitted on
    its answers jointly.
    """
    from ..model.calibration import (READOUT_ALONE, UNSEEN, evidence_matrix, fit_calibration, fit_level_map,
                                     refit_calibration, task_evidence)
    from ..model.inference import score_tasks
    from .lm import make_block

    names = fm.readout.names if readouts is not None and getattr(fm, "readout", None) is not None else None
    idx = all_idx = np.asarray(idx)
    sites = np.asarray(data.sites)
    read_sites = set() if exposed is None else set(sites[exposed.any(1)].tolist())
    rng = np.random.default_rng(seed)
    if exposed is not None and (~exposed[idx]).any():
        unseen = (~exposed[idx]).sum(1)
        order = np.lexsort((rng.random(len(idx)), -unseen))[:max_runs]  # most unseen answers first
        idx = np.sort(idx[order[unseen[order] > 0]])
    elif len(idx) > max_runs:
        idx = np.sort(rng.choice(idx, size=max_runs, replace=False))
    blocks = [make_block(data, int(i), roi, fm.cfg.max_patches, readouts=readouts) for i in idx]
    probas = score_tasks(fm, blocks, tasks, calibrated=False)
    out: dict[str, dict] = {}
    for k, (task, proba) in enumerate(zip(tasks, probas)):
        ai = {a: j for j, a in enumerate(task.answers)}

        def answer_index(rows, task=task, ai=ai):  # each run's true answer, -1 where it has none
            return np.array([ai.get(task.answer_for(data.phenotype[i], data.z[i]), -1) for i in rows])

        y = answer_index(idx)
        keep = y >= 0
        fitted_on = "training answers"
        spec = task_evidence(task, names) if names is not None else None
        if exposed is not None:
            fresh = keep & ~exposed[idx, k]
            if fresh.sum() >= MIN_UNSEEN and len(np.unique(y[fresh])) >= 2:
                keep, fitted_on = fresh, UNSEEN
            elif spec is None:
                log(f"calibration {task.name}: only {int(fresh.sum())} answers the LLM never saw; "
                    "fitted on answers it trained on")
        if keep.sum() < 4 or len(np.unique(y[keep])) < 2:
            continue
        if spec is not None and exposed is not None:
            # the readout alone on every answered training run (cross-fitted by site, so honest), then
            # the LLM's answer weighed in only as far as unseen answers of unread sites bear out
            y_all = answer_index(all_idx)
            rows = all_idx[y_all >= 0]
            alone = fit_calibration(_flat(len(rows), proba.shape[1]), y_all[y_all >= 0], task.answers,
                                    evidence=evidence_matrix(spec, readouts[rows], names), evidence_spec=spec)
            start = {**alone, "scale": READOUT_ONLY_SCALE}
            fair = (y >= 0) & ~np.isin(sites[idx], list(read_sites))  # every answer of such a site is unseen
            if fair.sum() >= MIN_UNSEEN and len(np.unique(y[fair])) >= 2:
                groups = [str(data.keys[i][0]) for i in idx[fair]]  # participants
                c, report = refit_calibration(proba[fair], y[fair], groups, start, seed=seed,
                                              evidence=evidence_matrix(spec, readouts[idx[fair]], names))
                c["n"], fitted_on = int(fair.sum()), UNSEEN
            else:
                c = {**start, "refit": None, "n": len(rows)}
                report = {"cv_loss": {}, "chosen": "checkpoint", "folds": 0,
                          "reason": f"{int(fair.sum())} unseen answers from sites the LLM never read"}
                fitted_on = READOUT_ALONE
            c.update(class_counts=alone["class_counts"], selection=report)
        else:
            ev = None if spec is None else evidence_matrix(spec, readouts[idx[keep]], names)
            c = fit_calibration(proba[keep], y[keep], task.answers, evidence=ev, evidence_spec=spec)
            alone = None if spec is None else fit_calibration(_flat(int(keep.sum()), proba.shape[1]), y[keep],
                                                              task.answers, evidence=ev, evidence_spec=spec)
        out[task.name] = c
        c["fitted_on"] = fitted_on
        where, _, key = task.source.partition(":")
        if where == "descriptor" and names is not None and f"z:{key}" in names:  # for "markedly" levels
            z = np.array([np.nan if data.z[i].get(key) is None else float(data.z[i][key]) for i in all_idx])
            level_map = fit_level_map(readouts[all_idx, list(names).index(f"z:{key}")], z, f"z:{key}")
            if level_map is not None:
                c["level_map"] = level_map
        if alone is not None:  # each input calibrated alone, for the held-out rows (not applied)
            c["parts"] = {"llm": fit_calibration(proba[keep], y[keep], task.answers), "readout": alone}
        chosen = (c.get("selection") or {}).get("chosen")
        log(f"calibration {task.name}: scale {c['scale']:.2f}, bias {', '.join(f'{b:+.2f}' for b in c['bias'])}"
            + (f", readout weight {c['weight']:+.2f} ({', '.join(spec['columns'])})" if spec else "")
            + f" ({int(c.get('n', keep.sum()))} runs: {fitted_on}"
            + ("" if chosen is None else "; readout alone kept" if chosen == "checkpoint"
               else f"; LLM weighed in, ridge {chosen}")
            + (f", {c['selection']['reason']}" if (c.get("selection") or {}).get("reason") else "") + ")")
    return out


def evaluate_heldout(fm, tok, tasks: Sequence[Task], data, train_idx: np.ndarray, test_idx: np.ndarray,
                     roi: torch.Tensor, seed: int = 0, n_describe: int = 40, stage: str = "instruct",
                     log: Callable[[str], None] = print, previous: dict[str, Any] | None = None,
                     readouts: np.ndarray | None = None) -> dict[str, Any]:
    """All held-out figures of a trained model (see module docstring).

    ``previous``: the evaluation of an earlier stage on the same split; its FC baselines (which do
    not depend on the model) are reused instead of refitted. ``readouts`` (N, S): the runs' run
    readouts, when the model reads one.
    """
    from ..model.calibration import apply_calibration
    from ..model.inference import generate_descriptions, next_patch_logits, score_tasks
    from .lm import make_block

    cfg = fm.cfg
    blocks = [make_block(data, int(i), roi, cfg.max_patches, readouts=readouts) for i in test_idx]
    res: dict[str, Any] = {"n_heldout_runs": int(len(test_idx))}

    # ---- next-patch token prediction
    logits = next_patch_logits(fm, blocks)
    hits = base_global = base_roi = base_prev = count = 0
    K = fm.codebook.shape[0]
    train_ids = np.concatenate([data.ids[i].astype(np.int64) for i in train_idx])
    counts_roi = np.stack([np.bincount(train_ids[:, r], minlength=K) for r in range(train_ids.shape[1])])
    top_roi = counts_roi.argmax(1)
    top_global = int(np.bincount(train_ids.ravel(), minlength=K).argmax())
    for blk, lg in zip(blocks, logits):
        if lg is None:
            continue
        tgt = blk.ids[1:].numpy()
        hits += int((lg.argmax(-1).numpy() == tgt).sum())
        base_global += int((tgt == top_global).sum())
        base_roi += int((tgt == top_roi[None]).sum())
        base_prev += int((tgt == blk.ids[:-1].numpy()).sum())
        count += tgt.size
    res["next_patch"] = {"token_accuracy": hits / max(count, 1), "most_frequent_token": base_global / max(count, 1),
                         "most_frequent_token_per_roi": base_roi / max(count, 1),
                         "repeat_previous_patch": base_prev / max(count, 1), "chance": 1.0 / K, "n_tokens": int(count)}
    log(f"next-patch token accuracy {res['next_patch']['token_accuracy']:.4f} "
        f"(most frequent {res['next_patch']['most_frequent_token']:.4f}, per ROI "
        f"{res['next_patch']['most_frequent_token_per_roi']:.4f}, repeat {res['next_patch']['repeat_previous_patch']:.4f})")

    # ---- constrained-answer tasks vs FC logistic regression and majority
    res["tasks"] = {}
    raw_proba = dict(zip([t.name for t in tasks], score_tasks(fm, blocks, tasks, calibrated=False)))
    calibration = getattr(fm, "calibration", {}) or {}
    names = None if getattr(fm, "readout", None) is None else fm.readout.names
    ro_test = None if readouts is None else readouts[test_idx]
    proba_all = {t.name: apply_calibration(raw_proba[t.name], calibration.get(t.name), t.answers, ro_test, names)
                 for t in tasks}
    for task in tasks:
        y_test = [task.answer_for(data.phenotype[i], data.z[i]) for i in test_idx]
        y_train = [task.answer_for(data.phenotype[i], data.z[i]) for i in train_idx]
        keep = np.array([a is not None for a in y_test])
        keep_tr = np.array([a is not None for a in y_train])
        if keep.sum() < 4 or keep_tr.sum() < 4:
            continue
        ai = {a: k for k, a in enumerate(task.answers)}
        yt = np.array([ai[a] for a in np.array(y_test, dtype=object)[keep]])
        ytr = np.array([ai[a] for a in np.array(y_train, dtype=object)[keep_tr]])
        raw, proba = raw_proba[task.name][keep], proba_all[task.name][keep]
        cal = calibration.get(task.name)
        ro = None if ro_test is None else ro_test[keep]
        entry: dict[str, Any] = {"n": int(keep.sum()), "class_counts": {a: int((yt == k).sum()) for a, k in ai.items()}}
        entry["fmrilm"] = _task_metrics(yt, proba)
        if cal:  # what the answer calibration changed, and what each of its inputs carries alone
            entry["fmrilm_uncalibrated"] = _task_metrics(yt, raw)
            parts = cal.get("parts") or {}
            if "llm" in parts:
                entry["fmrilm_llm_calibrated"] = _task_metrics(yt, apply_calibration(raw, parts["llm"], task.answers))
            if "readout" in parts and ro is not None:
                entry["readout_score"] = _task_metrics(yt, apply_calibration(_flat(*raw.shape), parts["readout"],
                                                                             task.answers, ro, names))
        majority = int(np.bincount(ytr, minlength=len(task.answers)).argmax())
        entry["majority_accuracy"] = float(np.mean(yt == majority))
        old = ((previous or {}).get("tasks") or {}).get(task.name) or {}
        if "fc_logistic" in old and old.get("n") == entry["n"] and old.get("class_counts") == entry["class_counts"]:
            entry["fc_logistic"] = old["fc_logistic"]
        elif len(np.unique(ytr)) >= 2:
            fp = fc_logistic(data.fc[train_idx[keep_tr]], ytr, data.fc[test_idx[keep]], seed=seed)
            if fp.shape[1] < len(task.answers):
                fp = np.pad(fp, ((0, 0), (0, len(task.answers) - fp.shape[1])))
            entry["fc_logistic"] = _task_metrics(yt, fp)
        res["tasks"][task.name] = entry
        log(f"{task.name}: fMRI-LM {entry['fmrilm']} | FC logistic {entry.get('fc_logistic')} | "
            f"majority acc {entry['majority_accuracy']:.3f}")

    # ---- generated descriptions vs true levels: guided by the model's own descriptor answers (as
    # the participant level writes them) and unguided (what the LLM states by itself)
    if n_describe > 0:
        from ..model.gates import repeated_sentences
        from ..model.inference import description_levels, description_numbers

        rng = np.random.default_rng(seed)
        pick = rng.choice(len(test_idx), size=min(n_describe, len(test_idx)), replace=False)
        picked = None if readouts is None else readouts[test_idx[pick]]
        levels = description_levels(tasks, [proba_all[t.name][pick] for t in tasks], calibration, picked, names)
        numbers = description_numbers(tasks, levels, calibration, picked, names)
        keys = sorted({k for i in test_idx for k in data.z[i]})
        others = [int(test_idx[(k + 1 + int(rng.integers(len(test_idx) - 1))) % len(test_idx)]) for k in pick]
        runs = [int(test_idx[k]) for k in pick]
        found = {}
        for mode, lv, nums in (("guided", levels, numbers), ("unguided", None, None)):
            texts = generate_descriptions(fm, [blocks[k] for k in pick], max_new_tokens=cfg.max_text_tokens, levels=lv,
                                          numbers=nums)
            found[mode] = {**_level_agreement(texts, runs, others, data.z, keys),
                           "runs_with_repeated_sentences": int(sum(repeated_sentences(t) > 0 for t in texts)),
                           "examples": texts[:3]}
        res["descriptions"] = {"n_runs": int(len(pick)), **found["guided"], "guided": True,
                               "unguided": {k: v for k, v in found["unguided"].items() if k != "examples"},
                               "unguided_examples": found["unguided"]["examples"]}
        for mode, d in found.items():
            log(f"descriptions ({mode}): {d['statements']} statements in {len(pick)} runs, agreement "
                f"{d['agreement']:.3f} vs other run {d['agreement_other_run']:.3f}, always-typical "
                f"{d['agreement_always_typical']:.3f}")
    return res


def _level_agreement(texts: Sequence[str], runs: Sequence[int], others: Sequence[int], z: Sequence[dict],
                     keys: Sequence[str]) -> dict[str, float]:
    """How often the levels that ``texts`` state match the true levels of ``runs`` (5 levels and
    lower/typical/higher), of another run (``others``), and how often the truth is "typical"."""
    from ..descriptors.text import level_of, parse_levels

    def three(level):
        return {"markedly_lower": "lower", "markedly_higher": "higher"}.get(level, level)

    agree = chance = typical = agree3 = chance3 = n = 0
    for t, i, other in zip(texts, runs, others):
        for key, lev in parse_levels(t, keys).items():
            true, rand = level_of(z[i].get(key)), level_of(z[other].get(key))
            n += 1
            agree += lev == true
            chance += lev == rand
            typical += true == "typical"
            agree3 += three(lev) == three(true)
            chance3 += three(lev) == three(rand)
    d = max(n, 1)
    return {"statements": int(n), "statements_per_run": n / max(len(texts), 1), "agreement": agree / d,
            "agreement_other_run": chance / d, "agreement_always_typical": typical / d,
            "agreement_3level": agree3 / d, "agreement_3level_other_run": chance3 / d}

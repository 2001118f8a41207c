"""Group level, fMRI-LM methods: zero-shot answers, few-shot LoRA adaptation, embedding and encoder probes.

Everything starts from what the participant level wrote: each run's token ids
(``*_desc-fmrilm_tokens.tsv.gz``), the tokenizer's run embedding in the tokens sidecar and the
ROI centroids in ``atlas-<A>_dseg.tsv``. Signals and tokens are never recomputed.

A user's label becomes an instruction task (:func:`label_prompt`): when the checkpoint was
instruction-tuned on a task of the same name whose answers cover every class (``sex``,
``diagnosis``), that task's question and answers are reused; otherwise the question is built from
the column name and the answers are the label's classes. A regression target is asked as five
quantile bins of the training targets ("very low" ... "very high"); the prediction is the
probability-weighted mean of the training targets in each bin.

Few-shot adaptation (:func:`adapt`) adapts the checkpoint with ``K`` participants per class from
the training folds (all of each selected participant's runs), on a freshly loaded model each time.
A task the checkpoint has an answer calibration for (:mod:`~bids_fmrilm.model.calibration`, fused
with the run readout's own score of the task) is first recalibrated: its few parameters (the LLM
answer's slope, the answers' biases, the readout evidence's weight) are fitted again on the shots
when participant-grouped cross-validation on the shots prefers a fit to the checkpoint's own
(:func:`~bids_fmrilm.model.calibration.refit_calibration`). That is what few labels support: the
checkpoint's calibration was fitted on runs the LLM was trained on and trusts the LLM more than
new sites bear out (ABIDE's held-out sites: the LLM's sex answer ranks runs at AUROC 0.25 while the
readout's score reaches 0.58). A readout probe competes in the same cross-validation: a
class-balanced logistic regression of the answer on the whole run readout (its principal
components and every score), fitted on the shots and fused with the LLM's answer in place of the
checkpoint's score (:func:`~bids_fmrilm.model.calibration.fit_probe_calibration`). It carries what
the checkpoint's score of the task misses: an effect of the user's own sites (the simulated
dataset of ``make demo``: weaker default-mode coupling, which the checkpoint's ABIDE diagnosis
score ranks at AUROC 0.92 and a probe on the readout at 1.0), or a label the checkpoint has no
calibration for, which starts from the identity calibration. Then the LoRA adapter trains on the
calibrated, fused answer as it is scored, so it learns what the calibrated evidence does not
already say (labels whose calibration stays the identity train the answer text); the readout
adapter stays frozen, so the saved adapter (LoRA and calibration) is the whole adaptation. A quarter of the shots' participants is held out for early stopping, and
the weights before the first step are one of the candidates, replaced only by a step that lowers
the held-out shots' loss by more than one standard error: on ABIDE (training folds of the
held-out sites) the held-out shots' loss rose within the first five steps in most folds whatever
the learning rate (3e-4 to 1e-4, with or without the readout adapter), so an adaptation that does
not hold on the user's own held-out participants is not kept.

With a 4-bit model on CPU a forward pass in eval mode before training would repack the weights
and silence the LoRA gradients: validation passes therefore run in train mode with dropout off,
and :func:`adapt` checks that the first step's LoRA gradients are non-zero.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..bids.writer import atomic_dir, read_json
from ..errors import DataError, UsageError
from ..model.api import FMRILMModel, PreparedRun
from ..model.tasks import Task, instruction_segments, label_task

log = logging.getLogger("bids_fmrilm")

REGRESSION_ANSWERS = ("very low", "low", "medium", "high", "very high")
BIN_ANSWERS = {2: ("low", "high"), 3: ("low", "medium", "high"), 4: ("very low", "low", "high", "very high"),
               5: REGRESSION_ANSWERS}
ADAPTER_META = "adapter.json"


def read_token_runs(output_dir: Path, participants: Sequence[str], checkpoint: str | os.PathLike,
                    meta: dict[str, Any]) -> dict[str, list[PreparedRun]]:
    """Token runs per participant label (without ``sub-``) from the participant level's outputs:
    ids, the tokenizer's run embedding (tokens sidecar) and ROI centroids (``atlas-<A>_dseg.tsv``).
    A checkpoint that reads encoder features gets them by encoding the cleaned series the
    participant level wrote beside the tokens (``*_atlas-<A>_timeseries.tsv.gz``), checked to give
    the same token ids.

    Tokens must come from this checkpoint (or its tokenizer folder): tokens of another tokenizer
    index another codebook. Participants without tokens are absent from the result.

    Raises
    ------
    DataError
        When the tokens were written by another model.
    """
    from ..model.checkpoint import tokenizer_id
    from ..model.config import FMRILMConfig
    from ..tokenizer.data import roi_coordinates

    wanted = {str(meta.get("id")), tokenizer_id(Path(checkpoint) / "tokenizer")}
    encoder = None
    if FMRILMConfig.from_dict(meta.get("config") or {}).fmri_input == "features":
        from ..tokenizer import Tokenizer

        encoder = Tokenizer.load(Path(checkpoint) / "tokenizer")
    keep = set(participants)
    runs: dict[str, list[PreparedRun]] = {}
    foreign: dict[str, int] = {}
    coords_cache: dict[tuple, np.ndarray] = {}
    for js in sorted(Path(output_dir).glob("sub-*/**/func/*_desc-fmrilm_tokens.json")):
        label = js.name.split("_")[0][4:]
        if label not in keep:
            continue
        side = read_json(js) or {}
        mid = str(side.get("ModelID", ""))
        if mid not in wanted and str(side.get("TokenizerID", "")) not in wanted:
            foreign[mid] = foreign.get(mid, 0) + 1
            continue
        tsv = js.with_name(js.name[: -len(".json")] + ".tsv.gz")
        if not tsv.is_file():
            continue
        df = pd.read_csv(tsv, sep="\t")
        key = (side.get("Atlas", ""), tuple(df.columns))
        if key not in coords_cache:
            coords_cache[key] = roi_coordinates(Path(output_dir), key[0], list(df.columns)).astype(np.float32)
        emb = np.asarray(side["TokenizerRunEmbedding"], np.float32)
        ids = df.to_numpy(np.int64)
        feats, vec = (None, None) if encoder is None else _run_features(encoder, tsv, ids, coords_cache[key])
        runs.setdefault(label, []).append(PreparedRun(ids, emb, coords_cache[key], source=str(tsv), feats=feats,
                                                      run_vec=vec))
    if foreign and not runs:
        raise DataError(f"the participant level's tokens were written by model(s) {', '.join(foreign)}, not by "
                        f"{meta.get('id')}", path=output_dir,
                        fix="pass the same --model at the group level, or re-run the participant level with this model")
    if foreign:
        log.warning("%d runs have tokens of another model (%s) and are left out", sum(foreign.values()),
                    ", ".join(foreign))
    return runs


def _run_features(tokenizer, tokens_tsv: Path, ids: np.ndarray, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Encoder features of the series written beside a tokens file (they must give its ids) and
    the run vector of the readout."""
    from ..model.readout import tokenized_run_vector
    from ..signals.pipeline import read_roi_timeseries
    from ..tokenizer.data import scale_run

    series = tokens_tsv.with_name(tokens_tsv.name.replace("_desc-fmrilm_tokens.tsv.gz", "_timeseries.tsv.gz"))
    if not series.is_file():
        raise DataError("the tokens have no cleaned series beside them, and this model reads encoder features",
                        path=series, fix="re-run the participant level (it writes the series with the tokens)")
    ts, _ = read_roi_timeseries(series)
    scaled, log_scale = scale_run(ts, return_log_scale=True)
    feats = tokenizer.features(scaled, coords, source=series)
    if feats.shape[:2] != ids.shape or not np.array_equal(tokenizer.ids_of(feats), ids):
        raise DataError("the series beside the tokens do not give the same token ids", path=series,
                        fix="re-run the participant level with --force")
    return feats, tokenized_run_vector(tokenizer, feats, scaled, log_scale)


# ------------------------------------------------------------------------------------ label -> task
@dataclass
class LabelPrompt:
    """How a label is asked: the task, and how label values map to its answers and back."""

    task: Task
    task_type: str
    answer_of: dict[str, str] = field(default_factory=dict)  # class -> answer (classification)
    centers: list[float] = field(default_factory=list)  # regression: mean training target per bin

    def answers_for(self, y: np.ndarray) -> list[str]:
        if self.task_type == "classification":
            return [self.answer_of[str(v)] for v in y]
        return [self.task.answer_for({self.task.source.split(":", 1)[1]: float(v)}, None) for v in y]

    def to_prediction(self, proba: np.ndarray, classes: Sequence[str] | None) -> np.ndarray:
        """Answer probabilities (n, A) -> class probabilities (n, C) or expected values (n,)."""
        if self.task_type == "classification":
            col = {a: j for j, a in enumerate(self.task.answers)}
            return proba[:, [col[self.answer_of[c]] for c in classes]]
        return proba @ np.asarray(self.centers)

    def to_dict(self) -> dict[str, Any]:
        return {"Task": self.task.to_dict(), "TaskType": self.task_type, "AnswerForClass": self.answer_of,
                "BinCenters": self.centers}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LabelPrompt":
        return cls(Task.from_dict(d["Task"]), d["TaskType"], dict(d.get("AnswerForClass") or {}),
                   list(d.get("BinCenters") or []))


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def label_prompt(name: str, task_type: str, classes: Sequence[str], tasks: Sequence[Task],
                 y_train: np.ndarray | None = None) -> LabelPrompt:
    """The instruction task for label ``name`` (see the module docstring).

    For regression ``y_train`` (the training targets) sets the quantile bins.
    """
    if task_type == "classification":
        for t in tasks:
            if _norm(t.name) == _norm(name) and t.value_map:
                mapped = {c: t.value_map.get(c.strip().lower()) for c in classes}
                if all(mapped.values()) and len(set(mapped.values())) == len(classes):
                    return LabelPrompt(t, task_type, mapped)
        t = label_task(name, classes)
        return LabelPrompt(t, task_type, {c: c for c in classes})
    y = np.asarray(y_train, float)
    n_bins = int(min(len(REGRESSION_ANSWERS), max(2, len(np.unique(y)))))
    edges = np.unique(np.quantile(y, np.linspace(0, 1, n_bins + 1)[1:-1]))  # ties can merge bins
    answers = BIN_ANSWERS[len(edges) + 1]
    t = Task(f"label:{name}", f"How high is the participant's {name.replace('_', ' ')}?", tuple(answers),
             f"phenotype:{name}", bins=tuple(float(e) for e in edges))
    bin_of = np.searchsorted(edges, y, side="right")
    centers = [float(y[bin_of == k].mean()) if np.any(bin_of == k) else float(np.mean(y)) for k in range(len(answers))]
    return LabelPrompt(t, task_type, centers=centers)


# ------------------------------------------------------------------------------------ model outputs
def _participant_mean(values: np.ndarray, owners: list[str], participants: Sequence[str]) -> np.ndarray:
    idx = {p: i for i, p in enumerate(participants)}
    out = np.zeros((len(participants),) + values.shape[1:])
    count = np.zeros(len(participants))
    for v, p in zip(values, owners):
        out[idx[p]] += v
        count[idx[p]] += 1
    return out / count.reshape((-1,) + (1,) * (values.ndim - 1))


def score_participants(model: FMRILMModel, prompt: LabelPrompt, runs: dict[str, list[PreparedRun]],
                       participants: Sequence[str]) -> np.ndarray:
    """Answer probabilities (n_participants, n_answers), averaged over each participant's runs."""
    from ..model.inference import score_options

    flat = [(p, r) for p in participants for r in runs[p]]
    proba = np.concatenate([score_options(model.fm, [model.block(r)], prompt.task) for _, r in flat])
    return _participant_mean(proba, [p for p, _ in flat], participants)


def embed_participants(model: FMRILMModel, runs: dict[str, list[PreparedRun]],
                       participants: Sequence[str]) -> np.ndarray:
    """fMRI-LM embeddings (n_participants, hidden), averaged over each participant's runs."""
    from ..model.inference import embed_blocks

    flat = [(p, r) for p in participants for r in runs[p]]
    emb = np.concatenate([embed_blocks(model.fm, [model.block(r)]) for _, r in flat])
    return _participant_mean(emb, [p for p, _ in flat], participants)


def encoder_participants(runs: dict[str, list[PreparedRun]], participants: Sequence[str]) -> np.ndarray | None:
    """The tokenizer encoder's run representation (n_participants, R * c), averaged over each
    participant's runs: each region's continuous encoder features averaged over the run's windows
    (weighted by their real volumes), flattened region by region, as information gate 1 probes
    it. ``None`` when a run has no encoder features (a checkpoint that reads codebook vectors) or
    the runs' atlases differ in size."""
    flat = [(p, r) for p in participants for r in runs[p]]
    if not flat or any(r.feats is None or r.run_vec is None for _, r in flat):
        return None
    c = flat[0][1].feats.shape[-1]
    rep = [r.run_vec[:, :c].reshape(-1) for _, r in flat]  # run_vector's leading columns: the weighted mean
    if len({len(v) for v in rep}) > 1:
        return None
    return _participant_mean(np.stack(rep), [p for p, _ in flat], participants)


# ------------------------------------------------------------------------------------ adaptation
@dataclass
class AdaptSettings:
    """Few-shot LoRA settings (group level)."""

    steps: int = 20
    batch_size: int = 4
    lr: float = 3e-4
    warmup: int = 5
    validation: float = 0.25  # share of the shots' participants held out for early stopping (0: none)
    recalibrate: bool = True  # fit the task's answer calibration (or a readout probe) on the shots (refit_calibration)
    eval_every: int = 5
    seed: int = 0
    device: str = "auto"
    quantization: str = "auto"


def adapt(checkpoint: str | os.PathLike, examples: Sequence[tuple[PreparedRun, str]], prompt: LabelPrompt,
          settings: AdaptSettings, verify: bool = True, groups: Sequence[str] | None = None
          ) -> tuple[FMRILMModel, dict[str, Any]]:
    """Train the checkpoint's LoRA adapter on ``(run, answer)`` instruction examples.

    The model is loaded afresh (LoRA trainable; projector with its readout adapter, fMRI head and
    tokenizer frozen; ``verify=False`` skips the file hashes of a checkpoint the caller has
    already checked). The task's calibration (the identity when the checkpoint has none and reads a
    run readout) is fitted again on the examples first, a readout probe among the candidates
    (:func:`recalibrate`, ``settings.recalibrate``); the model returned scores with the chosen
    calibration.

    Early stopping: a stratified ``settings.validation`` share of the participants (``groups``,
    one per example; each example its own participant when None) is held out of training, the
    objective is measured on them before training and every ``settings.eval_every`` steps, and
    the adapter weights with the lowest validation loss are kept, the checkpoint as it was
    (step 0) included; a later step must lower the loss by more than one standard error of its
    paired per-example change from step 0 (``validation_margin``): adaptation that does not
    generalise to the user's held-out participants beyond their noise is not kept. With fewer
    than two participants per answer no validation split is made.

    Returns ``(model, info)`` with the model in eval mode and ``info`` holding the losses, the
    validation curve and chosen step, the recalibration report and calibration, and the first
    step's LoRA gradient norm.

    Raises
    ------
    RuntimeError
        When the LoRA gradients of the first step are all zero (nothing would be learned).
    """
    from ..model.adapters import lora_parameters
    from ..model.calibration import applies
    from ..model.checkpoint import load_checkpoint
    from ..model.inference import answer_scores
    from ..training.schedule import warmup_cosine

    if not examples:
        raise DataError("no training examples for few-shot adaptation")
    t0 = time.time()
    torch.manual_seed(settings.seed)
    model = FMRILMModel(*load_checkpoint(checkpoint, device=settings.device, quantization=settings.quantization,
                                         trainable=True, verify=verify))
    fm = model.fm.train()
    for p in list(fm.projector.parameters()) + list(fm.fmri_head.parameters()):
        p.requires_grad_(False)  # the readout adapter too: the saved adapter is the LoRA (and the calibration)
    params = lora_parameters(fm.llm)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    warmup = max(1, min(settings.warmup, settings.steps // 4))  # a short run must not end in its warm-up
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, settings.steps))
    cal = (getattr(fm, "calibration", {}) or {}).get(prompt.task.name)
    fused = applies(cal, prompt.task.answers)
    answer_index = {a: k for k, a in enumerate(prompt.task.answers)}
    recal = None
    if settings.recalibrate and (fused or fm.readout is not None):
        # before any step: the scores are those of the checkpoint, on unseen runs. A label the
        # checkpoint has no calibration for starts from the identity; a fit (or a readout probe)
        # that beats it makes the calibrated answer the objective
        start = cal if fused else identity_calibration(prompt.task.answers)
        cal, recal = recalibrate(model, examples, groups, prompt.task, start, settings.seed)
        fused = fused or recal["chosen"] != "checkpoint"
        if fused:
            fm.calibration = {**(fm.calibration or {}), prompt.task.name: cal}

    # the user's answers only: the alignment and reconstruction (w_align, w_recon) belong to stages 2 and 3
    answers_only = {"align_weight": 0.0, "recon_weight": 0.0}

    def objective(idx, rng=None, per_example: bool = False) -> torch.Tensor:
        blks = [model.block(examples[i][0], rng=rng) for i in idx]
        if fused:  # train the answer as it is scored: calibrated and fused with the readout evidence
            z = calibrated_logits(fm, answer_scores(fm, blks, [prompt.task])[0], cal, blks)
            y = torch.tensor([answer_index[examples[i][1]] for i in idx], device=z.device)
            return torch.nn.functional.cross_entropy(z, y, reduction="none" if per_example else "mean")
        if per_example:  # one sequence per example: the text loss is a mean over a batch's tokens
            return torch.stack([fm([instruction_segments(prompt.task, 0, examples[i][1])], [b], ["instruct"],
                                   {"instruct": 1.0}, 0.0, **answers_only)["loss"] for i, b in zip(idx, blks)])
        segs = [instruction_segments(prompt.task, j, examples[i][1]) for j, i in enumerate(idx)]
        return fm(segs, blks, ["instruct"] * len(segs), {"instruct": 1.0}, 0.0, **answers_only)["loss"]

    train_idx, val_idx = validation_split([a for _, a in examples], groups, settings.validation, settings.seed)
    trainable = params
    curve: list[tuple[int, float]] = []
    margins: dict[int, tuple[float, float]] = {}  # step -> (mean change of the loss from step 0, its standard error)
    best: tuple[float, int, list[torch.Tensor] | None] = (math.inf, 0, None)
    start: np.ndarray | None = None

    def validate(step: int) -> None:
        nonlocal best, start
        if not len(val_idx):
            return
        with torch.no_grad(), _dropout_off(fm):  # train mode otherwise: an eval-mode pass would repack 4-bit weights
            per = np.concatenate([objective(val_idx[s:s + 8], per_example=True).float().cpu().numpy()
                                  for s in range(0, len(val_idx), 8)])
        v = float(per.mean())
        curve.append((step, round(v, 5)))
        if start is None:
            start, best = per, (v, step, [t.detach().clone() for t in trainable])
            return
        # one-standard-error rule: a step replaces the checkpoint only when the held-out shots'
        # loss fell by more than the noise of a few participants' paired losses
        d = per - start
        se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
        margins[step] = (round(float(d.mean()), 5), round(se, 5))
        if v < best[0] and d.mean() + se < 0:
            best = (v, step, [t.detach().clone() for t in trainable])

    validate(0)
    losses, grad0 = [], None
    for step in range(settings.steps):
        rng = np.random.default_rng([settings.seed, step])
        pick = rng.choice(train_idx, size=min(settings.batch_size, len(train_idx)), replace=False)
        loss = objective(pick, rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad0 is None:
            grad0 = float(math.sqrt(sum(float(p.grad.float().pow(2).sum()) for p in params if p.grad is not None)))
            if grad0 == 0.0:
                raise RuntimeError("few-shot adaptation: the LoRA gradients of the first step are all zero "
                                   "(was the 4-bit model used in eval mode before training?)")
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, settings.eval_every) == 0 or step + 1 == settings.steps:
            validate(step + 1)
    if best[2] is not None and best[1] != settings.steps:  # keep the weights that generalised best
        with torch.no_grad():
            for t, b in zip(trainable, best[2]):
                t.copy_(b)
    fm.eval()
    k = max(1, len(losses) // 5)
    info = {"steps": settings.steps, "examples": len(examples), "objective": "calibrated answer" if fused else "answer text",
            "first_loss": float(np.mean(losses[:k])), "last_loss": float(np.mean(losses[-k:])),
            "validation_examples": int(len(val_idx)), "validation_curve": curve,
            "validation_margin": {str(k): v for k, v in margins.items()},
            "recalibration": recal, "calibration": cal if fused else None,
            "kept_step": best[1] if curve else settings.steps,
            "first_grad_norm": grad0, "seconds": round(time.time() - t0, 1)}
    return model, info


def recalibrate(model: FMRILMModel, examples: Sequence[tuple[PreparedRun, str]], groups: Sequence[str] | None,
                task: Task, cal: dict, seed: int = 0) -> tuple[dict, dict]:
    """The task's answer calibration fitted again on the few-shot examples, or kept
    (:func:`~bids_fmrilm.model.calibration.refit_calibration`); returns ``(calibration, report)``.

    The examples are scored by the model as loaded, in train mode with dropout off (an eval-mode
    pass would repack 4-bit weights before training)."""
    from ..model.calibration import evidence_matrix, refit_calibration
    from ..model.inference import answer_scores, block_readouts

    fm = model.fm
    proba, readouts = [], []
    with torch.no_grad(), _dropout_off(fm):
        for s in range(0, len(examples), 8):
            blks = [model.block(r) for r, _ in examples[s:s + 8]]
            proba.append(torch.softmax(answer_scores(fm, blks, [task])[0].float(), -1).cpu().numpy())
            readouts.append(block_readouts(blks))
    readouts = None if any(r is None for r in readouts) else np.concatenate(readouts)
    spec = cal.get("evidence") if cal.get("weight") else None
    evidence = evidence_matrix(spec, readouts, fm.readout.names) if spec else None
    index = {a: k for k, a in enumerate(task.answers)}
    y = np.array([index[a] for _, a in examples])
    groups = list(groups) if groups is not None else [str(i) for i in range(len(examples))]
    names = None if readouts is None else fm.readout.names
    new, report = refit_calibration(np.concatenate(proba), y, groups, cal, evidence, seed=seed, readouts=readouts,
                                    readout_names=names)
    log.debug("few-shot recalibration of %r: %s", task.name, report)
    return new, report


def identity_calibration(answers: Sequence[str]) -> dict[str, Any]:
    """The calibration that changes nothing (slope 1, no biases): the start of a label's
    recalibration when the checkpoint has none for it."""
    return {"scale": 1.0, "bias": [0.0] * len(answers), "answers": [str(a) for a in answers]}


def validation_split(answers: Sequence[str], groups: Sequence[str] | None, share: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Example indices (train, validation): about ``share`` of each answer's participants
    (``groups``) in validation, all runs of a participant on one side. No validation when
    ``share`` is 0 or an answer has fewer than two participants."""
    idx = np.arange(len(answers))
    if share <= 0:
        return idx, idx[:0]
    groups = list(groups) if groups is not None else [str(i) for i in idx]
    first = {}
    for g, a in zip(groups, answers):
        first.setdefault(g, a)  # a participant's answer (the same for all its runs)
    rng = np.random.default_rng(seed)
    held: set[str] = set()
    for a in sorted(set(first.values())):
        members = sorted(g for g, ans in first.items() if ans == a)
        if len(members) < 2:
            return idx, idx[:0]
        held.update(rng.choice(members, size=max(1, int(round(share * len(members)))), replace=False).tolist())
    val = np.array([g in held for g in groups])
    return idx[~val], idx[val]


@contextmanager
def _dropout_off(module: torch.nn.Module):
    """Dropout layers in eval mode, every other module as it was (a 4-bit layer stays in train mode)."""
    drops = [m for m in module.modules() if isinstance(m, torch.nn.Dropout) and m.training]
    for m in drops:
        m.eval()
    try:
        yield
    finally:
        for m in drops:
            m.train()


def calibrated_logits(fm, scores: torch.Tensor, cal: dict, blocks) -> torch.Tensor:
    """Differentiable twin of :func:`~bids_fmrilm.model.calibration.apply_calibration`: answer
    logits (n, A) from summed answer log-probabilities ``scores`` (n, A), with the readout
    evidence of ``blocks`` when the calibration reads it."""
    from ..model.calibration import calibration_offset
    from ..model.inference import block_readouts

    names = getattr(getattr(fm, "readout", None), "names", None)
    offset = calibration_offset(cal, len(blocks), block_readouts(blocks), names)
    return float(cal["scale"]) * torch.log_softmax(scores.float(), -1) \
        + torch.as_tensor(offset, dtype=torch.float32, device=scores.device)


def shot_examples(prompt: LabelPrompt, y: np.ndarray, sel: np.ndarray, runs: dict[str, list[PreparedRun]],
                  pids: np.ndarray) -> tuple[list[tuple[PreparedRun, str]], list[str]]:
    """``(run, answer)`` examples of the selected participants (all their runs) and the
    participant of each example (for :func:`adapt`'s validation split)."""
    chosen = [(pids[i], a) for i, a in zip(sel, prompt.answers_for(y[sel]))]
    return [(r, a) for pid, a in chosen for r in runs[pid]], [pid for pid, _ in chosen for _ in runs[pid]]


def select_shots(y: np.ndarray, train: np.ndarray, shots: int | None, task_type: str, seed: int) -> np.ndarray:
    """Indices (into ``y``) of ``shots`` training participants per class (classification) or in
    all (regression); ``None`` = every training participant. Nested: a smaller K is a subset of a
    larger one for the same fold and seed."""
    rng = np.random.default_rng(seed)
    order = train[rng.permutation(len(train))]
    if shots is None:
        return np.sort(order)
    if task_type != "classification":
        return np.sort(order[:shots])
    out = [order[y[order] == c][:shots] for c in np.unique(y[train])]
    return np.sort(np.concatenate(out))


def parse_shots(values: Sequence[str]) -> list[int | None]:
    """``("8", "32", "all")`` -> ``[8, 32, None]`` (sorted, ``all`` last)."""
    out: set[int] = set()
    every = False
    for v in values:
        for tok in str(v).replace(",", " ").split():
            if tok.lower() == "all":
                every = True
                continue
            try:
                k = int(tok)
            except ValueError:
                raise UsageError(f"--shots {tok!r} is not a number or 'all'", fix="e.g. --shots 8 32 all") from None
            if k < 1:
                raise UsageError(f"--shots {k} must be at least 1", fix="e.g. --shots 8 32 all")
            out.add(k)
    return [*sorted(out), *([None] if every else [])]


def shots_name(k: int | None) -> str:
    return "all" if k is None else str(k)


# ------------------------------------------------------------------------------------ the adapter
def save_adapter(out_dir: Path, fm, prompt: LabelPrompt, meta: dict[str, Any]) -> Path:
    """Write the adapted LoRA (PEFT folder) and ``adapter.json`` atomically (temp folder, rename)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        fm.llm.save_pretrained(str(tmp))
        weights = tmp / "adapter_model.safetensors"
        full = {"Description": "Few-shot LoRA adapter of an fMRI-LM for a user's label (bids_fmrilm group level); "
                               "use with `bids_fmrilm ... participant --model <ModelID's checkpoint> --adapter DIR`",
                **prompt.to_dict(), **meta,
                "AdapterID": hashlib.sha256(weights.read_bytes()).hexdigest()[:16]}
        (tmp / ADAPTER_META).write_text(json.dumps(full, indent=2, default=str))
    return out_dir


def read_adapter(path: str | os.PathLike, model_id: str) -> dict[str, Any]:
    """``adapter.json`` of a group-level adapter, checked against the checkpoint it will extend."""
    path = Path(path)
    meta = read_json(path / ADAPTER_META)
    if not meta or not (path / "adapter_model.safetensors").is_file():
        raise UsageError("not a group-level adapter (adapter.json or adapter_model.safetensors missing)", path=path,
                         fix="pass the group/label-<L>_adapter folder written by the group level")
    if str(meta.get("ModelID")) != str(model_id):
        raise UsageError(f"adapter was trained on model {meta.get('ModelID')}, not {model_id}", path=path,
                         fix=f"pass --model with the checkpoint {meta.get('ModelID')}")
    return meta


def attach_adapter(fm, path: str | os.PathLike, name: str = "label") -> None:
    """Load a group-level adapter beside the checkpoint's own (active only when selected)."""
    fm.llm.load_adapter(str(path), adapter_name=name, is_trainable=False)
    fm.llm.set_adapter("default")


# ------------------------------------------------------------------------------------ cross-validation
@dataclass
class FMRILMResult:
    """Out-of-fold predictions of the fMRI-LM methods and how the adapters were trained."""

    predictions: dict[str, np.ndarray]
    adaptation: list[dict[str, Any]]
    prompt: LabelPrompt | None = None


def fmrilm_cv(checkpoint: str | os.PathLike, meta: dict[str, Any], name: str, task_type: str,
              classes: list[str] | None, participants: Sequence[str], y: np.ndarray, folds,
              runs: dict[str, list[PreparedRun]], shots: Sequence[int | None], settings: AdaptSettings) -> FMRILMResult:
    """Zero-shot, embedding-probe, encoder-probe and few-shot (one method per K) predictions on
    ``folds``.

    ``meta`` is the checkpoint's ``fmrilm.json`` as read (hashes checked) by the caller. Zero-shot
    answers and embeddings come from the checkpoint as trained; each (fold, K) trains a fresh
    adapter on ``K`` training participants per class and scores the fold's held-out participants.
    Nothing of a held-out participant reaches training (asserted).
    """
    from .crossval import linear_baseline, out_of_fold

    pids = np.asarray(participants)
    tasks = [Task.from_dict(t) for t in meta.get("tasks", [])]
    shape = (len(pids), len(classes)) if classes else (len(pids),)
    model = FMRILMModel.load(checkpoint, device=settings.device, quantization=settings.quantization, verify=False)
    emb = embed_participants(model, runs, pids)
    zero = np.full(shape, np.nan)
    prompt = None
    if classes:
        prompt = label_prompt(name, task_type, classes, tasks)
        zero[:] = prompt.to_prediction(score_participants(model, prompt, runs, pids), classes)
    else:  # the bins come from each fold's training targets
        for train, test in folds.splits:
            p = label_prompt(name, task_type, [], tasks, y[train])
            zero[test] = p.to_prediction(score_participants(model, p, runs, pids[test]), None)
    del model
    log.info("fMRI-LM zero-shot and embeddings: %d participants (%s)", len(pids),
             f"task {prompt.task.name!r}" if prompt else "regression bins per fold")

    def probe(x):
        return out_of_fold(lambda yt: linear_baseline(task_type, yt, settings.seed), x, y, folds, classes)

    preds = {"fmrilm_zeroshot": zero, "fmrilm_embedding_probe": probe(emb)}
    enc = encoder_participants(runs, pids)
    if enc is not None:
        preds["fmrilm_encoder_probe"] = probe(enc)
    rows: list[dict[str, Any]] = []
    for k in shots:
        out = np.full(shape, np.nan)
        for f, (train, test) in enumerate(folds.splits):
            p = label_prompt(name, task_type, classes or [], tasks, y[train])
            sel = select_shots(y, train, k, task_type, settings.seed + f)
            assert not set(pids[sel]) & set(pids[test]), "a held-out participant is in the few-shot training set"
            examples, groups = shot_examples(p, y, sel, runs, pids)
            model, info = adapt(checkpoint, examples, p, settings, verify=False, groups=groups)
            out[test] = p.to_prediction(score_participants(model, p, runs, pids[test]), classes)
            del model
            rows.append({"shots": shots_name(k), "fold": f, "participants": int(len(sel)), **info})
            log.info("few-shot K=%s fold %d/%d: %d participants, calibration %s, loss %.3f -> %.3f, validation %s, "
                     "kept step %d, %.0f s", shots_name(k), f + 1, len(folds.splits), len(sel),
                     (info["recalibration"] or {}).get("chosen", "-"), info["first_loss"], info["last_loss"],
                     " ".join(f"{v:.3f}" for _, v in info["validation_curve"]) or "none", info["kept_step"],
                     info["seconds"])
        preds[f"fmrilm_fewshot_{shots_name(k)}"] = out
    return FMRILMResult(preds, rows, prompt)


def final_adapter(checkpoint: str | os.PathLike, meta: dict[str, Any], out_dir: Path, name: str, task_type: str,
                  classes: list[str] | None, participants: Sequence[str], y: np.ndarray,
                  runs: dict[str, list[PreparedRun]], shots: int | None, settings: AdaptSettings) -> Path:
    """Adapt on every labelled participant (``shots`` per class) and save the adapter."""
    tasks = [Task.from_dict(t) for t in meta.get("tasks", [])]
    pids = np.asarray(participants)
    p = label_prompt(name, task_type, classes or [], tasks, y)
    sel = select_shots(y, np.arange(len(pids)), shots, task_type, settings.seed)
    examples, groups = shot_examples(p, y, sel, runs, pids)
    model, info = adapt(checkpoint, examples, p, settings, verify=False, groups=groups)
    path = save_adapter(out_dir, model.fm, p, {
        "ModelID": meta.get("id"), "Label": name, "Classes": classes, "Shots": shots_name(shots),
        "Participants": [f"sub-{x}" for x in pids[sel]],
        "Settings": {k: v for k, v in settings.__dict__.items() if k not in ("device",)},
        "Calibration": info.get("calibration"), "Training": info})
    log.info("final adapter (%d participants, K=%s) -> %s", len(sel), shots_name(shots), path)
    return path

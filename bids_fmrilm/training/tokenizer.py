"""``fmrilm train-tokenizer``: train the VQ tokenizer on a descriptor corpus + ROI time series.

Runs under Hugging Face ``accelerate`` (CPU here; DDP/FSDP on GPUs via ``accelerate launch``),
seeded, resumable from ``OUT_DIR/checkpoint`` (``accelerator.save_state``), with a rich progress
bar and ``OUT_DIR/metrics.jsonl`` (one JSON line per logged step, then the evaluation).

The split is site-disjoint: runs of the held-out sites are never seen in training. Held-out
metrics (stored in the checkpoint's ``tokenizer.json`` and in ``OUT_DIR/metrics.json``):

- ``recon_r2``: reconstruction R^2 of the robust-scaled signal, pooled over patches and ROIs
  (1 - SSE/SST, SST about the held-out mean);
- ``kmeans_r2``: the same-bits baseline measured in the same run -- MiniBatchKMeans with the
  same codebook size on raw training patches, applied to the held-out patches;
- ``codebook_usage`` (fraction of codes used on held-out tokens) and ``perplexity``;
- ``recall_at_1`` (and ``recall_at_5``): fMRI-to-text retrieval among 100 candidates, averaged
  over random 100-run candidate sets of held-out runs (chance 0.01);
- ``fc_recon_r2`` (designs that reconstruct FC): R^2 of each window's reconstructed Fisher-z FC;
- ``probe`` (information gate 1): per label (diagnosis, sex), held-out AUROC of a linear probe on
  the run representation (:meth:`Tokenizer.run_representation`) and of logistic regression on
  the runs' FC, both fitted on the training sites' runs.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError, MissingInputError, UsageError
from ..tokenizer.config import TokenizerConfig, get_config
from ..tokenizer.data import RunData, frame_mask, load_timeseries_dir, parse_entities, patchify, run_key
from ..tokenizer.model import TokenizerModel, reconstruction_losses, usage_and_perplexity
from ..tokenizer.tokenizer import Tokenizer
from .schedule import warmup_cosine
from .text_cache import TEXT_TEMPLATE, cached_text_embeddings

CHECKPOINT = "checkpoint"


# ------------------------------------------------------------------------------------ data
def read_corpus_texts(corpus_jsonl: str | os.PathLike) -> dict[tuple, dict]:
    """``{run key: {"text", "site", "phenotype", "path"}}`` of a descriptor corpus."""
    lines = []
    if Path(corpus_jsonl).is_file():
        with open(corpus_jsonl, encoding="utf-8") as fh:
            for raw in fh:
                if raw.strip():
                    try:
                        lines.append(json.loads(raw))
                    except json.JSONDecodeError:  # a partial last line of a corpus being written
                        break
    if not lines:
        raise MissingInputError("descriptor corpus is empty or missing", path=corpus_jsonl,
                                fix="build it with `fmrilm corpus INPUT_DIR OUT.jsonl`")
    out = {}
    for line in lines:
        run = dict(line.get("run") or {})
        if not run.get("subject") and run.get("path"):
            run = {**parse_entities(run["path"]), **run}
        if not line.get("text"):
            continue
        pheno = line.get("phenotype") or {}
        out[run_key(run)] = {"text": line["text"], "site": str(pheno.get("site", "unknown")),
                             "phenotype": pheno, "path": run.get("path")}
    return out


def choose_heldout_sites(sites: Sequence[str], seed: int = 0, fraction: float = 0.2, n_min: int = 3,
                         max_fraction: float = 0.35) -> list[str]:
    """Sites to hold out, chosen by ``seed``: at least ``n_min`` sites (when there are more than
    ``n_min``) and ``fraction`` of the runs, skipping sites that would take more than
    ``max_fraction`` of the runs."""
    sites = list(sites)
    names = sorted(set(sites))
    if len(names) < 2:
        raise UsageError("a site-disjoint split needs runs from at least two sites",
                         fix="give sites in participants.tsv (column `site`) or pass --heldout-sites")
    counts = {s: sites.count(s) for s in names}
    order = random.Random(seed).sample(names, len(names))
    chosen, total, n = [], 0, len(sites)
    for s in order:
        if len(chosen) >= min(n_min, len(names) - 1) and total >= fraction * n:
            break
        if len(chosen) == len(names) - 1:
            break
        if total + counts[s] > max_fraction * n and chosen:
            continue
        chosen.append(s)
        total += counts[s]
    return sorted(chosen)


class CropDataset(torch.utils.data.Dataset):
    """Random crops of ``crop`` patches of each training run (deterministic per seed, epoch, index).

    Items: patches (crop,R,P), frame mask (crop,P) of real volumes (padding patches and the
    padded end of a partial patch are False), run index, log scale (R,).
    """

    def __init__(self, patches: list[np.ndarray], crop: int, seed: int, log_scales: list[np.ndarray] | None = None,
                 lengths: list[np.ndarray] | None = None):
        self.patches, self.crop, self.seed, self.epoch = patches, crop, seed, 0
        self.log_scales = log_scales or [np.zeros(p.shape[1], dtype=np.float32) for p in patches]
        self.lengths = lengths or [np.full(p.shape[0], p.shape[2]) for p in patches]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.patches)

    def __getitem__(self, i):
        p, lengths = self.patches[i], self.lengths[i]  # (n,R,P), (n,)
        n = p.shape[0]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        if n > self.crop:
            s = int(rng.integers(0, n - self.crop + 1))
            p, lengths = p[s:s + self.crop], lengths[s:s + self.crop]
        mask = np.zeros((self.crop, p.shape[2]), dtype=bool)
        mask[: p.shape[0]] = frame_mask(lengths, p.shape[2])
        if p.shape[0] < self.crop:
            p = np.concatenate([p, np.zeros((self.crop - p.shape[0],) + p.shape[1:], dtype=p.dtype)])
        return (torch.from_numpy(np.ascontiguousarray(p)), torch.from_numpy(mask), i,
                torch.from_numpy(np.asarray(self.log_scales[i], dtype=np.float32)))


# ------------------------------------------------------------------------------------ metrics
def r2_score_pooled(pred: np.ndarray, target: np.ndarray) -> float:
    """1 - SSE/SST over all values (SST about the pooled mean)."""
    sse = float(((pred - target) ** 2).sum())
    sst = float(((target - target.mean()) ** 2).sum())
    return 1.0 - sse / max(sst, 1e-12)


def retrieval_recall(f: np.ndarray, t: np.ndarray, n_candidates: int = 100, repeats: int = 200,
                     seed: int = 0, ks=(1, 5)) -> dict:
    """fMRI->text recall@k among random ``n_candidates``-run sets (rows of f and t are paired)."""
    n = f.shape[0]
    m = min(n_candidates, n)
    rng = np.random.default_rng(seed)
    hits = {k: [] for k in ks}
    sim = f @ t.T
    for _ in range(repeats if n > m else 1):
        idx = rng.choice(n, m, replace=False)
        s = sim[np.ix_(idx, idx)]
        rank = (s > s.diagonal()[:, None]).sum(1)  # 0 = best
        for k in ks:
            hits[k].append(float((rank < k).mean()))
    return {**{f"recall_at_{k}": float(np.mean(v)) for k, v in hits.items()},
            "n_candidates": m, "chance_at_1": 1.0 / m}


@torch.no_grad()
def evaluate(model: TokenizerModel, patches: list[np.ndarray], coords: torch.Tensor,
             text_emb: np.ndarray | None, seed: int = 0, log_scales: list[np.ndarray] | None = None,
             lengths: list[np.ndarray] | None = None) -> tuple[dict, np.ndarray]:
    """Held-out metrics of a model on full runs (eval mode), and the runs' representations
    (:meth:`Tokenizer.run_representation`, one row per run) for the linear probes."""
    model.eval()
    sse = 0.0
    vals, ids_all, runs_emb, reps, fc_sse, fc_sst = [], [], [], [], 0.0, 0.0
    for j, p in enumerate(patches):
        x = torch.from_numpy(p)[None]
        L = np.full(p.shape[0], p.shape[2]) if lengths is None else lengths[j]
        fm = torch.from_numpy(frame_mask(L, p.shape[2]))[None]
        ls = None if log_scales is None else torch.from_numpy(np.asarray(log_scales[j], dtype=np.float32))[None]
        out = model(x, coords, frame_mask=fm, with_embedding=text_emb is not None, log_scale=ls)
        real = fm[0][:, None, :].expand(p.shape).numpy()
        vals.append(p[real])
        sse += float(((out["recon"][0].numpy() - p)[real] ** 2).sum())
        ids_all.append(out["ids"].reshape(-1))
        reps.append(Tokenizer.run_representation(out["z"][0].numpy(), L))
        if "fc" in out:
            R = p.shape[1]
            iu = np.triu_indices(R, 1)
            f, r = out["fc"][0].numpy()[:, iu[0], iu[1]], out["fc_recon"][0].numpy()[:, iu[0], iu[1]]
            fc_sse += float(((r - f) ** 2).sum())
            fc_sst += float(((f - f.mean(1, keepdims=True)) ** 2).sum())
        if text_emb is not None:
            runs_emb.append(out["run_emb"][0].numpy())
    target = np.concatenate(vals)
    sst_n = float(((target - target.mean()) ** 2).sum())
    usage, ppl = usage_and_perplexity(torch.cat(ids_all), model.cfg.codebook_size)
    res = {"recon_r2": 1.0 - sse / max(sst_n, 1e-12), "codebook_usage": usage, "perplexity": ppl,
           "n_runs": len(patches), "n_tokens": int(sum(a.numel() for a in ids_all))}
    if fc_sst > 0:
        res["fc_recon_r2"] = 1.0 - fc_sse / fc_sst  # about each patch's mean connectivity
    if text_emb is not None and len(patches) >= 2:
        t = model.embed_text(torch.as_tensor(text_emb, dtype=torch.float32)).numpy()
        res.update(retrieval_recall(np.stack(runs_emb), t, seed=seed))
    return res, np.stack(reps)


def run_fc(ts: np.ndarray) -> np.ndarray:
    """Upper-triangle Fisher-z FC of a robust-scaled run over all its volumes (the FC baseline's
    features; zero-variance regions give 0)."""
    iu = np.triu_indices(ts.shape[1], 1)
    with np.errstate(all="ignore"):
        c = np.corrcoef(np.asarray(ts, dtype=np.float64).T)[iu]
    return np.arctanh(np.clip(np.nan_to_num(c), -0.999, 0.999)).astype(np.float32)


PROBE_LABELS = {"diagnosis": "TD", "sex": "M"}
"""Phenotype columns of the information gates, each with its positive class."""


def probe_gates(train_x: np.ndarray, test_x: np.ndarray, train_fc: np.ndarray, test_fc: np.ndarray,
                train_pheno: list[dict], test_pheno: list[dict], seed: int = 0) -> dict:
    """Information gate 1: held-out AUROC of a linear probe on the tokenizer's run representation
    beside logistic regression on FC, fitted on the same training runs (the group level's
    pipeline: standardise, PCA, logistic with inner CV), for each label of :data:`PROBE_LABELS`
    with both classes on both sides of the split."""
    from sklearn.metrics import roc_auc_score

    from ..levels.crossval import linear_baseline

    out = {}
    for label, pos in PROBE_LABELS.items():
        ytr = np.array([str(p.get(label)) == pos if p.get(label) not in (None, "") else -1 for p in train_pheno], int)
        yte = np.array([str(p.get(label)) == pos if p.get(label) not in (None, "") else -1 for p in test_pheno], int)
        tr, te = ytr >= 0, yte >= 0
        if len(set(ytr[tr])) < 2 or len(set(yte[te])) < 2:
            continue
        res = {"positive": pos, "n_train": int(tr.sum()), "n_test": int(te.sum())}
        for name, a, b in (("probe", train_x, test_x), ("fc_logistic", train_fc, test_fc)):
            m = linear_baseline("classification", ytr[tr], seed=seed).fit(a[tr], ytr[tr])
            res[f"{name}_auroc"] = float(roc_auc_score(yte[te], m.predict_proba(b[te])[:, 1]))
        res["probe_beats_fc"] = res["probe_auroc"] >= res["fc_logistic_auroc"]
        out[label] = res
    return out


def kmeans_baseline(train: list[np.ndarray], test: list[np.ndarray], k: int, seed: int = 0,
                    max_samples: int = 200_000, test_lengths: list[np.ndarray] | None = None) -> dict:
    """Same-bits baseline: MiniBatchKMeans (k codes) on raw training patches; held-out R^2 over
    the real volumes (``test_lengths``: valid volumes of each test patch; zero-padded partial
    patches are coded as they are)."""
    from sklearn.cluster import MiniBatchKMeans

    P = train[0].shape[-1]
    xtr = np.concatenate([p.reshape(-1, P) for p in train])
    rng = np.random.default_rng(seed)
    if xtr.shape[0] > max_samples:
        xtr = xtr[rng.choice(xtr.shape[0], max_samples, replace=False)]
    km = MiniBatchKMeans(n_clusters=k, batch_size=4096, n_init=3, max_iter=50, random_state=seed).fit(xtr)
    xte = np.concatenate([p.reshape(-1, P) for p in test])
    rec = km.cluster_centers_[km.predict(xte)]
    if test_lengths is not None:
        real = np.concatenate([np.repeat(frame_mask(L, P), p.shape[1], axis=0) for L, p in zip(test_lengths, test)])
        rec, xte = rec[real], xte[real]
    return {"kmeans_r2": r2_score_pooled(rec, xte), "kmeans_k": k, "kmeans_train_patches": int(xtr.shape[0])}


# ------------------------------------------------------------------------------------ training
def _log_scale(run: RunData) -> np.ndarray:
    if run.log_scale is None:
        return np.zeros(run.ts.shape[1], dtype=np.float32)
    return np.asarray(run.log_scale, dtype=np.float32)


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def train_tokenizer(
    corpus_jsonl: str | os.PathLike,
    timeseries_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    config: str | TokenizerConfig = "cpu",
    seed: int = 0,
    heldout_sites: Sequence[str] | None = None,
    max_minutes: float | None = None,
    llm: str | None = None,
    text_template: str | None = TEXT_TEMPLATE,
    text_embeddings: np.ndarray | None = None,
    word_embeddings: np.ndarray | None = None,
    runs: list[RunData] | None = None,
    progress: bool = True,
    eval_repeats: int = 200,
    **overrides,
) -> dict:
    """Train a tokenizer and write its checkpoint to ``out_dir``; returns the metrics.

    Parameters
    ----------
    corpus_jsonl : path
        Descriptor corpus (``fmrilm corpus``); joined with the runs by subject/session/task/run.
    timeseries_dir : path
        Participant-level output with ``sub-*/[ses-*/]func/*_timeseries.tsv[.gz]`` (default: the
        corpus file's folder).
    config : str or TokenizerConfig
        ``tiny``, ``cpu`` or ``paper`` (or a config); ``overrides`` replace its fields.
    heldout_sites : sequence of str, optional
        Sites kept out of training for evaluation (default: chosen by ``seed``, >= 3 sites and
        >= 20 % of the runs).
    max_minutes : float, optional
        Stop training (checkpointed, then evaluated) after this much wall time.
    text_embeddings : ndarray, optional
        Precomputed text embeddings, one row per corpus text (tests); default: the frozen base
        LLM's, cached in ``out_dir/text_embeddings.npy``.
    word_embeddings : ndarray, optional
        LLM word embeddings for the adversarial loss (default: the base LLM's, when
        ``adversarial_weight > 0``).
    runs : list of RunData, optional
        Already-loaded runs (tests); default: read from ``timeseries_dir``.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    t0 = time.time()
    if os.environ.get("BIDS_FMRILM_THREADS"):
        torch.set_num_threads(int(os.environ["BIDS_FMRILM_THREADS"]))
    cfg = get_config(config, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator()
    log = accelerator.print
    set_seed(seed)

    # ---- data: corpus texts joined with runs, site-disjoint split
    texts = read_corpus_texts(corpus_jsonl)
    if runs is None:
        ts_dir = Path(timeseries_dir) if timeseries_dir else Path(corpus_jsonl).parent
        runs = load_timeseries_dir(ts_dir, keys=set(texts))
    runs = [r for r in runs if r.key in texts]
    if not runs:
        raise MissingInputError("no run of the time-series folder matches a corpus line (by subject/session/task/run)",
                                path=timeseries_dir, fix="pass the participant-level output the corpus was built from")
    sigs = {(tuple(r.columns)) for r in runs}
    if len(sigs) > 1:
        raise DataError("training runs use different ROI sets; train on one atlas at a time",
                        fix="pass a folder with one atlas, or a corpus of one atlas")
    min_len = cfg.min_patch_len or cfg.patch_len
    short = [r for r in runs if r.ts.shape[0] < min_len]
    if short:
        log(f"skipping {len(short)} runs shorter than one patch ({min_len} volumes)")
        runs = [r for r in runs if r.ts.shape[0] >= min_len]
    sites = [texts[r.key]["site"] for r in runs]
    held = sorted(heldout_sites) if heldout_sites else choose_heldout_sites(sites, seed)
    unknown = set(held) - set(sites)
    if unknown:
        raise UsageError(f"held-out sites not in the corpus: {', '.join(sorted(unknown))}",
                         fix=f"choose among {', '.join(sorted(set(sites)))}")
    train_runs = [r for r, s in zip(runs, sites) if s not in held]
    test_runs = [r for r, s in zip(runs, sites) if s in held]
    if not train_runs or not test_runs:
        raise UsageError("the site split leaves no training or no held-out runs", fix="choose other --heldout-sites")
    log(f"{len(train_runs)} training runs, {len(test_runs)} held-out runs (sites {', '.join(held)})")

    # ---- text embeddings (frozen LLM, cached next to the output)
    all_texts = [texts[r.key]["text"] for r in runs]
    if text_embeddings is None:
        with accelerator.main_process_first():
            emb = cached_text_embeddings(all_texts, out / "text_embeddings", llm=llm, template=text_template,
                                         log=log)
    else:
        by_text = dict(zip([texts[k]["text"] for k in texts], text_embeddings))
        emb = np.stack([by_text[t] for t in all_texts])
    emb = emb.astype(np.float32)
    is_train = np.array([s not in held for s in sites])
    train_text = torch.from_numpy(emb[is_train])
    test_text = emb[~is_train]
    if cfg.adversarial_weight > 0 and word_embeddings is None:
        from ..model.llm import load_base_llm, word_embeddings as _we

        word_embeddings = _we(load_base_llm(llm)[0])

    coords = torch.from_numpy(np.asarray(train_runs[0].coords, dtype=np.float32))
    train_p, train_len = zip(*[patchify(r.ts, cfg.patch_len, r.path, min_len, return_lengths=True) for r in train_runs])
    test_p, test_len = zip(*[patchify(r.ts, cfg.patch_len, r.path, min_len, return_lengths=True) for r in test_runs])
    train_p, test_p, train_len, test_len = list(train_p), list(test_p), list(train_len), list(test_len)

    # ---- model, optimiser, data loader
    torch.manual_seed(seed)
    model = TokenizerModel(cfg, text_dim=emb.shape[1],
                           llm_dim=word_embeddings.shape[1] if cfg.adversarial_weight > 0 else 0)
    model.text_mean.copy_(train_text.mean(0))
    groups = []
    for is_enc in (False, True):
        for wd in (True, False):
            ps = [p for n, p in model.named_parameters()
                  if p.requires_grad and n.startswith("encoder.") == is_enc and (p.ndim >= 2) == wd]
            if ps:
                groups.append({"params": ps, "weight_decay": cfg.weight_decay if wd else 0.0,
                               "lr": cfg.lr * (cfg.encoder_lr_scale if is_enc else 1.0)})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps, cfg.max_steps))
    train_ls = [_log_scale(r) for r in train_runs]
    test_ls = [_log_scale(r) for r in test_runs]
    levels = np.array([np.median(v) for v in train_ls])
    model.pooler.level_mean.fill_(float(levels.mean()))
    model.pooler.level_std.fill_(float(max(levels.std(), 1e-3)))
    ds = CropDataset(train_p, min(cfg.crop_patches, max(p.shape[0] for p in train_p)), seed, train_ls, train_len)
    g = torch.Generator().manual_seed(seed)
    bs = min(cfg.batch_size, len(ds))
    dl = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, drop_last=True, generator=g)
    model, opt, dl, sched = accelerator.prepare(model, opt, dl, sched)
    raw = accelerator.unwrap_model(model)
    dev = accelerator.device
    coords_d, train_text_d = coords.to(dev), train_text.to(dev)
    word_d = None if word_embeddings is None else torch.as_tensor(word_embeddings, dtype=torch.float32).to(dev)

    # ---- resume
    ckpt = out / CHECKPOINT
    step = 0
    if (ckpt / "trainer_state.json").is_file():
        accelerator.load_state(str(ckpt))
        step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
        log(f"resumed from {ckpt} at step {step}")
    metrics_path = out / "metrics.jsonl"
    steps_per_epoch = len(dl)

    def batches(start_step):
        epoch, skip = divmod(start_step, steps_per_epoch)
        while True:
            ds.set_epoch(epoch)
            g.manual_seed(seed * 100_003 + epoch)
            loader = accelerator.skip_first_batches(dl, skip) if skip else dl
            yield from loader
            epoch, skip = epoch + 1, 0

    # ---- k-means initialisation of the codebook from the first batches' encoder outputs
    if not bool(raw.quantizer.initialized):
        zs = []
        it = batches(0)
        with torch.no_grad():
            for _ in range(max(1, min(cfg.kmeans_init_batches, steps_per_epoch))):
                x, fmask, _, _ = next(it)
                mask = fmask.any(-1)
                z, _ = raw.encode(x, coords_d, mask, frame_mask=fmask)
                zs.append(z[mask].reshape(-1, z.shape[-1]))
        zall = torch.cat(zs)
        raw.quantizer.kmeans_init(zall, iters=cfg.kmeans_iters, n_batches=len(zs), seed=seed)
        log(f"codebook initialised by k-means on {zall.shape[0]} encoder outputs")

    def save_checkpoint(at_step):
        accelerator.wait_for_everyone()
        accelerator.save_state(str(ckpt))
        if accelerator.is_main_process:
            _atomic_json(ckpt / "trainer_state.json", {"step": at_step, "config": cfg.to_dict(), "seed": seed})

    model.train()
    it = batches(step)
    off_gen = torch.Generator().manual_seed(seed * 7919 + step)
    t_loop = time.time()
    prep_s = t_loop - t0
    log(f"data, text embeddings and codebook initialisation took {prep_s:.0f} s; training")
    limit = None if max_minutes is None else t_loop + 60 * max_minutes
    window: dict[str, list] = {}
    prog = Progress(TextColumn("train-tokenizer"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[info]}"), disable=not (progress and accelerator.is_main_process))
    stopped_early = False
    with prog:
        task = prog.add_task("train", total=cfg.max_steps, completed=step, info="")
        while step < cfg.max_steps:
            x, fmask, idx, log_scale = next(it)
            mask = fmask.any(-1)
            need_emb = cfg.contrastive_weight > 0
            # random time offset, so that positions of long runs are seen in training
            off = int(torch.randint(0, max(1, cfg.max_position - x.shape[1] + 1), (1,), generator=off_gen))
            o = model(x, coords_d, mask, with_embedding=need_emb, text_emb=train_text_d if need_emb else None,
                      offset=off, log_scale=log_scale, frame_mask=fmask)
            rec = reconstruction_losses(o, x, fmask, cfg)
            loss = rec["mse"] + cfg.spectral_weight * rec["spectral"] + cfg.commitment * o["commit"]
            if "fc" in rec:
                loss = loss + cfg.fc_weight * rec["fc"]
            parts = {k: v.item() for k, v in rec.items()} | {"commit": o["commit"].item()}
            if need_emb:
                f, t = o["run_emb"], o["text_emb"]
                logits = o["logit_scale"] * f @ t.t()  # fMRI -> every training text
                f2t = F.cross_entropy(logits, idx.to(dev))
                t2f = F.cross_entropy(logits[:, idx.to(dev)].t(), torch.arange(len(idx), device=dev))
                nce = 0.5 * (f2t + t2f)
                loss = loss + cfg.contrastive_weight * nce
                parts["nce"] = nce.item()
            if cfg.adversarial_weight > 0:
                adv = raw.adversarial_loss(o["q"], word_d)
                loss = loss + cfg.adversarial_weight * adv
                parts["adversarial"] = adv.item()
            opt.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if cfg.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            with torch.no_grad():
                u, ppl = usage_and_perplexity(o["ids"][mask], cfg.codebook_size)
            parts.update(loss=loss.item(), usage=u, perplexity=ppl)
            for k, v in parts.items():
                window.setdefault(k, []).append(v)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                rec = {"step": step, "lr": sched.get_last_lr()[0], "elapsed_s": round(time.time() - t0, 1),
                       "restarts": int(raw.quantizer.restarts), **{k: float(np.mean(v)) for k, v in window.items()}}
                window = {}
                if accelerator.is_main_process:
                    with open(metrics_path, "a") as fh:
                        fh.write(json.dumps(rec) + "\n")
                prog.update(task, info=f"loss {rec['loss']:.3f} mse {rec['mse']:.3f} use {rec['usage']:.2f}")
                if not (progress and accelerator.is_main_process):
                    log(json.dumps(rec))
            prog.update(task, completed=step)
            if step % cfg.checkpoint_every == 0:
                save_checkpoint(step)
            if limit is not None and time.time() > limit:
                log(f"stopping at step {step}: --max-minutes {max_minutes} reached")
                stopped_early = True
                break
    save_checkpoint(step)
    train_s = time.time() - t_loop

    # ---- evaluation on held-out sites, same-bits baseline, checkpoint
    metrics: dict = {}
    if accelerator.is_main_process:
        raw.cpu()
        held_metrics, test_rep = evaluate(raw, test_p, coords, test_text, seed=seed, log_scales=test_ls,
                                          lengths=test_len)
        _, train_rep = evaluate(raw, train_p, coords, None, log_scales=train_ls, lengths=train_len)
        gates = probe_gates(train_rep, test_rep, np.stack([run_fc(r.ts) for r in train_runs]),
                            np.stack([run_fc(r.ts) for r in test_runs]),
                            [texts[r.key]["phenotype"] for r in train_runs],
                            [texts[r.key]["phenotype"] for r in test_runs], seed=seed)
        for label, g in gates.items():
            log(f"gate 1, {label}: linear probe AUROC {g['probe_auroc']:.3f} vs FC logistic {g['fc_logistic_auroc']:.3f}")
        base = kmeans_baseline(train_p, test_p, cfg.codebook_size, seed=seed, test_lengths=test_len)
        metrics = {**held_metrics, **base, "beats_kmeans": held_metrics["recon_r2"] > base["kmeans_r2"],
                   "probe": gates,
                   "steps": step, "stopped_early": stopped_early, "train_wall_s": round(train_s, 1),
                   "prep_wall_s": round(prep_s, 1),
                   "total_wall_s": round(time.time() - t0, 1)}
        meta = {
            "metrics": {"heldout": metrics},
            "atlas": {"name": train_runs[0].atlas, "columns": list(train_runs[0].columns),
                      "coords": np.asarray(train_runs[0].coords).tolist()},
            "training": {"corpus": str(corpus_jsonl), "timeseries_dir": str(timeseries_dir), "seed": seed,
                         "heldout_sites": held, "train_sites": sorted(set(sites) - set(held)),
                         "n_train_runs": len(train_runs), "n_heldout_runs": len(test_runs),
                         "text_template": text_template},
            "base_llm": dict(zip(("id", "hash"), _llm_id(llm))),
            "tr": float(train_runs[0].extra.get("tr", 2.0)),
        }
        Tokenizer(raw, meta).save(out)
        _atomic_json(out / "metrics.json", metrics)
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps({"eval": "heldout", **metrics}) + "\n")
        log(json.dumps(metrics, indent=2))
    accelerator.wait_for_everyone()
    return metrics


def parse_settings(settings: Sequence[str], config_cls) -> dict:
    """``FIELD=VALUE`` strings -> config overrides, each value cast to the field's type."""
    import dataclasses

    types = {f.name: type(f.default if f.default is not dataclasses.MISSING else f.default_factory())
             for f in dataclasses.fields(config_cls)}
    out: dict = {}
    for item in settings:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in types:
            raise UsageError(f"--set {item!r}: expected FIELD=VALUE with a field of the {config_cls.__name__}",
                             fix=f"fields: {', '.join(sorted(types))}")
        kind = types[key]
        try:
            if kind is bool:
                if value.strip().lower() not in {"true", "false", "1", "0", "yes", "no"}:
                    raise ValueError(value)
                out[key] = value.strip().lower() in {"true", "1", "yes"}
            elif kind in (tuple, list):
                out[key] = tuple(v.strip() for v in value.split(",") if v.strip())
            elif kind is dict:
                out[key] = json.loads(value)
            else:
                out[key] = kind(value)
        except (ValueError, json.JSONDecodeError):
            raise UsageError(f"--set {item!r}: {value!r} is not a {kind.__name__}", fix=f"give {key} a {kind.__name__}")
    return out


def _llm_id(llm):
    try:
        from ..model.llm import base_llm_id_and_hash

        return base_llm_id_and_hash(llm)
    except Exception:  # provenance only
        return (str(llm), "")


# ------------------------------------------------------------------------------------ CLI
@click.command("train-tokenizer")
@click.argument("corpus_jsonl", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--timeseries", "timeseries_dir", type=click.Path(exists=True, file_okay=False),
              help="Participant-level output with *_timeseries.tsv.gz runs (default: the corpus's folder).")
@click.option("--config", "config_name", type=click.Choice(["tiny", "cpu", "patch", "paper"]), default="cpu",
              show_default=True, help="cpu/paper: per-region tokens over long windows with FC input; patch: 8-volume patches.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--heldout-sites", default=None, help="Comma-separated sites kept out of training (default: chosen by seed).")
@click.option("--max-minutes", type=float, default=None,
              help="Stop the training loop after this much wall time (checkpointed), then evaluate.")
@click.option("--max-steps", type=int, default=None, help="Override the config's number of steps.")
@click.option("--llm", default=None, help="Base LLM for text embeddings (default SmolLM2-135M-Instruct).")
@click.option("--set", "settings", multiple=True, metavar="FIELD=VALUE",
              help="Override a config field (repeatable), e.g. --set fc_input=false --set fc_weight=0 (ablations).")
def train_tokenizer_command(corpus_jsonl, out_dir, timeseries_dir, config_name, seed, heldout_sites, max_minutes,
                            max_steps, llm, settings):
    """Train the VQ fMRI tokenizer on CORPUS_JSONL + ROI time series; write it to OUT_DIR."""
    held = [s.strip() for s in heldout_sites.split(",") if s.strip()] if heldout_sites else None
    overrides = parse_settings(settings, TokenizerConfig)
    if max_steps:
        overrides["max_steps"] = max_steps
    train_tokenizer(corpus_jsonl, timeseries_dir, out_dir, config=config_name, seed=seed, heldout_sites=held,
                    max_minutes=max_minutes, llm=llm, **overrides)

"""How much of the tokenizer's encoder features the fMRI-LM's hidden states keep, read by linear
heads fitted on training sites.

    python benchmarks/embedding_heads.py PARTICIPANT_OUT PARTICIPANTS_TSV CHECKPOINT --heldout LABELS_FILE
        [--n-train 0] [--lora-off] [--labels diagnosis,sex] [--n-boot 500]

``embedding_probe.py`` asks whether a linear probe fitted on a few participants finds a label in
the run embedding. A low probe has two readings: the encoder's features are gone from the hidden
states, or they are there but buried under variance that a probe on a hundred participants cannot
see past. This benchmark separates them. For every participant's first run in PARTICIPANT_OUT (its
token files from the checkpoint's tokenizer) it takes the run embedding the participant level
writes (mean final hidden state over the fMRI positions) and the LLM's input there (layer 0,
averaged), and, for a checkpoint with one position per region (``slot_pooling="region"``), each
region's input and final hidden state averaged over the run's windows. Ridge heads (standardised
inputs, penalty by generalised cross-validation) fitted on the runs *outside* ``--heldout`` map
them to the run's encoder representation (regions x features, the representation information
gate 1 probes): the run embedding to all of it, a region's state to its own region's features
(one head shared by every region). No label is used. On the held-out runs it reports the share of
the encoder features' variance each head gives back (R^2 against the training runs' mean) and the
group level's probe (standardise, PCA, logistic regression with inner CV; folds grouped by site,
AUROC within site, bootstrap interval) on the raw states, on each head's prediction, on the
encoder representation itself and on FC. ``--n-train N`` fits the heads on N training runs drawn
at random (0: all); ``--lora-off`` switches the checkpoint's LoRA and readout adapter off (the base
LLM reading the same projector output). Prints one JSON object.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _states(checkpoint, output_dir, pids, lora_off: bool) -> tuple[list[str], dict]:
    """``embedding_probe``'s features of each first run, per-region states as (runs, R, H)."""
    from embedding_probe import _features

    keep, f = _features(checkpoint, output_dir, pids, lora_off=lora_off)
    if "encoder" not in f:
        raise SystemExit(f"{checkpoint}: a run has no encoder features (a checkpoint that reads codebook vectors?)")
    N, R = f["encoder"].shape[:2]
    s = {k: f[k].astype(np.float32) for k in ("embedding", "llm_input", "encoder")}
    for kind in ("region_input", "region_embedding"):
        if kind in f:
            s[kind] = f[kind].reshape(N, R, -1).astype(np.float32)
    return keep, s


def _head(x_train: np.ndarray, t_train: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Ridge map fitted on (x_train -> t_train), applied to x; rows are samples."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    head = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-1, 5, 13)))
    # float64: the prediction's columns outnumber its rank, and the probe's standardisation blows
    # float32 rounding in the near-constant ones up to a few hundredths of AUROC
    return head.fit(x_train.astype(np.float64), t_train.astype(np.float64)).predict(x.astype(np.float64))


def main(output_dir: str, participants_tsv: str, checkpoint: str, heldout: str, n_train: int = 0,
         lora_off: bool = False, labels=("diagnosis", "sex"), n_boot: int = 500, seed: int = 0) -> dict:
    import pandas as pd

    from bids_fmrilm.levels.crossval import fc_features, linear_baseline, make_folds, out_of_fold, within_fold_auroc
    from bids_fmrilm.levels.labels import load_labels

    pids = list(pd.read_csv(participants_tsv, sep="\t", dtype=str).participant_id.str.replace("sub-", "", regex=False))
    held = {ln.strip().replace("sub-", "") for ln in open(heldout) if ln.strip()}
    train = [p for p in pids if p not in held]
    if n_train:
        train = sorted(np.random.default_rng(seed).choice(train, min(n_train, len(train)), replace=False))
    keep, s = _states(Path(checkpoint), Path(output_dir), [p for p in pids if p in held] + list(train), lora_off)
    te = np.array([p in held for p in keep])
    tr = ~te
    enc = s["encoder"]  # (N, R, c)
    N, R, c = enc.shape

    def r2(pred: np.ndarray) -> float:
        t = enc[te].reshape(te.sum(), -1)
        return round(float(1 - ((t - pred) ** 2).sum() / ((t - enc[tr].reshape(tr.sum(), -1).mean(0)) ** 2).sum()), 3)

    flat = enc.reshape(N, -1)
    kinds = {"encoder": flat[te]}
    out: dict = {"checkpoint": str(checkpoint), "lora_off": lora_off, "n_heldout": int(te.sum()),
                 "n_train": int(tr.sum()), "encoder_r2": {}, "probe": {}}
    for kind in ("embedding", "llm_input"):  # run-level states -> the whole run representation
        kinds[kind] = s[kind][te]
        pred = _head(s[kind][tr], flat[tr], s[kind][te])
        kinds[f"{kind}_head"], out["encoder_r2"][kind] = pred, r2(pred)
    for kind in ("region_input", "region_embedding"):  # each region's state -> its own features, one shared head
        if kind in s:
            x = s[kind]
            pred = _head(x[tr].reshape(-1, x.shape[-1]), enc[tr].reshape(-1, c),
                         x[te].reshape(-1, x.shape[-1])).reshape(te.sum(), -1)
            kinds[f"{kind}_head"], out["encoder_r2"][kind] = pred, r2(pred)
    hp = [p for p in keep if p in held]
    series = {p: sorted(Path(output_dir).glob(f"sub-{p}/**/func/*_timeseries.tsv.gz")) for p in hp}
    kinds["fc"] = np.stack([fc_features(series[p]) for p in hp])
    for label in labels:
        lab = load_labels(Path(participants_tsv), label, "classification", "site")
        use = [p for p in hp if p in lab.values.index]
        rows = [hp.index(p) for p in use]
        y = lab.values.loc[use].to_numpy()
        folds = make_folds(lab, use, 5, 0)  # the group level's folds (--cv-group site, seed 0)
        for kind, x in kinds.items():
            oof = out_of_fold(lambda yt: linear_baseline("classification", yt, 0), x[rows], y, folds, lab.classes)
            auc, ci = within_fold_auroc(y, oof, lab.classes, folds, n_boot=n_boot)
            out["probe"].setdefault(kind, {})[label] = {"auroc_within_fold": round(auc, 3),
                                                        "ci": np.round(ci, 3).tolist()}
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output_dir")
    ap.add_argument("participants_tsv")
    ap.add_argument("checkpoint")
    ap.add_argument("--heldout", required=True, help="participant labels (one per line) the heads never see")
    ap.add_argument("--n-train", type=int, default=0)
    ap.add_argument("--lora-off", action="store_true")
    ap.add_argument("--labels", default="diagnosis,sex")
    ap.add_argument("--n-boot", type=int, default=500)
    a = ap.parse_args()
    json.dump(main(a.output_dir, a.participants_tsv, a.checkpoint, a.heldout, a.n_train, a.lora_off,
                   a.labels.split(","), a.n_boot), sys.stdout, indent=2)
    print()

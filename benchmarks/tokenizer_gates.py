"""Information gate 1 for one or more tokenizers, on each one's held-out sites, beside the FC
baseline of the same split (the ablation of stage-1 designs in docs/model-development.md).

    python benchmarks/tokenizer_gates.py CORPUS.jsonl SERIES_DIR TOKENIZER_DIR [TOKENIZER_DIR ...]

For every tokenizer: logistic regression (the group level's pipeline) on the training sites'
runs, AUROC on the held-out sites, for diagnosis and sex, on three inputs: the tokenizer's run
representation (encoder features averaged over patches, region by region), its pooled
language-aligned run embedding, and the runs' Fisher-z FC (the baseline). Prints one JSON line
per tokenizer.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def gates(tokenizer_dir: str, corpus: str, series_dir: str, runs=None) -> dict:
    from bids_fmrilm.tokenizer import Tokenizer, load_timeseries_dir
    from bids_fmrilm.training.tokenizer import probe_gates, read_corpus_texts, run_fc

    t0 = time.time()
    tok = Tokenizer.load(tokenizer_dir)
    held = set(tok.meta["training"]["heldout_sites"])
    texts = read_corpus_texts(corpus)
    runs = runs if runs is not None else load_timeseries_dir(series_dir, keys=set(texts))
    test = np.array([texts[r.key]["site"] in held for r in runs])
    rep = np.stack([tok.represent_run(r.ts, r.coords) for r in runs])
    emb = np.stack([tok.embed_run(r.ts, r.coords, log_scale=r.log_scale) for r in runs])
    fc = np.stack([run_fc(r.ts) for r in runs])
    pheno = [texts[r.key]["phenotype"] for r in runs]
    tr = [p for p, t in zip(pheno, test) if not t]
    te = [p for p, t in zip(pheno, test) if t]
    by_rep = probe_gates(rep[~test], rep[test], fc[~test], fc[test], tr, te)
    by_emb = probe_gates(emb[~test], emb[test], fc[~test], fc[test], tr, te)
    out = {"tokenizer": tokenizer_dir, "config": tok.config.name, "patch_len": tok.patch_len,
           "fc_input": tok.config.fc_input, "heldout_sites": sorted(held), "n_test": int(test.sum()),
           "seconds": round(time.time() - t0, 1)}
    for label in by_rep:
        out[label] = {"representation_auroc": round(by_rep[label]["probe_auroc"], 3),
                      "run_embedding_auroc": round(by_emb[label]["probe_auroc"], 3),
                      "fc_logistic_auroc": round(by_rep[label]["fc_logistic_auroc"], 3)}
    return out


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    from bids_fmrilm.tokenizer import load_timeseries_dir
    from bids_fmrilm.training.tokenizer import read_corpus_texts

    corpus, series = sys.argv[1], sys.argv[2]
    runs = load_timeseries_dir(series, keys=set(read_corpus_texts(corpus)))
    for d in sys.argv[3:]:
        print(json.dumps(gates(d, corpus, series, runs)), flush=True)

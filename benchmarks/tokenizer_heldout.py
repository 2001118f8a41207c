"""Re-evaluate a trained tokenizer on its held-out sites through the public API.

    python benchmarks/tokenizer_heldout.py /tmp/tokenizer_cpu /tmp/tok_corpus_abide.jsonl /tmp/abide_all

Reads the checkpoint's held-out sites, tokenizes each held-out run with ``Tokenizer.encode``,
decodes with ``Tokenizer.decode`` and reports pooled R^2, codebook usage/perplexity and
fMRI-to-text recall@1 among 100 candidates (text embeddings from the checkpoint's cache).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def main(ckpt: str, corpus: str, ts_dir: str) -> dict:
    from bids_fmrilm.tokenizer import Tokenizer, load_timeseries_dir
    from bids_fmrilm.tokenizer.model import usage_and_perplexity
    from bids_fmrilm.training.text_cache import cached_text_embeddings
    from bids_fmrilm.training.tokenizer import r2_score_pooled, read_corpus_texts, retrieval_recall

    t0 = time.time()
    tok = Tokenizer.load(ckpt)
    held = set(tok.meta["training"]["heldout_sites"])
    texts = read_corpus_texts(corpus)
    keys = {k for k, v in texts.items() if v["site"] in held}
    runs = load_timeseries_dir(ts_dir, keys=keys)
    preds, targets, ids_all, embs = [], [], [], []
    for r in runs:
        ids = tok.encode(r.ts, r.coords, source=r.path)
        rec = tok.decode(ids, r.coords, tok.patch_lengths(len(r.ts)))
        tgt = r.ts[: rec.shape[0]]
        preds.append(rec.ravel())
        targets.append(tgt.ravel())
        ids_all.append(ids.ravel())
        embs.append(tok.embed_run(r.ts, r.coords, log_scale=r.log_scale))
    pred, target = np.concatenate(preds), np.concatenate(targets)
    usage, ppl = usage_and_perplexity(torch.as_tensor(np.concatenate(ids_all)), tok.codebook_size)
    temb = cached_text_embeddings([texts[r.key]["text"] for r in runs], Path(ckpt) / "text_embeddings",
                                  template=tok.meta["training"].get("text_template"))
    rec = retrieval_recall(np.stack(embs), tok.embed_text(temb), seed=0)
    out = {"heldout_sites": sorted(held), "n_runs": len(runs), "recon_r2": r2_score_pooled(pred, target),
           "codebook_usage": usage, "perplexity": ppl, **rec,
           "checkpoint_metrics": tok.meta.get("metrics", {}).get("heldout", {}), "wall_s": round(time.time() - t0, 1)}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main(*sys.argv[1:4])

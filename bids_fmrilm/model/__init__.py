"""Stages 2-3: the fMRI-LM (base LLM + projector + fMRI head + LoRA), checkpoints and the run API."""

from .api import FMRILMModel, PreparedRun
from .config import FMRILMConfig, get_config
from .fmrilm import FMRILM, FMRIBlock
from .llm import DEFAULT_BASE_LLM, base_llm_id_and_hash, embed_texts, load_base_llm
from .tasks import Task, default_tasks

__all__ = ["DEFAULT_BASE_LLM", "FMRIBlock", "FMRILM", "FMRILMConfig", "FMRILMModel", "PreparedRun", "Task",
           "base_llm_id_and_hash", "default_tasks", "embed_texts", "get_config", "load_base_llm"]

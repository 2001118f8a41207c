"""Stage 1: the VQ neural tokenizer (ROI x time patches -> discrete fMRI tokens)."""

from .config import CONFIGS, TokenizerConfig, get_config
from .data import SCALING, load_timeseries_dir, patchify, scale_run, unpatchify
from .model import TokenizerModel, VectorQuantizerEMA
from .tokenizer import Tokenizer

__all__ = ["CONFIGS", "SCALING", "Tokenizer", "TokenizerConfig", "TokenizerModel", "VectorQuantizerEMA",
           "get_config", "load_timeseries_dir", "patchify", "scale_run", "unpatchify"]

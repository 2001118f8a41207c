"""Training entry points (``fmrilm train-tokenizer`` ...), all under ``accelerate``."""

from .tokenizer import train_tokenizer, train_tokenizer_command

__all__ = ["train_tokenizer", "train_tokenizer_command"]

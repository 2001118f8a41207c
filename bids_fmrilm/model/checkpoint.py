"""The fMRI-LM checkpoint folder: save, load, check.

    fmrilm.json              format version, config, atlas + ROI table, TR, patch length, scaling,
                             tasks with allowed answers, base LLM name + hash, training summary,
                             metrics, sha256 of every file below
    tokenizer/               the stage-1 tokenizer (tokenizer.json, tokenizer.safetensors)
    projector.safetensors    token codes -> LLM positions, <fmri>/</fmri> markers
    fmri_head.safetensors    next-patch token prediction
    readout.safetensors      the frozen run readout (model/readout.py) + readout.json (its columns,
                             cross-fitted figures), when the config has one
    adapter/                 PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors)
    README.md                model card

The base LLM is referenced by name and hash, never copied. Loading checks the format version,
every file's hash and the base LLM's hash, and says which file is missing or changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..bids.writer import atomic_dir
from ..errors import DataError, MissingInputError
from .config import FMRILMConfig
from .tasks import Task

FORMAT_VERSION = 3  # 3: per-region long-window tokenizer features, run readout, optional patch slots
READABLE_VERSIONS = (3,)  # 1 (8-volume patch codes) and 2 (no readout) carry no usable signal: retrain
META = "fmrilm.json"
READOUT_FILES = ("readout.safetensors", "readout.json")
FILES = ("tokenizer/tokenizer.json", "tokenizer/tokenizer.safetensors", "projector.safetensors",
         "fmri_head.safetensors", "adapter/adapter_config.json", "adapter/adapter_model.safetensors")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def tokenizer_id(folder: str | os.PathLike) -> str:
    """Identifier of a tokenizer folder (hash of its weights): a tokenizer's model id at the
    participant level, and the ``TokenizerID`` of tokens written by a checkpoint that carries it."""
    return sha256(Path(folder) / "tokenizer.safetensors")[:16]


def model_id(meta: dict[str, Any]) -> str:
    """Short identifier of a checkpoint: hash of its file hashes (changes with any weight)."""
    blob = json.dumps(meta.get("files", {}), sort_keys=True)
    if meta.get("calibration"):  # it changes the answers: part of the model (absent: ids unchanged)
        blob += json.dumps(meta["calibration"], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "data" / "model"
"""Where the packaged default checkpoint lives (its files are package data; the base LLM is not)."""


def default_model_path() -> Path | None:
    """The packaged default checkpoint, or None when this installation has none."""
    return DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / META).is_file() else None


def resolve_model(value: str | os.PathLike | None) -> str | None:
    """``--model`` value -> checkpoint folder or None (no model pass).

    Unset: ``$BIDS_FMRILM_MODEL`` if set, else the packaged default. ``none`` disables the model.
    """
    v = str(value) if value is not None else os.environ.get("BIDS_FMRILM_MODEL")
    if v is None or v.strip().lower() == "default":
        p = default_model_path()
        return None if p is None else str(p)
    if v.strip().lower() == "none":
        return None
    return v


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / META).is_file()


def save_checkpoint(out_dir: str | os.PathLike, fm, tokenizer, tasks: list[Task], meta: dict[str, Any]) -> Path:
    """Write a complete checkpoint folder atomically (built in a temp folder, then renamed).

    An existing checkpoint at ``out_dir`` is replaced only once the new one is complete.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        tokenizer.save(tmp / "tokenizer")
        for name, module in (("projector.safetensors", fm.projector), ("fmri_head.safetensors", fm.fmri_head)):
            state = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
            save_file(state, str(tmp / name), metadata={"format": "pt"})
        fm.llm.save_pretrained(str(tmp / "adapter"))
        files = list(FILES)
        if fm.readout is not None:
            fm.readout.save(tmp)
            files += [READOUT_FILES[0], READOUT_FILES[1]]
        full = {
            "format_version": FORMAT_VERSION,
            "kind": "bids_fmrilm.fmrilm",
            "config": fm.cfg.to_dict(),
            "tasks": [t.to_dict() for t in tasks],
            **{k: v for k, v in meta.items() if k not in {"format_version", "kind", "config", "tasks", "files"}},
            "files": {f: sha256(tmp / f) for f in files},
        }
        full["id"] = model_id(full)
        (tmp / META).write_text(json.dumps(full, indent=2, default=str))
        from .card import model_card

        (tmp / "README.md").write_text(model_card(full))
    return out


def update_metrics(path: str | os.PathLike, metrics: dict[str, Any]) -> dict[str, Any]:
    """Merge ``{stage: metrics}`` into a checkpoint's ``fmrilm.json`` and rewrite its model card.

    Weights and their hashes (hence the model id) are unchanged; both files are replaced atomically.
    """
    path = Path(path)
    meta = read_meta(path, verify=False)
    meta["metrics"] = {**meta.get("metrics", {}), **metrics}
    if meta["metrics"]:
        from .gates import information_gates

        meta["gates"] = information_gates(meta)
    _write_meta(path, meta)
    return meta


def set_calibration(path: str | os.PathLike, calibration: dict[str, Any]) -> dict[str, Any]:
    """Replace a checkpoint's answer calibration (:mod:`~bids_fmrilm.model.calibration`) in its
    ``fmrilm.json``: its id changes (the answers do), the figures measured under the previous
    calibration are dropped from the card's stage-3 metrics, and both files are replaced
    atomically."""
    path = Path(path)
    meta = read_meta(path, verify=False)
    meta["calibration"] = calibration
    return _write_changed_answers(path, meta)


def set_readout(path: str | os.PathLike, readout) -> dict[str, Any]:
    """Replace a checkpoint's run readout (:mod:`~bids_fmrilm.model.readout`): its files, their
    hashes and the ``readout`` summary in ``fmrilm.json``. The answer calibration (fitted on the
    previous readout's scores) and the figures measured with it are dropped, so the id changes;
    fit the calibration again (``fmrilm evaluate --calibrate``)."""
    path = Path(path)
    meta = read_meta(path, verify=False)
    with tempfile.TemporaryDirectory(prefix=".readout.", dir=path) as tmp:
        readout.save(tmp)
        for name in READOUT_FILES:
            os.chmod(Path(tmp) / name, 0o644)
            os.replace(Path(tmp) / name, path / name)
    meta.setdefault("files", {}).update({name: sha256(path / name) for name in READOUT_FILES})
    meta["readout"] = {"values": readout.dim, **readout.info}
    meta.pop("calibration", None)
    return _write_changed_answers(path, meta)


def _write_changed_answers(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``meta`` of a checkpoint whose answers changed: a new id, and the figures of its
    stage (measured with the previous answers) dropped."""
    meta["id"] = model_id(meta)
    stage = meta.get("stage", "instruct")
    meta["metrics"] = {k: v for k, v in meta.get("metrics", {}).items() if k != stage}
    _write_meta(path, meta)
    return meta


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
    from .card import model_card

    for name, text in ((META, json.dumps(meta, indent=2, default=str)), ("README.md", model_card(meta))):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=path)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path / name)


def read_meta(path: str | os.PathLike, verify: bool = True, check_format: bool = True) -> dict[str, Any]:
    """``fmrilm.json`` of a checkpoint, with format version and file hashes checked
    (``check_format=False`` reads any version's metadata, e.g. to compare held-out figures)."""
    path = Path(path)
    if not (path / META).is_file():
        raise MissingInputError(f"not an fMRI-LM checkpoint ({META} missing)", path=path,
                                fix="pass a folder written by `fmrilm pretrain` or `fmrilm instruct`")
    try:
        meta = json.loads((path / META).read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"unreadable {META}: {exc}", path=path / META, fix="re-download or retrain the checkpoint") from None
    if check_format and meta.get("format_version") not in READABLE_VERSIONS:
        raise DataError(f"checkpoint format version {meta.get('format_version')} is not supported (this version "
                        f"reads {', '.join(map(str, READABLE_VERSIONS))})",
                        path=path / META, fix="retrain it with `fmrilm pretrain` and `fmrilm instruct` of this version, "
                                              "or use the packaged default model")
    if verify:
        for f, h in meta.get("files", {}).items():
            if not (path / f).is_file():
                raise MissingInputError(f"checkpoint file {f} is missing", path=path,
                                        fix="copy the complete checkpoint folder")
            if sha256(path / f) != h:
                raise DataError(f"checkpoint file {f} does not match its recorded hash (changed or corrupt)",
                                path=path / f, fix="copy the checkpoint again or retrain it")
    return meta


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", quantization: str = "none",
                    trainable: bool = False, base_llm: str | None = None, verify: bool = True):
    """Load a checkpoint: (FMRILM, Tokenizer, tasks, meta).

    Parameters
    ----------
    device, quantization
        Passed to :func:`~bids_fmrilm.model.llm.load_base_llm` (``auto`` = 4-bit on CUDA).
    trainable : bool
        LoRA, projector and head trainable (continued training, group-level adaptation).
    base_llm : str, optional
        Override the base LLM reference (a local copy of the same weights); its hash must match.
    verify : bool
        Check the files against the hashes in ``fmrilm.json`` (``False`` when the caller already did,
        e.g. the group level's repeated loads).
    """
    from safetensors.torch import load_file

    from ..tokenizer import Tokenizer
    from .adapters import load_lora
    from .fmrilm import FMRILM
    from .llm import base_llm_id_and_hash, load_base_llm

    path = Path(path)
    meta = read_meta(path, verify=verify)
    cfg = FMRILMConfig.from_dict(meta["config"])
    base = base_llm or meta["base_llm"]["id"]
    llm, text_tok = load_base_llm(base, device=device, quantization=quantization)
    want = meta["base_llm"].get("hash")
    got = base_llm_id_and_hash(base)[1]
    if want and got and want != got:
        raise DataError(f"base LLM {base} has hash {got}, the checkpoint was trained on {want}", path=path / META,
                        fix="install the base LLM the model card names")
    llm = load_lora(llm, path / "adapter", trainable=trainable)
    tok = Tokenizer.load(path / "tokenizer", device="cpu")
    codebook = tok.model.quantizer.embed.detach().clone()
    readout = None
    if cfg.readout:
        from .readout import Readout

        if not (path / READOUT_FILES[0]).is_file():
            raise MissingInputError(f"checkpoint file {READOUT_FILES[0]} is missing", path=path,
                                    fix="copy the complete checkpoint folder")
        readout = Readout.load(path)
    fm = FMRILM(llm, text_tok, codebook, roi_dim=tok.config.d_model, run_dim=tok.config.embed_dim, cfg=cfg,
                readout=readout)
    proj = load_file(str(path / "projector.safetensors"))
    n_adapter = len({k.split(".")[1] for k in proj if k.startswith("adapter.")})
    fm.add_readout_adapter(n_adapter)  # stage-3 checkpoints only
    fm.projector.load_state_dict(proj)
    fm.fmri_head.load_state_dict(load_file(str(path / "fmri_head.safetensors")))
    dev = next(llm.parameters()).device
    fm.projector.to(dev)
    fm.fmri_head.to(dev)
    fm.codebook = fm.codebook.to(dev)
    if fm.readout is not None:
        fm.readout.to(dev)
    for p in list(fm.projector.parameters()) + list(fm.fmri_head.parameters()):
        p.requires_grad_(trainable)
    fm.calibration = dict(meta.get("calibration") or {})
    tasks = [Task.from_dict(t) for t in meta.get("tasks", [])]
    fm.train(trainable)
    return fm, tok, tasks, meta

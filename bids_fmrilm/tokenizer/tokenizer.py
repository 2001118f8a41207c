"""The :class:`Tokenizer`: a trained VQ tokenizer with a numpy API, saved as a folder.

A checkpoint folder holds ``tokenizer.safetensors`` (weights and codebook) and ``tokenizer.json``
(format version, config, metrics, the atlas it was trained on, the scaling of inputs).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, MissingInputError
from .config import TokenizerConfig, get_config
from .data import SCALING, patchify, scale_run, unpatchify
from .model import TokenizerModel

FORMAT_VERSION = 1
WEIGHTS = "tokenizer.safetensors"
META = "tokenizer.json"


class Tokenizer:
    """VQ tokenizer of robust-scaled ROI time series.

    Parameters
    ----------
    model : TokenizerModel
    meta : dict, optional
        Provenance saved with the checkpoint (``metrics``, ``atlas``, ``training`` ...).
    """

    def __init__(self, model: TokenizerModel, meta: dict | None = None):
        self.model = model.eval()
        self.meta = dict(meta or {})

    @classmethod
    def new(cls, config: str | TokenizerConfig = "cpu", text_dim: int = 0, llm_dim: int = 0, seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return cls(TokenizerModel(get_config(config, **overrides), text_dim=text_dim, llm_dim=llm_dim))

    @property
    def config(self) -> TokenizerConfig:
        return self.model.cfg

    @property
    def patch_len(self) -> int:
        return self.config.patch_len

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def _inputs(self, ts, coords, source=None):
        patches = patchify(ts, self.patch_len, source)  # (n,R,P)
        coords = np.asarray(coords, dtype=np.float32).reshape(-1, 3)
        if coords.shape[0] != patches.shape[1]:
            raise DataError(f"{patches.shape[1]} ROI columns but {coords.shape[0]} ROI coordinates", path=source,
                            fix="pass one (x, y, z) MNI centroid per ROI column (NaN when unknown)")
        dev = next(self.model.parameters()).device
        return torch.from_numpy(patches)[None].to(dev), torch.from_numpy(coords).to(dev)

    @torch.no_grad()
    def encode(self, ts: np.ndarray, coords: np.ndarray, source: str | os.PathLike | None = None) -> np.ndarray:
        """Token ids (n_patches, R) of a robust-scaled run ``ts`` (T,R) with ROI centroids (R,3).

        Deterministic (eval mode). Trailing volumes that do not fill a patch are ignored.
        """
        self.model.eval()
        x, c = self._inputs(ts, coords, source)
        z, _ = self.model.encode(x, c)
        ids = self.model.quantizer.nearest(z.reshape(-1, z.shape[-1])).view(z.shape[:-1])
        return ids[0].cpu().numpy().astype(np.int64)

    @torch.no_grad()
    def decode(self, ids: np.ndarray, coords: np.ndarray) -> np.ndarray:
        """Reconstructed robust-scaled series (n_patches * patch_len, R) of token ids (n_patches, R)."""
        self.model.eval()
        ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
        if ids.ndim != 2:
            raise DataError(f"token ids must be 2-D (patches x ROIs), got shape {tuple(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size:
            raise DataError(f"token ids outside 0..{self.codebook_size - 1}",
                            fix="decode with the checkpoint that produced the tokens")
        c = torch.as_tensor(np.asarray(coords, dtype=np.float32).reshape(-1, 3))
        q = self.model.quantizer.codes(ids)[None]
        recon, _ = self.model.decode_codes(q, c)
        return unpatchify(recon[0].cpu().numpy())

    @torch.no_grad()
    def reconstruct(self, ts: np.ndarray, coords: np.ndarray, source=None) -> np.ndarray:
        """Encode then decode: (n_patches * patch_len, R)."""
        return self.decode(self.encode(ts, coords, source), coords)

    @torch.no_grad()
    def embed_run(self, ts: np.ndarray, coords: np.ndarray, source=None,
                  log_scale: np.ndarray | None = None) -> np.ndarray:
        """Pooled run embedding (embed_dim,), unit norm, in the space aligned with descriptor text.

        ``ts`` is robust-scaled; ``log_scale`` (R,) is the log IQR of each ROI before scaling
        (:func:`~bids_fmrilm.tokenizer.data.scale_run` with ``return_log_scale=True``). Without it
        the embedding sees no amplitude information.
        """
        self.model.eval()
        x, c = self._inputs(ts, coords, source)
        ls = None
        if log_scale is not None:
            ls = torch.as_tensor(np.asarray(log_scale, dtype=np.float32).reshape(1, -1), device=x.device)
            if ls.shape[1] != x.shape[2]:
                raise DataError(f"{ls.shape[1]} ROI scale values for {x.shape[2]} ROI columns", path=source)
        out = self.model(x, c)
        return self.model.run_embedding(out, log_scale=ls)[0].cpu().numpy()

    @torch.no_grad()
    def tokenize(self, raw_ts: np.ndarray, coords: np.ndarray, source=None) -> dict:
        """Everything the tokenizer gives for one cleaned, unscaled run (T,R) at the model TR.

        Returns ``{"ids": (n_patches, R) int64, "embedding": (embed_dim,), "scaled": (T,R),
        "log_scale": (R,)}``. Deterministic.
        """
        scaled, log_scale = scale_run(raw_ts, return_log_scale=True)
        return {"ids": self.encode(scaled, coords, source),
                "embedding": self.embed_run(scaled, coords, source, log_scale=log_scale),
                "scaled": scaled, "log_scale": log_scale}

    @torch.no_grad()
    def embed_text(self, text_embeddings: np.ndarray) -> np.ndarray:
        """Project frozen-LLM text embeddings (n, text_dim) into the joint space (n, embed_dim)."""
        if not self.model.text_dim:
            raise MissingInputError("this tokenizer was trained without language alignment")
        t = torch.as_tensor(np.asarray(text_embeddings, dtype=np.float32))
        return self.model.embed_text(t).cpu().numpy()

    # ---------------------------------------------------------------------------- save / load
    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``tokenizer.safetensors`` and ``tokenizer.json`` to ``out_dir`` (atomically per file)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": "bids_fmrilm.tokenizer",
            "config": self.config.to_dict(),
            "text_dim": self.model.text_dim,
            "llm_dim": self.model.llm_dim,
            "scaling": SCALING,
            **{k: v for k, v in self.meta.items() if k not in {"format_version", "config", "text_dim", "llm_dim"}},
        }
        for name, write in ((WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": "pt"})),
                            (META, lambda p: p.write_text(json.dumps(meta, indent=2, default=str)))):
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out)
            os.close(fd)
            write(Path(tmp))
            os.chmod(tmp, 0o644)
            os.replace(tmp, out / name)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "Tokenizer":
        """Load a checkpoint folder written by :meth:`save`."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / META).is_file() or not (path / WEIGHTS).is_file():
            raise MissingInputError(f"not a tokenizer checkpoint (needs {META} and {WEIGHTS})", path=path,
                                    fix="train one with `fmrilm train-tokenizer` or pass its folder")
        meta = json.loads((path / META).read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(f"tokenizer format version {meta.get('format_version')} is not {FORMAT_VERSION}",
                            path=path / META, fix="retrain the tokenizer with this version of bids_fmrilm")
        cfg = TokenizerConfig.from_dict(meta["config"])
        model = TokenizerModel(cfg, text_dim=meta.get("text_dim", 0), llm_dim=meta.get("llm_dim", 0))
        model.load_state_dict(load_file(str(path / WEIGHTS)), strict=True)
        model.to(device)
        return cls(model, meta={k: v for k, v in meta.items() if k not in {"config"}})

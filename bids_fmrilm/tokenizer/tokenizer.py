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
from .data import SCALING, frame_mask, patchify, scale_run, unpatchify
from .model import TokenizerModel

FORMAT_VERSION = 2  # 2: long windows with connectivity input (config fields fc_input, fc_weight, min_patch_len)
READABLE_VERSIONS = (1, 2)  # 1: the 8-volume patch design, read with those fields at their defaults
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

    @property
    def min_patch_len(self) -> int:
        """Fewest volumes of a kept trailing partial patch (``patch_len`` when partial patches are dropped)."""
        return self.config.min_patch_len or self.patch_len

    def patch_lengths(self, n_volumes: int) -> np.ndarray:
        """Valid volumes of each patch of a run of ``n_volumes`` (see :func:`~.data.patch_lengths`)."""
        from .data import patch_lengths

        return patch_lengths(n_volumes, self.patch_len, self.min_patch_len)

    def _inputs(self, ts, coords, source=None):
        patches, lengths = patchify(ts, self.patch_len, source, self.min_patch_len, return_lengths=True)  # (n,R,P)
        coords = np.asarray(coords, dtype=np.float32).reshape(-1, 3)
        if coords.shape[0] != patches.shape[1]:
            raise DataError(f"{patches.shape[1]} ROI columns but {coords.shape[0]} ROI coordinates", path=source,
                            fix="pass one (x, y, z) MNI centroid per ROI column (NaN when unknown)")
        dev = next(self.model.parameters()).device
        fm = torch.from_numpy(frame_mask(lengths, self.patch_len))[None].to(dev)
        return torch.from_numpy(patches)[None].to(dev), torch.from_numpy(coords).to(dev), fm

    @torch.no_grad()
    def features(self, ts: np.ndarray, coords: np.ndarray, source: str | os.PathLike | None = None) -> np.ndarray:
        """Continuous encoder features (n_patches, R, code_dim) of a robust-scaled run ``ts`` (T,R):
        what the fMRI-LM reads (the token ids are their nearest codebook entries). Deterministic."""
        self.model.eval()
        x, c, fm = self._inputs(ts, coords, source)
        z, _ = self.model.encode(x, c, frame_mask=fm)
        return z[0].cpu().numpy().astype(np.float32)

    def ids_of(self, features: np.ndarray) -> np.ndarray:
        """Token ids (..., ) of encoder features (..., code_dim): their nearest codebook entries."""
        z = torch.as_tensor(np.asarray(features, dtype=np.float32))
        with torch.no_grad():
            ids = self.model.quantizer.nearest(z.reshape(-1, z.shape[-1]).to(self.model.quantizer.embed.device))
        return ids.view(z.shape[:-1]).cpu().numpy().astype(np.int64)

    def encode(self, ts: np.ndarray, coords: np.ndarray, source: str | os.PathLike | None = None) -> np.ndarray:
        """Token ids (n_patches, R) of a robust-scaled run ``ts`` (T,R) with ROI centroids (R,3).

        Deterministic (eval mode). Trailing volumes that do not fill a patch are ignored, unless
        there are at least ``min_patch_len`` of them (then they form a last, partial patch).
        """
        return self.ids_of(self.features(ts, coords, source))

    def represent_run(self, ts: np.ndarray, coords: np.ndarray, source: str | os.PathLike | None = None) -> np.ndarray:
        """:meth:`run_representation` of a robust-scaled run ``ts`` (T,R): (R * code_dim,)."""
        return self.region_representation(self.features(ts, coords, source), len(ts)).reshape(-1)

    def region_representation(self, features: np.ndarray, n_volumes: int) -> np.ndarray:
        """:meth:`run_representation` of a run of ``n_volumes`` this tokenizer encoded into
        ``features`` (n_patches, R, code_dim), one row per region: (R, code_dim)."""
        f = np.asarray(features, dtype=np.float32)
        return self.run_representation(f, self.patch_lengths(int(n_volumes))[: len(f)]).reshape(f.shape[1:])

    @staticmethod
    def run_representation(features: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        """A run's representation for linear probes: its encoder features averaged over patches
        (weighted by each patch's real volumes, ``lengths``, so that a short trailing window counts
        for what it measured), flattened region by region, (R * code_dim,)."""
        f = np.asarray(features, dtype=np.float32)
        w = np.ones(len(f)) if lengths is None else np.asarray(lengths, dtype=np.float64)
        return np.tensordot(w / w.sum(), f, axes=1).astype(np.float32).reshape(-1)

    @torch.no_grad()
    def decode(self, ids: np.ndarray, coords: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        """Reconstructed robust-scaled series of token ids (n_patches, R): (n_patches * patch_len, R),
        or the real volumes only when ``lengths`` (valid volumes per patch) is given."""
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
        return unpatchify(recon[0].cpu().numpy(), lengths)

    @torch.no_grad()
    def reconstruct(self, ts: np.ndarray, coords: np.ndarray, source=None) -> np.ndarray:
        """Encode then decode the volumes the tokens cover, (sum of patch lengths, R)."""
        return self.decode(self.encode(ts, coords, source), coords, self.patch_lengths(len(ts)))

    @torch.no_grad()
    def embed_run(self, ts: np.ndarray, coords: np.ndarray, source=None,
                  log_scale: np.ndarray | None = None) -> np.ndarray:
        """Pooled run embedding (embed_dim,), unit norm, in the space aligned with descriptor text.

        ``ts`` is robust-scaled; ``log_scale`` (R,) is the log IQR of each ROI before scaling
        (:func:`~bids_fmrilm.tokenizer.data.scale_run` with ``return_log_scale=True``). Without it
        the embedding sees no amplitude information.
        """
        self.model.eval()
        x, c, fm = self._inputs(ts, coords, source)
        ls = None
        if log_scale is not None:
            ls = torch.as_tensor(np.asarray(log_scale, dtype=np.float32).reshape(1, -1), device=x.device)
            if ls.shape[1] != x.shape[2]:
                raise DataError(f"{ls.shape[1]} ROI scale values for {x.shape[2]} ROI columns", path=source)
        out = self.model(x, c, frame_mask=fm)
        return self.model.run_embedding(out, time_mask=fm.any(-1), log_scale=ls)[0].cpu().numpy()

    @torch.no_grad()
    def tokenize(self, raw_ts: np.ndarray, coords: np.ndarray, source=None) -> dict:
        """Everything the tokenizer gives for one cleaned, unscaled run (T,R) at the model TR.

        Returns ``{"ids": (n_patches, R) int64, "features": (n_patches, R, code_dim),
        "embedding": (embed_dim,), "scaled": (T,R), "log_scale": (R,)}``. Deterministic.
        """
        scaled, log_scale = scale_run(raw_ts, return_log_scale=True)
        feats = self.features(scaled, coords, source)
        return {"ids": self.ids_of(feats), "features": feats,
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
        if meta.get("format_version") not in READABLE_VERSIONS:
            raise DataError(f"tokenizer format version {meta.get('format_version')} is not one of "
                            f"{', '.join(map(str, READABLE_VERSIONS))}",
                            path=path / META, fix="retrain the tokenizer with this version of bids_fmrilm")
        cfg = TokenizerConfig.from_dict(meta["config"])
        model = TokenizerModel(cfg, text_dim=meta.get("text_dim", 0), llm_dim=meta.get("llm_dim", 0))
        model.load_state_dict(load_file(str(path / WEIGHTS)), strict=True)
        model.to(device)
        return cls(model, meta={k: v for k, v in meta.items() if k not in {"config"}})

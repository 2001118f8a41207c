"""Notebook API: load a checkpoint, then ``embed``, ``describe``, ``predict``, ``forecast`` a run.

>>> from bids_fmrilm.model import FMRILMModel
>>> m = FMRILMModel.load("path/to/checkpoint")            # doctest: +SKIP
>>> run = "out/sub-01/func/sub-01_task-rest_atlas-CC200_timeseries.tsv.gz"
>>> m.predict(run, "sex")                                # doctest: +SKIP
{'female': 0.31, 'male': 0.69}

A run is a participant-level ``*_timeseries.tsv[.gz]`` (cleaned ROI series at the model TR; ROI
centroids from the ``atlas-<A>_dseg.tsv`` beside it or the atlas registry), or a
:class:`PreparedRun` / ``(series, coords)`` pair of a cleaned (T, R) array and (R, 3) MNI centroids.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, UsageError
from .fmrilm import FMRIBlock, fmri_block
from .readout import tokenized_run_vector
from .tasks import Task


@dataclass
class PreparedRun:
    """A tokenized run: ids (n_patches, R), run embedding, ROI centroids (R, 3) and, when it was
    tokenized here, the robust-scaled series, the encoder features (n_patches, R, c) and the run
    vector (R, c + 1) the readout reads (:func:`~bids_fmrilm.model.readout.run_vector`) (``None``
    for tokens read back from the participant level's outputs: forecasting needs the series, and
    a checkpoint that reads features needs them)."""

    ids: np.ndarray
    run_emb: np.ndarray
    coords: np.ndarray
    scaled: np.ndarray | None = None
    source: str = ""
    feats: np.ndarray | None = None
    run_vec: np.ndarray | None = None


def _find_roi_table(path: Path) -> Path | None:
    for parent in path.parents:
        found = sorted(parent.glob("atlas-*_dseg.tsv"))
        if found:
            return parent
    return None


class FMRILMModel:
    """A loaded fMRI-LM checkpoint with a run-level API.

    Parameters
    ----------
    fm : FMRILM
    tokenizer : Tokenizer
    tasks : list of Task
    meta : dict
        The checkpoint's ``fmrilm.json``.
    """

    def __init__(self, fm, tokenizer, tasks: list[Task], meta: dict[str, Any]):
        self.fm, self.tokenizer, self.meta = fm.eval(), tokenizer, meta
        self.tasks = {t.name: t for t in tasks}
        self._roi_cache: dict[bytes, torch.Tensor] = {}

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto", quantization: str = "auto",
             verify: bool = True) -> "FMRILMModel":
        """Load a checkpoint folder (format and, unless ``verify=False``, file hashes checked);
        ``auto`` = 4-bit on CUDA, fp32 on CPU."""
        from .checkpoint import load_checkpoint

        return cls(*load_checkpoint(path, device=device, quantization=quantization, verify=verify))

    @property
    def id(self) -> str:
        return str(self.meta.get("id", ""))

    @property
    def max_patches(self) -> int:
        return self.fm.cfg.max_patches

    # ----------------------------------------------------------------------------- inputs
    def prepare(self, run: Any) -> PreparedRun:
        """Tokenize a run (path, (series, coords) pair, or PreparedRun)."""
        if isinstance(run, PreparedRun):
            return run
        source = ""
        if isinstance(run, (str, os.PathLike)):
            from ..signals.pipeline import read_roi_timeseries
            from ..tokenizer.data import parse_entities, roi_coordinates

            path = Path(run)
            ts, columns = read_roi_timeseries(path)
            root = _find_roi_table(path) or path.parent
            coords = roi_coordinates(root, parse_entities(path).get("atlas", ""), columns)
            source = str(path)
        else:
            try:
                ts, coords = run
            except (TypeError, ValueError):
                raise UsageError("a run is a *_timeseries.tsv[.gz] path, a PreparedRun or a (series, coords) pair") from None
        coords = np.asarray(coords, dtype=np.float32)
        res = self.tokenizer.tokenize(np.asarray(ts, dtype=float), coords, source=source or None)
        return PreparedRun(res["ids"], res["embedding"], coords, res["scaled"], source, res["features"],
                           tokenized_run_vector(self.tokenizer, res["features"], res["scaled"], res["log_scale"]))

    def _roi(self, coords: np.ndarray) -> torch.Tensor:
        key = np.ascontiguousarray(coords, dtype=np.float32).tobytes()
        if key not in self._roi_cache:
            with torch.no_grad():
                self._roi_cache[key] = self.tokenizer.model.roi_embed(torch.from_numpy(np.asarray(coords, np.float32))).detach()
        return self._roi_cache[key]

    def block(self, run: PreparedRun, last: bool = False, drop_last: int = 0,
              rng: np.random.Generator | None = None) -> FMRIBlock:
        """The model input for a run: its first (or ``last``) ``max_patches`` patches, or a random
        crop of them when ``rng`` is given (training)."""
        if self.fm.cfg.fmri_input == "features" and run.feats is None:
            raise UsageError("this checkpoint reads the tokenizer's encoder features, and the run has tokens only",
                             path=run.source or None, fix="pass the run's *_timeseries.tsv.gz or a (series, coords) pair")
        readout = None
        if self.fm.readout is not None:
            if run.run_vec is None:
                raise UsageError("this checkpoint reads a run readout, and the run has tokens only",
                                 path=run.source or None, fix="pass the run's *_timeseries.tsv.gz or a (series, coords) pair")
            readout = self.fm.readout.vector(run.run_vec, run.coords)
        n = len(run.ids) - drop_last
        start = max(0, n - self.max_patches) if last else 0
        feats = None if run.feats is None else run.feats[start:n]
        return fmri_block(run.ids[start:n], self._roi(run.coords), run.run_emb, self.max_patches, rng, feats, readout)

    # ----------------------------------------------------------------------------- outputs
    def embed(self, run: Any) -> np.ndarray:
        """Run embedding (hidden size,): mean LLM hidden state over the run's fMRI positions."""
        from .inference import embed_blocks

        return embed_blocks(self.fm, [self.block(self.prepare(run))])[0]

    def encode(self, run: Any) -> np.ndarray:
        """The encoder's run representation (R, code_dim): each region's continuous tokenizer
        features averaged over the run's windows (weighted by their real volumes), as the
        participant level writes it (``*_desc-encoder_features.tsv.gz``). Flattened, it is the
        linear feature that carries diagnosis on new sites (information gate 1)."""
        p = self.prepare(run)
        if p.feats is None or p.scaled is None:
            raise UsageError("this run was read back from tokens alone; pass its *_timeseries.tsv[.gz] path")
        return self.tokenizer.region_representation(p.feats, len(p.scaled))

    def describe(self, run: Any, max_new_tokens: int = 96, guided: bool = True) -> str:
        """Generated descriptor-style text for a run (greedy, deterministic).

        With ``guided`` the levels it states for descriptors are those of the model's own
        (calibrated) answers to the descriptor questions (:func:`~.inference.description_levels`),
        each followed by its level map's z estimate within that level's range
        (:func:`~.inference.description_numbers`), as in the participant level's outputs;
        ``guided=False`` is the unconstrained text.
        """
        from .inference import generate_descriptions, model_levels, score_tasks

        blk = [self.block(self.prepare(run))]
        levels = numbers = None
        if guided:
            tasks = [t for t in self.tasks.values() if t.source.startswith("descriptor:")]
            if tasks:
                levels, numbers = model_levels(self.fm, tasks, score_tasks(self.fm, blk, tasks), blk)
        return generate_descriptions(self.fm, blk, max_new_tokens, levels=levels, numbers=numbers)[0]

    def predict(self, run: Any, task: str | Task | None = None) -> dict[str, Any]:
        """Probabilities of each allowed answer: ``{answer: p}`` for one task, or
        ``{task: {answer: p}}`` for every task of the checkpoint when ``task`` is None."""
        from .inference import score_options

        prepared = self.prepare(run)
        blk = [self.block(prepared)]
        if task is None:
            return {name: self.predict(prepared, t) for name, t in self.tasks.items()}
        if isinstance(task, str):
            if task not in self.tasks:
                raise UsageError(f"unknown task {task!r}", fix=f"choose among {', '.join(self.tasks)}")
            task = self.tasks[task]
        p = score_options(self.fm, blk, task)[0]
        return {a: float(x) for a, x in zip(task.answers, p)}

    def forecast(self, run: Any) -> dict[str, Any]:
        """Hold back the last patch, predict its tokens from the ones before, decode, compare.

        Returns ``predicted`` and ``observed`` (patch length, R) robust-scaled signals (the last
        patch may be partial: its real volumes), the predicted
        and observed token ids, ``mse``, ``correlation`` (over all values), ``token_accuracy`` and
        the error of two baselines: ``mse_zero`` (predict the median, 0) and ``mse_persistence``
        (repeat the previous patch).
        """
        from .inference import next_patch_logits

        prepared = self.prepare(run)
        n = len(prepared.ids)
        if prepared.scaled is None:
            raise UsageError("forecasting needs the run's series, not only its tokens",
                             fix="pass the *_timeseries.tsv.gz path or a (series, coords) pair")
        if n < 2:
            raise DataError(f"run has {n} patch(es); forecasting needs at least 2", path=prepared.source or None,
                            fix="forecast runs of at least two patches")
        blk = self.block(prepared, last=True, drop_last=1)
        logits = next_patch_logits(self.fm, [blk], include_last=True)[0]
        pred_ids = logits[-1].argmax(-1).numpy()
        P = self.tokenizer.patch_len
        ctx = np.asarray(blk.ids.numpy())
        decoded = self.tokenizer.decode(np.concatenate([ctx, pred_ids[None]]), prepared.coords)
        observed = prepared.scaled[(n - 1) * P: n * P]
        predicted = decoded[-P:][: len(observed)]
        previous = prepared.scaled[(n - 2) * P: (n - 1) * P][: len(observed)]
        true_ids = prepared.ids[-1]
        corr = float(np.corrcoef(predicted.ravel(), observed.ravel())[0, 1]) if observed.std() > 0 else float("nan")
        return {"predicted": predicted, "observed": observed, "predicted_ids": pred_ids, "observed_ids": true_ids,
                "mse": float(np.mean((predicted - observed) ** 2)), "correlation": corr,
                "token_accuracy": float(np.mean(pred_ids == true_ids)),
                "mse_zero": float(np.mean(observed ** 2)), "mse_persistence": float(np.mean((previous - observed) ** 2))}

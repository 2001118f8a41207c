"""Participant level, model pass: tokens, embedding, description, predictions, forecast per run.

Runs after the signal pass (which may use several processes): the model is loaded once, in this
process, and reads each run's cleaned ROI series from the output folder. Per run it writes

- ``*_atlas-<A>_desc-fmrilm_tokens.tsv.gz`` (one row per time patch, one column per ROI);
- with an fMRI-LM checkpoint also ``*_desc-fmrilm_embedding.tsv.gz``, ``*_desc-fmrilm_description.json``,
  ``*_desc-fmrilm_predictions.tsv`` and ``*_desc-fmrilm_forecast.tsv.gz`` (+ JSON sidecars);
- ``*_atlas-<A>_desc-fmrilm_tokens.json`` last: it names the model (id + hash), atlas, TR, seed
  and settings, lists the run's model outputs and marks them complete. A re-run skips runs whose
  marker records the same model and settings; another model or settings recomputes them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..bids.layout import Run
from ..bids.writer import DerivativesWriter, read_json, write_json, write_tsv
from ..config import Config
from ..errors import BidsAppError, DataError, ExitCode, MissingInputError

log = logging.getLogger("bids_fmrilm")

SAMPLING = {"strategy": "greedy", "max_new_tokens": 96}


def model_kind(spec: str | os.PathLike) -> str:
    """``"fmrilm"`` (a checkpoint folder) or ``"tokenizer"`` (a stage-1 folder); else an error."""
    p = Path(spec)
    if (p / "fmrilm.json").is_file():
        return "fmrilm"
    if (p / "tokenizer.json").is_file():
        return "tokenizer"
    raise MissingInputError("not a model folder (no fmrilm.json or tokenizer.json)", path=p,
                            fix="pass the `model/` folder written by fmrilm instruct/pretrain, or a tokenizer folder")


class LoadedModel:
    """The model used by the participant level (fMRI-LM checkpoint, or a tokenizer only)."""

    def __init__(self, spec: str | os.PathLike, cfg: Config):
        from ..model.llm import resolve_device, resolve_quantization

        self.path = Path(spec)
        self.kind = model_kind(spec)
        self.device = resolve_device(cfg.device)
        self.quantization = resolve_quantization(cfg.quantization, self.device)
        if self.kind == "fmrilm":
            from ..model.api import FMRILMModel

            self.api = FMRILMModel.load(self.path, device=str(self.device), quantization=self.quantization)
            self.tokenizer = self.api.tokenizer
            self.id = self.api.id
            self.meta = self.api.meta
        else:
            from ..tokenizer import Tokenizer

            self.api = None
            self.tokenizer = Tokenizer.load(self.path)
            self.meta = self.tokenizer.meta
            self.id = hashlib.sha256((self.path / "tokenizer.safetensors").read_bytes()).hexdigest()[:16]
        self.tr = float(self.meta.get("tr", 2.0))

    def record(self, cfg: Config) -> dict[str, Any]:
        blob = f"{self.id}|{self.kind}|{cfg.seed}|{self.quantization}|{SAMPLING}"
        return {"ModelID": self.id, "ModelKind": self.kind, "ModelPath": str(self.path.resolve()),
                "BaseLLM": self.meta.get("base_llm"), "Quantization": self.quantization, "Device": str(self.device),
                "Seed": cfg.seed, "ModelSettingsHash": hashlib.sha256(blob.encode()).hexdigest()[:12]}


def _marker(writer: DerivativesWriter, run: Run, atlas: str) -> Path:
    return writer.path(run, "tokens", ".json", atlas=atlas, desc="fmrilm")


def is_complete(writer: DerivativesWriter, run: Run, atlas: str, record: dict[str, Any]) -> bool:
    meta = read_json(_marker(writer, run, atlas))
    if not meta or meta.get("ModelSettingsHash") != record["ModelSettingsHash"]:
        return False
    return all((writer.root / rel).is_file() for rel in meta.get("ModelOutputs", []))


def write_run_outputs(model: LoadedModel, run: Run, atlas: str, cfg: Config, writer: DerivativesWriter,
                      record: dict[str, Any]) -> list[Path]:
    """Compute and write one run's model outputs (the tokens sidecar last). Returns the paths."""
    from ..signals.pipeline import read_roi_timeseries
    from ..tokenizer.data import roi_coordinates

    ts_path = writer.path(run, "timeseries", ".tsv.gz", atlas=atlas)
    ts_meta = read_json(writer.path(run, "timeseries", ".json", atlas=atlas)) or {}
    tr = float(ts_meta.get("RepetitionTime", model.tr))
    if abs(tr - model.tr) > 1e-6:
        raise DataError(f"series are at TR {tr} s but the model was trained at {model.tr} s", path=ts_path,
                        fix=f"re-run with --target-tr {model.tr}")
    ts, columns = read_roi_timeseries(ts_path)
    coords = roi_coordinates(writer.root, atlas, columns)
    if not np.isfinite(coords).all():
        log.warning("%s: %d ROIs without MNI centroids (a learned 'unknown' embedding is used)", ts_path.name,
                    int((~np.isfinite(coords).all(1)).sum()))
    written: list[Path] = []
    base = {"Sources": [f"bids::{ts_path.relative_to(writer.root).as_posix()}"], **record}
    if model.api is not None:
        prepared = model.api.prepare((ts, coords))
        prepared.source = str(ts_path)
        ids = prepared.ids
    else:
        ids = model.tokenizer.tokenize(ts, coords, source=ts_path)["ids"]
    P = model.tokenizer.patch_len
    tok_path = writer.path(run, "tokens", ".tsv.gz", atlas=atlas, desc="fmrilm")
    write_tsv(tok_path, pd.DataFrame(ids, columns=columns))
    written.append(tok_path)
    if model.api is not None:
        written += _write_fmrilm(model, run, atlas, prepared, columns, writer, base)
    marker = _marker(writer, run, atlas)
    write_json(marker, {
        "Description": "fMRI-LM token ids: one row per time patch, one column per ROI (codebook indices)",
        "PatchLength": P, "PatchSeconds": P * model.tr, "RepetitionTime": model.tr,
        "CodebookSize": model.tokenizer.codebook_size, "Atlas": atlas, "DroppedTrailingVolumes": int(len(ts) - len(ids) * P),
        "ModelOutputs": [p.relative_to(writer.root).as_posix() for p in written],
        **base,
    })
    return written + [marker]


def _write_fmrilm(model: LoadedModel, run: Run, atlas: str, prepared, columns: list[str], writer: DerivativesWriter,
                  base: dict[str, Any]) -> list[Path]:
    from ..model.inference import embed_blocks, generate_descriptions, score_options
    from ..model.tasks import describe_segments

    api = model.api
    blk = api.block(prepared)
    out: list[Path] = []
    # embedding
    emb = embed_blocks(api.fm, [blk])[0]
    cols = [f"e{i:04d}" for i in range(len(emb))]
    p = writer.path(run, "embedding", ".tsv.gz", atlas=atlas, desc="fmrilm")
    write_tsv(p, pd.DataFrame([emb], columns=cols))
    write_json(p.with_name(p.name.replace(".tsv.gz", ".json")), {
        "Description": "Run embedding: mean final LLM hidden state over the run's fMRI positions",
        "Columns": cols, "PatchesUsed": int(blk.ids.shape[0]), **base})
    out += [p, p.with_name(p.name.replace(".tsv.gz", ".json"))]
    # description
    text = generate_descriptions(api.fm, [blk], max_new_tokens=SAMPLING["max_new_tokens"])[0]
    prompt = "".join(s[1] if s[0] == "text" else "<fmri>...</fmri>" for s in describe_segments(0))
    p = writer.path(run, "description", ".json", atlas=atlas, desc="fmrilm")
    write_json(p, {"Description": "Generated descriptor-style text for the run", "Text": text, "Prompt": prompt,
                   "Sampling": SAMPLING, **base})
    out.append(p)
    # predictions
    rows, answers = [], []
    for name, task in api.tasks.items():
        proba = score_options(api.fm, [blk], task)[0]
        row = {"task": name, "prediction": task.answers[int(np.argmax(proba))], "probability": float(np.max(proba))}
        for a, v in zip(task.answers, proba):
            row[f"p_{a}"] = float(v)
            if a not in answers:
                answers.append(a)
        rows.append(row)
    df = pd.DataFrame(rows, columns=["task", "prediction", "probability", *[f"p_{a}" for a in answers]])
    p = writer.path(run, "predictions", ".tsv", atlas=atlas, desc="fmrilm")
    write_tsv(p, df)
    write_json(p.with_name(p.name.replace(".tsv", ".json")), {
        "Description": "Zero-shot predictions: constrained answers with the probability of each allowed answer "
                       "(n/a where an answer does not belong to the task)",
        "Tasks": {n: {"question": t.question, "answers": list(t.answers)} for n, t in api.tasks.items()}, **base})
    out += [p, p.with_name(p.name.replace(".tsv", ".json"))]
    # forecast of the held-back last patch
    if len(prepared.ids) >= 2:
        fc = api.forecast(prepared)
        P = fc["observed"].shape[0]
        n = len(prepared.ids)
        vol = np.repeat(np.arange((n - 1) * P, n * P), len(columns))
        df = pd.DataFrame({"volume": vol, "roi": np.tile(columns, P), "predicted": fc["predicted"].ravel(),
                           "observed": fc["observed"].ravel()})
        p = writer.path(run, "forecast", ".tsv.gz", atlas=atlas, desc="fmrilm")
        write_tsv(p, df)
        write_json(p.with_name(p.name.replace(".tsv.gz", ".json")), {
            "Description": "Forecast of the held-back last patch from the patches before it (robust-scaled units)",
            "Units": "robust-scaled (median 0, IQR 1 per ROI)",
            "MSE": fc["mse"], "Correlation": fc["correlation"], "TokenAccuracy": fc["token_accuracy"],
            "BaselineMSEZero": fc["mse_zero"], "BaselineMSEPersistence": fc["mse_persistence"], **base})
        out += [p, p.with_name(p.name.replace(".tsv.gz", ".json"))]
    return out


def run_model_pass(cfg: Config, runs: list[tuple[Run, str]], results: list, progress: bool = True) -> list:
    """Model outputs for every run whose time series are complete. Returns updated RunResults."""
    from .participant import RunResult, _crash_report, _progress, _remove_outputs

    writer = DerivativesWriter(cfg.output_dir, cfg.bids_dir)
    t0 = time.time()
    model = LoadedModel(cfg.model, cfg)
    record = model.record(cfg)
    log.info("model %s (%s) loaded in %.0f s on %s, quantization %s", model.id, model.kind, time.time() - t0,
             model.device, model.quantization)
    by_id = {(r.run_id, r.source): r for r in results}
    bar = _progress(progress)
    with bar:
        task = bar.add_task("model", total=len(runs))
        for run, atlas in runs:
            res = by_id.get((run.run_id, run.relpath()))
            bar.advance(task)
            if res is None or res.status == "failed":
                continue
            if not cfg.force and is_complete(writer, run, atlas, record):
                continue
            started = [_marker(writer, run, atlas)]
            t = time.time()
            try:
                paths = write_run_outputs(model, run, atlas, cfg, writer, record)
                res.status = "done"
                res.outputs = tuple(res.outputs) + tuple(str(p) for p in paths)
                res.seconds += time.time() - t
            except BidsAppError as exc:
                _remove_outputs(started)
                res.status, res.reason, res.code = "failed", exc.one_line(), int(exc.code)
                res.traceback = _crash_report(cfg, run, exc)
                log.error("%s", res.reason)
            except Exception as exc:
                _remove_outputs(started)
                res.status, res.code = "failed", int(ExitCode.ERROR)
                res.reason = f"{run.relpath()}: unexpected {exc.__class__.__name__} in the model pass: {exc}".splitlines()[0]
                res.traceback = _crash_report(cfg, run, exc)
                log.error("%s", res.reason)
    return results

"""Participant level, model pass: tokens, embedding, description, predictions, forecast per run.

Runs after the signal pass (which may use several processes): the model is loaded once, in this
process, and reads each run's cleaned ROI series from the output folder. Per run it writes

- ``*_atlas-<A>_desc-fmrilm_tokens.tsv.gz`` (one row per time patch, one column per ROI);
- ``*_atlas-<A>_desc-encoder_features.tsv.gz`` (+ JSON sidecar): the encoder's run representation,
  one row per ROI (its continuous features averaged over the run's windows);
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
from ..errors import BidsAppError, DataError, ExitCode, MissingInputError, UsageError

log = logging.getLogger("bids_fmrilm")

OUTPUT_SET = 2
"""Version of the set of files a run gets (2: the encoder's run representation); part of the
settings hash, so outputs written before a new file existed are recomputed, not skipped."""

SAMPLING = {"strategy": "greedy", "max_new_tokens": 96,
            "levels": "guided: the descriptor levels of the zero-shot predictions (LevelGuide)",
            "numbers": "the level map's z estimate within the stated level's range; a contradicting one is dropped"}


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
    """The model used by the participant level (fMRI-LM checkpoint, or a tokenizer only).

    Identity (id, TR, settings) is read from the folder's metadata; the weights load on
    :meth:`load`, only when some run needs model work.
    """

    def __init__(self, spec: str | os.PathLike, cfg: Config):
        import json

        from ..model.llm import resolve_device, resolve_quantization

        self.path = Path(spec)
        self.kind = model_kind(spec)
        self.device = resolve_device(cfg.device)
        self.quantization = resolve_quantization(cfg.quantization, self.device)
        self.api = None
        self.tokenizer = None
        from ..model.checkpoint import read_meta, tokenizer_id

        if self.kind == "fmrilm":
            self.meta = read_meta(self.path)  # format version and file hashes checked here
            self.id = str(self.meta["id"])
            self.tokenizer_id = tokenizer_id(self.path / "tokenizer")
        else:
            self.meta = json.loads((self.path / "tokenizer.json").read_text())
            self.id = self.tokenizer_id = tokenizer_id(self.path)
        self.tr = float(self.meta.get("tr", 2.0))
        self.adapter_path = Path(cfg.adapter) if cfg.adapter else None
        self.adapter: dict[str, Any] | None = None
        if self.adapter_path is not None:
            from .fewshot import read_adapter

            if self.kind != "fmrilm":
                raise UsageError("--adapter needs an fMRI-LM checkpoint as --model", path=self.adapter_path,
                                 fix="pass the checkpoint the adapter was trained on")
            self.adapter = read_adapter(self.adapter_path, self.id)

    @property
    def adapter_task(self) -> tuple[str, Any] | None:
        """``("adapter:<label>", Task)`` of the group-level adapter, if one is used."""
        if self.adapter is None:
            return None
        from ..model.tasks import Task

        return f"adapter:{self.adapter['Label']}", Task.from_dict(self.adapter["Task"])

    @property
    def tasks(self) -> dict[str, Any]:
        """Tasks answered per run: the checkpoint's, then the adapter's."""
        out = dict(self.api.tasks) if self.api is not None else {}
        if self.adapter_task is not None:
            key, task = self.adapter_task
            out[key] = task
        return out

    def load(self) -> "LoadedModel":
        """Load the weights (once)."""
        if self.tokenizer is not None:
            return self
        if self.kind == "fmrilm":
            from ..model.api import FMRILMModel

            self.api = FMRILMModel.load(self.path, device=str(self.device), quantization=self.quantization)
            self.tokenizer = self.api.tokenizer
            if self.adapter_path is not None:
                from .fewshot import attach_adapter

                attach_adapter(self.api.fm, self.adapter_path)
        else:
            from ..tokenizer import Tokenizer

            self.tokenizer = Tokenizer.load(self.path)
        return self

    def record(self, cfg: Config) -> dict[str, Any]:
        adapter = None
        if self.adapter is not None:
            adapter = {"AdapterID": self.adapter["AdapterID"], "Label": self.adapter["Label"],
                       "Path": str(self.adapter_path.resolve())}
        blob = (f"{self.id}|{self.kind}|{cfg.seed}|{self.quantization}|{SAMPLING}|{adapter and adapter['AdapterID']}"
                f"|outputs {OUTPUT_SET}")
        rec = {"ModelID": self.id, "ModelKind": self.kind, "ModelPath": str(self.path.resolve()),
               "BaseLLM": self.meta.get("base_llm"), "Quantization": self.quantization, "Device": str(self.device),
               "Seed": cfg.seed, "ModelSettingsHash": hashlib.sha256(blob.encode()).hexdigest()[:12]}
        if adapter:
            rec["Adapter"] = adapter
        return rec


def _marker(writer: DerivativesWriter, run: Run, atlas: str) -> Path:
    return writer.path(run, "tokens", ".json", atlas=atlas, desc="fmrilm")


def is_complete(writer: DerivativesWriter, run: Run, atlas: str, record: dict[str, Any]) -> bool:
    meta = read_json(_marker(writer, run, atlas))
    if not meta or meta.get("ModelSettingsHash") != record["ModelSettingsHash"]:
        return False
    return all((writer.root / rel).is_file() for rel in meta.get("ModelOutputs", []))


def prepare_run(model: LoadedModel, run: Run, atlas: str, writer: DerivativesWriter) -> dict[str, Any]:
    """Read a run's cleaned series from the output folder and tokenize it."""
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
    item: dict[str, Any] = {"run": run, "atlas": atlas, "ts_path": ts_path, "n_volumes": len(ts), "columns": columns}
    if model.api is not None:
        prepared = model.api.prepare((ts, coords))
        prepared.source = str(ts_path)
        item.update(prepared=prepared, ids=prepared.ids, run_emb=prepared.run_emb, features=prepared.feats)
    else:
        res = model.tokenizer.tokenize(ts, coords, source=ts_path)
        item.update(ids=res["ids"], run_emb=res["embedding"], features=res["features"])
    return item


def compute_fmrilm(model: LoadedModel, item: dict[str, Any]) -> None:
    """Embedding, description, predictions and forecast of one prepared run (added to ``item``).

    The forward passes hold only this run (all answers of a task scored in one batch), so its
    outputs do not depend on which other runs were selected: padding a batch of runs of different
    lengths changes results in the 6th digit.
    """
    from ..model.inference import embed_blocks, generate_descriptions, model_levels, score_options, score_tasks

    api = model.api
    blk = api.block(item["prepared"])
    item["embedding"] = embed_blocks(api.fm, [blk])[0]
    tasks = list(api.tasks.values())
    probas = score_tasks(api.fm, [blk], tasks)  # one pass for every task
    item["predictions"] = {name: p[0] for name, p in zip(api.tasks, probas)}
    # the description states the descriptor levels the predictions give (guided decoding)
    levels, numbers = model_levels(api.fm, tasks, probas, [blk])
    item["text"] = generate_descriptions(api.fm, [blk], max_new_tokens=SAMPLING["max_new_tokens"], levels=levels,
                                         numbers=numbers)[0]
    if model.adapter_task is not None:
        key, task = model.adapter_task
        api.fm.llm.set_adapter("label")
        own = dict(api.fm.calibration or {})
        if model.adapter.get("Calibration"):  # the answer calibration the group level fitted with the adapter
            api.fm.calibration = {**own, task.name: model.adapter["Calibration"]}
        try:
            item["predictions"][key] = score_options(api.fm, [blk], task)[0]
        finally:
            api.fm.llm.set_adapter("default")
            api.fm.calibration = own
    item["patches_used"] = int(blk.ids.shape[0])
    item["forecast"] = api.forecast(item["prepared"]) if len(item["prepared"].ids) >= 2 else None


def write_run_outputs(model: LoadedModel, item: dict[str, Any], writer: DerivativesWriter,
                      record: dict[str, Any]) -> list[Path]:
    """Write one run's model outputs (the tokens sidecar last). Returns the paths."""
    run, atlas, ts_path = item["run"], item["atlas"], item["ts_path"]
    previous = (read_json(_marker(writer, run, atlas)) or {}).get("ModelOutputs", [])
    written: list[Path] = []
    base = {"Sources": [f"bids::{ts_path.relative_to(writer.root).as_posix()}"], **record}
    ids = item["ids"]
    P = model.tokenizer.patch_len
    tok_path = writer.path(run, "tokens", ".tsv.gz", atlas=atlas, desc="fmrilm")
    write_tsv(tok_path, pd.DataFrame(ids, columns=item["columns"]))
    written.append(tok_path)
    if item.get("features") is not None:
        written += _write_encoder(model, item, writer, base)
    if model.api is not None:
        written += _write_fmrilm(model, item, writer, base)
    marker = _marker(writer, run, atlas)
    write_json(marker, {
        "Description": "fMRI-LM token ids: one row per time patch, one column per ROI (codebook indices)",
        "PatchLength": P, "PatchSeconds": P * model.tr, "RepetitionTime": model.tr,
        "CodebookSize": model.tokenizer.codebook_size, "Atlas": atlas,
        "DroppedTrailingVolumes": int(item["n_volumes"] - len(ids) * P),
        "ModelOutputs": [p.relative_to(writer.root).as_posix() for p in written],
        "TokenizerID": model.tokenizer_id,
        "TokenizerRunEmbedding": [round(float(v), 6) for v in item["run_emb"]],
        **base,
    })
    # outputs of an earlier model that this one does not write: removed, never left beside new ones
    keep = {p.relative_to(writer.root).as_posix() for p in written}
    for rel in previous:
        if rel not in keep and ".." not in rel:
            (writer.root / rel).unlink(missing_ok=True)
    return written + [marker]


def _write_encoder(model: LoadedModel, item: dict[str, Any], writer: DerivativesWriter,
                   base: dict[str, Any]) -> list[Path]:
    """The encoder's run representation: one row per region, its continuous features averaged
    over the run's windows (weighted by their real volumes)."""
    feats = item["features"]
    rep = model.tokenizer.region_representation(feats, item["n_volumes"])
    cols = [f"f{i:02d}" for i in range(rep.shape[1])]
    p = writer.path(item["run"], "features", ".tsv.gz", atlas=item["atlas"], desc="encoder")
    write_tsv(p, pd.DataFrame(rep, columns=cols).round(6).assign(region=item["columns"])[["region", *cols]])
    write_json(_sidecar(p, ".tsv.gz"), {
        "Description": "Tokenizer encoder's run representation: each region's continuous encoder features "
                       "(before quantisation) averaged over the run's windows, weighted by their real volumes. "
                       "Flattened region by region it is what information gate 1 and the group level's "
                       "encoder probe read",
        "region": {"Description": "ROI name (a column of the ROI time series)"},
        "Columns": cols, "WindowsUsed": int(len(feats)), **base})
    return [p, _sidecar(p, ".tsv.gz")]


def _sidecar(p: Path, ext: str) -> Path:
    return p.with_name(p.name[: -len(ext)] + ".json")


def _write_fmrilm(model: LoadedModel, item: dict[str, Any], writer: DerivativesWriter, base: dict[str, Any]) -> list[Path]:
    from ..model.tasks import describe_segments

    run, atlas, columns = item["run"], item["atlas"], item["columns"]
    out: list[Path] = []
    emb = item["embedding"]
    cols = [f"e{i:04d}" for i in range(len(emb))]
    p = writer.path(run, "embedding", ".tsv.gz", atlas=atlas, desc="fmrilm")
    write_tsv(p, pd.DataFrame([emb], columns=cols))
    write_json(_sidecar(p, ".tsv.gz"), {
        "Description": "Run embedding: mean final LLM hidden state over the run's fMRI positions",
        "Columns": cols, "PatchesUsed": item["patches_used"], **base})
    out += [p, _sidecar(p, ".tsv.gz")]
    prompt = "".join(s[1] if s[0] == "text" else "<fmri>...</fmri>" for s in describe_segments(0))
    p = writer.path(run, "description", ".json", atlas=atlas, desc="fmrilm")
    write_json(p, {"Description": "Generated descriptor-style text for the run", "Text": item["text"],
                   "Prompt": prompt, "Sampling": SAMPLING, **base})
    out.append(p)
    rows, answers = [], []
    for name, task in model.tasks.items():
        proba = item["predictions"][name]
        row = {"task": name, "prediction": task.answers[int(np.argmax(proba))], "probability": float(np.max(proba))}
        for a, v in zip(task.answers, proba):
            row[f"p_{a}"] = float(v)
            if a not in answers:
                answers.append(a)
        rows.append(row)
    df = pd.DataFrame(rows, columns=["task", "prediction", "probability", *[f"p_{a}" for a in answers]])
    p = writer.path(run, "predictions", ".tsv", atlas=atlas, desc="fmrilm")
    write_tsv(p, df)
    write_json(_sidecar(p, ".tsv"), {
        "Description": "Zero-shot predictions: constrained answers with the probability of each allowed answer "
                       "(n/a where an answer does not belong to the task)",
        "Tasks": {n: {"question": t.question, "answers": list(t.answers)} for n, t in model.tasks.items()},
        **({"AdapterPrompt": {k: model.adapter[k] for k in ("Task", "TaskType", "AnswerForClass", "BinCenters")}}
           if model.adapter else {}), **base})
    out += [p, _sidecar(p, ".tsv")]
    fc = item["forecast"]
    if fc is not None:
        P = fc["observed"].shape[0]
        n = len(item["ids"])
        vol = np.repeat(np.arange((n - 1) * P, n * P), len(columns))
        df = pd.DataFrame({"volume": vol, "roi": np.tile(columns, P), "predicted": fc["predicted"].ravel(),
                           "observed": fc["observed"].ravel()})
        p = writer.path(run, "forecast", ".tsv.gz", atlas=atlas, desc="fmrilm")
        write_tsv(p, df)
        write_json(_sidecar(p, ".tsv.gz"), {
            "Description": "Forecast of the held-back last patch from the patches before it (robust-scaled units)",
            "Units": "robust-scaled (median 0, IQR 1 per ROI)",
            "MSE": fc["mse"], "Correlation": fc["correlation"], "TokenAccuracy": fc["token_accuracy"],
            "BaselineMSEZero": fc["mse_zero"], "BaselineMSEPersistence": fc["mse_persistence"], **base})
        out += [p, _sidecar(p, ".tsv.gz")]
    return out


def _other_models(writer: DerivativesWriter, model_id: str) -> dict[str, int]:
    found: dict[str, int] = {}
    for js in writer.root.glob("sub-*/**/func/*_desc-fmrilm_tokens.json"):
        mid = (read_json(js) or {}).get("ModelID")
        if mid and mid != model_id:
            found[mid] = found.get(mid, 0) + 1
    return found


def run_model_pass(cfg: Config, runs: list[tuple[Run, str]], results: list, progress: bool = True) -> list:
    """Model outputs for every run whose time series are complete, one run at a time.

    Returns the RunResults, updated (a run failing here is marked failed; the others go on).
    """
    from .participant import _crash_report, _progress, _remove_outputs

    writer = DerivativesWriter(cfg.output_dir, cfg.bids_dir)
    model = LoadedModel(cfg.model, cfg)
    record = model.record(cfg)
    others = _other_models(writer, model.id)
    if others:
        log.warning("OUTPUT_DIR holds model outputs of other models (%s); the selected runs are recomputed with %s, "
                    "runs not selected keep theirs (see ModelID in each *_desc-fmrilm_tokens.json)",
                    ", ".join(f"{k}: {v} runs" for k, v in others.items()), model.id)
    by_id = {(r.run_id, r.source): r for r in results}
    todo = []
    for run, atlas in runs:
        res = by_id.get((run.run_id, run.relpath()))
        if res is None or res.status == "failed":
            continue
        if not cfg.force and is_complete(writer, run, atlas, record):
            continue
        todo.append((run, atlas, res))
    if not todo:
        log.info("model %s: every selected run's model outputs are complete (nothing to do)", model.id)
        return results
    t0 = time.time()
    model.load()
    log.info("model %s (%s) loaded in %.0f s on %s, quantization %s", model.id, model.kind, time.time() - t0,
             model.device, model.quantization)

    def fail(run, res, started, exc):
        _remove_outputs(started)
        if isinstance(exc, BidsAppError):
            res.reason, res.code = exc.one_line(), int(exc.code)
        else:
            res.code = int(ExitCode.ERROR)
            res.reason = f"{run.relpath()}: unexpected {exc.__class__.__name__} in the model pass: {exc}".splitlines()[0]
        res.status = "failed"
        res.traceback = _crash_report(cfg, run, exc)
        log.error("%s", res.reason)

    bar = _progress(progress)
    with bar:
        task = bar.add_task("model", total=len(todo))
        for run, atlas, res in todo:
            t = time.time()
            started = [_marker(writer, run, atlas)]
            try:
                item = prepare_run(model, run, atlas, writer)
                if model.api is not None:
                    compute_fmrilm(model, item)
                paths = write_run_outputs(model, item, writer, record)
                res.status = "done"
                res.outputs = tuple(res.outputs) + tuple(str(p) for p in paths)
                res.seconds += time.time() - t
            except Exception as exc:  # noqa: BLE001 - reported per run, the others go on
                fail(run, res, started, exc)
            bar.advance(task)
    return results

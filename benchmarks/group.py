"""Benchmark: the group level on CPU, with and without the fMRI-LM, on N participants x F folds.

1. Inputs: a derivative dataset of N ROI time-series runs (CC200-sized, TR 2 s, 150 volumes) with a
   balanced ``diagnosis`` column; the participant level writes series and tokens (``--model
   <checkpoint>/tokenizer``: tokens only, the LLM is not needed at the participant level for this).
2. Baseline, measured in the same run: ``group --label diagnosis --folds F --model none`` (chance
   and linear model on FC).
3. ``group --label diagnosis --folds F`` with the checkpoint and the default ``--shots``/
   ``--adapt-steps``: zero-shot, embedding probe, few-shot LoRA per K, final adapter.

Prints wall time and peak RSS of each, the ratio of 3 over 2, and wall time against the target
(15 minutes for 100 participants x 5 folds with the default model).

Usage: ``python benchmarks/group.py [--model DIR] [--participants 100] [--folds 5] [--workdir DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from participant import _child_peak, roi_dataset

TARGET_S = 15 * 60


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="checkpoint (default: the packaged model)")
    ap.add_argument("--participants", type=int, default=100)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    from bids_fmrilm.model.checkpoint import resolve_model

    model = resolve_model(args.model or "default")
    if model is None:
        sys.exit("no model: pass --model or install the packaged default")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_group_"))
    data = roi_dataset(work / f"roi{args.participants}", args.participants)
    pd.DataFrame({"participant_id": [f"sub-{i + 1:03d}" for i in range(args.participants)],
                  "diagnosis": ["ASD" if i % 2 else "TD" for i in range(args.participants)]}).to_csv(
        data / "participants.tsv", sep="\t", index=False)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    cli = str(Path(sys.executable).parent / "bids_fmrilm")
    out = work / "out"
    wall, peak, rc = _child_peak([cli, str(data), str(out), "participant", "--model", str(Path(model) / "tokenizer"),
                                  "--skip-bids-validation", "--nprocs", "2"], env)
    res = {"participants": args.participants, "folds": args.folds, "model": model,
           "participant_level_tokens": {"wall_s": round(wall, 1), "peak_mib": round(peak), "exit_code": rc}}
    print(json.dumps(res), flush=True)
    common = [cli, str(data), str(out), "group", "--label", "diagnosis", "--folds", str(args.folds), "--device", "cpu"]
    for name, extra in (("baseline_fc_only", ["--model", "none"]), ("fmrilm", ["--model", model])):
        wall, peak, rc = _child_peak(common + extra, env)
        res[name] = {"wall_s": round(wall, 1), "peak_mib": round(peak), "exit_code": rc}
        print(name, json.dumps(res[name]), flush=True)
    b, f = res["baseline_fc_only"], res["fmrilm"]
    res["ratio_fmrilm_over_baseline"] = {"wall": round(f["wall_s"] / b["wall_s"], 2),
                                         "peak_memory": round(f["peak_mib"] / b["peak_mib"], 2)}
    res["fmrilm_wall_over_target_15min"] = round(f["wall_s"] / TARGET_S, 3)
    metrics = out / "group" / "label-diagnosis_metrics.json"
    if metrics.is_file():
        res["adaptations"] = len(json.loads(metrics.read_text()).get("Adaptation", []))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

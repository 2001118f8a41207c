"""``make demo``: simulate a small fMRIPrep-style dataset and run both analysis levels on it.

Usage: ``python -m bids_fmrilm.demo --out demo_out``. The simulated dataset is written to
``OUT/bids`` (kept between runs), the derivatives to ``OUT/derivatives``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .cli import _run, bids_app_command, expand_multi_values
from .simulate import make_fmriprep_dataset


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--subjects", type=int, default=12)
    ap.add_argument("--volumes", type=int, default=120)
    ap.add_argument("--nprocs", type=int, default=2)
    args = ap.parse_args(argv)
    bids = args.out / "bids"
    deriv = args.out / "derivatives"
    t0 = time.time()
    if not (bids / "participants.tsv").exists():
        print(f"simulating {args.subjects} participants x {args.volumes} volumes (fMRIPrep-style, MNI 4 mm) in {bids}")
        make_fmriprep_dataset(bids, n_subjects=args.subjects, n_volumes=args.volumes, voxel_mm=4.0, seed=0)
    calls = {
        "participant": [str(bids), str(deriv), "participant", "--nprocs", str(args.nprocs)],
        # few-shot LoRA with 2 and all training participants per class, kept short for a demo
        "group": [str(bids), str(deriv), "group", "--label", "diagnosis", "--folds", "3", "--shots", "2", "all",
                  "--adapt-steps", "6"],
    }
    for level, call in calls.items():
        code = _run(bids_app_command, expand_multi_values(call), "bids_fmrilm")
        if code:
            print(f"demo: the {level} level exited with {code}", file=sys.stderr)
            return code
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    print(f"  input (simulated):     {bids.resolve()}")
    print(f"  derivatives:           {deriv.resolve()}")
    print(f"  ROI time series:       {deriv.resolve()}/sub-*/func/*_timeseries.tsv.gz")
    print(f"  descriptors:           {deriv.resolve()}/sub-*/func/*_desc-descriptors_features.json")
    if list(deriv.glob("sub-*/func/*_desc-fmrilm_tokens.json")):
        print(f"  fMRI-LM outputs:       {deriv.resolve()}/sub-*/func/*_desc-fmrilm_*  (tokens, embedding, "
              "description, predictions, forecast)")
    print(f"  participant reports:   {deriv.resolve()}/sub-*.html")
    print(f"  group QC table:        {(deriv / 'group' / 'qc_runs.tsv').resolve()}")
    print(f"  diagnosis CV metrics:  {(deriv / 'group' / 'label-diagnosis_metrics.tsv').resolve()}")
    if (deriv / "group" / "label-diagnosis_adapter").is_dir():
        print(f"  few-shot adapter:      {(deriv / 'group' / 'label-diagnosis_adapter').resolve()}")
    print(f"  group report:          {(deriv / 'group' / 'group.html').resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

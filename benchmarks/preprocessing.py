"""Benchmark: the minimal preprocessing of one raw 300-volume 3 mm run, time per step.

Simulates a raw BIDS run (``bids_fmrilm.preprocessing.simulate``: nilearn's MNI152 template carried
into a native space by an affine + smooth deformation; a 1 mm T1w and a 3 mm EPI series with some
head motion), runs :func:`bids_fmrilm.preprocessing.preprocess_run` to MNI 2 mm, then the signal
step (parcellation and cleaning of the preprocessed series), and prints the wall time of each
step. Target: under 5 minutes a run on a 2-core CPU. ANTs/ITK threads: ``--threads`` (default 2).

Usage: ``python benchmarks/preprocessing.py [--volumes 300] [--voxel 3] [--threads 2] [--workdir DIR]``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=300)
    ap.add_argument("--voxel", type=float, default=3.0, help="EPI voxel size (mm)")
    ap.add_argument("--t1w-voxel", type=float, default=1.0, help="T1w voxel size (mm)")
    ap.add_argument("--resolution", type=float, default=2.0, help="output MNI grid (mm)")
    ap.add_argument("--threads", type=int, default=2, help="ANTs/ITK threads")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)

    from bids_fmrilm.bids.layout import find_runs, find_t1w
    from bids_fmrilm.config import SignalSettings
    from bids_fmrilm.preprocessing import PreprocOptions, preprocess_run
    from bids_fmrilm.preprocessing.simulate import make_raw_dataset
    from bids_fmrilm.signals.pipeline import extract_signals

    base = args.workdir or Path(tempfile.mkdtemp(prefix="bench_preproc_"))
    root = base / "raw"
    t0 = time.perf_counter()
    motion = {v: (0.5 * (-1) ** v, 0.3, -0.4, 0.5, -0.3, 0.2) for v in range(20, args.volumes - 1, 40)}
    make_raw_dataset(root, n_volumes=args.volumes, bold_voxel_mm=args.voxel, t1w_voxel_mm=args.t1w_voxel,
                     source_resolution=1 if args.t1w_voxel < 2 else 2, motion=motion)
    print(f"simulated {args.volumes} volumes at {args.voxel:g} mm (T1w {args.t1w_voxel:g} mm) in "
          f"{time.perf_counter() - t0:.1f} s (not counted)", flush=True)
    (run,) = find_runs(root)
    import nibabel as nib

    print(f"BOLD grid {nib.load(run.path).shape}, ITK threads {args.threads}, CPUs {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    t0 = time.perf_counter()
    pre = preprocess_run(run, PreprocOptions(resolution=args.resolution, omp_nthreads=args.threads, progress=True),
                         base / "work", t1w=find_t1w(run), tr=2.0)
    t_pre = time.perf_counter() - t0
    t1 = time.perf_counter()
    sig = extract_signals(run, SignalSettings(), preprocessed=pre)
    t_sig = time.perf_counter() - t1
    total = time.perf_counter() - t0
    pre.cleanup()
    print("\nstep                                         seconds")
    for name, sec in pre.step_seconds.items():
        print(f"  {name:<43s}{sec:8.1f}")
    print(f"  {'(preprocessing total)':<43s}{t_pre:8.1f}")
    print(f"  {'signals: parcellation + cleaning':<43s}{t_sig:8.1f}")
    print(f"  {'TOTAL':<43s}{total:8.1f}   ({total / 60:.2f} min; target < 5 min)")
    print(f"T1w used: {pre.t1w_used}; ROI series {sig.timeseries.shape}; mean FD {sig.mean_fd:.3f} mm; "
          f"load average now {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

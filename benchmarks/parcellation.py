"""Benchmark: streaming parcellation vs nilearn NiftiLabelsMasker vs only reading the file.

Generates a 91x109x91xT float32 ``.nii.gz`` on the MNI152NLin6Asym 2 mm grid (brain voxels carry
signal, the rest is zero, as in fMRIPrep output) and parcellates it with the 450-ROI
Schaefer-400 + Tian-S3 atlas (from ``$BIDS_FMRILM_ATLAS_DIR`` or ``../shared/atlases``). Each
method runs in a fresh process, so peak resident memory (``ru_maxrss``) is its own. Prints wall
time and peak memory of each and the ratios the project targets:

- ours at least 3x faster than NiftiLabelsMasker, with at most 1/4 of its peak memory;
- ours within 1.5x of the time of just reading and decompressing the image.

Usage: ``python benchmarks/parcellation.py [--volumes 300] [--repeats 1] [--workdir DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED_ATLASES = HERE.parent.parent / "shared" / "atlases"

METHODS = {
    "read": """
import gzip, time, nibabel as nib
from nibabel.openers import Opener
img = nib.load(PATH)
t = time.perf_counter()
with Opener(PATH, 'rb') as f:
    while f.read(64 << 20):
        pass
elapsed = time.perf_counter() - t
""",
    "ours": """
import time
from bids_fmrilm.signals.atlas import load_atlas
from bids_fmrilm.signals.parcellate import parcellate
atlas = load_atlas('schaefer400tian')
t = time.perf_counter()
ts = parcellate(PATH, atlas).timeseries
elapsed = time.perf_counter() - t
np_sum = float(abs(ts).sum())
""",
    "nilearn": """
import time, warnings
warnings.filterwarnings('ignore')
from nilearn.maskers import NiftiLabelsMasker
from bids_fmrilm.signals.atlas import load_atlas
atlas = load_atlas('schaefer400tian')
t = time.perf_counter()
ts = NiftiLabelsMasker(atlas.labels_img, resampling_target='data', standardize=False).fit_transform(PATH)
elapsed = time.perf_counter() - t
np_sum = float(abs(ts).sum())
""",
}

RUNNER = """
import json, resource, sys
PATH = sys.argv[1]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
{code}
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"seconds": elapsed, "peak_mb": peak / 1024, "import_mb": base / 1024}}))
"""


def make_image(path: Path, n_volumes: int, seed: int = 0) -> None:
    """Write the benchmark image volume by volume (the generator itself stays small in memory)."""
    import gzip

    import nibabel as nib
    import numpy as np
    from nilearn.datasets import load_mni152_brain_mask

    mask = load_mni152_brain_mask(resolution=2)
    brain = np.asarray(mask.dataobj) > 0
    shape = brain.shape
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape + (n_volumes,))
    hdr.set_data_dtype(np.float32)
    hdr.set_zooms((2.0, 2.0, 2.0, 2.0))
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_sform(mask.affine, code=4)
    hdr.set_qform(mask.affine, code=4)
    rng = np.random.default_rng(seed)
    flat_brain = brain.reshape(-1, order="F")
    base = (100 + 10 * rng.random(flat_brain.sum())).astype(np.float32)
    with gzip.open(path, "wb", compresslevel=1) as f:
        hdr.write_to(f)
        f.write(b"\0" * (int(hdr.get_data_offset()) - 348))
        for _ in range(n_volumes):
            vol = np.zeros(flat_brain.size, np.float32)
            vol[flat_brain] = base + rng.standard_normal(base.size).astype(np.float32)
            f.write(vol.tobytes())


def run_method(name: str, path: Path) -> dict:
    code = RUNNER.format(code=METHODS[name])
    env = dict(os.environ)
    env.setdefault("BIDS_FMRILM_ATLAS_DIR", str(SHARED_ATLASES))
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=1, help="runs per method; the fastest is kept")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    if not (Path(os.environ.get("BIDS_FMRILM_ATLAS_DIR", SHARED_ATLASES)) .exists()):
        print("SKIPPED: the Schaefer-400+Tian atlas is not available (set BIDS_FMRILM_ATLAS_DIR)")
        return 0
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        img = Path(tmp) / "sub-bench_task-rest_space-MNI152NLin6Asym_desc-preproc_bold.nii.gz"
        t = time.perf_counter()
        make_image(img, args.volumes)
        print(f"generated 91x109x91x{args.volumes} float32 image: {img.stat().st_size / 2**20:.0f} MiB "
              f"compressed, {91 * 109 * 91 * args.volumes * 4 / 2**20:.0f} MiB raw ({time.perf_counter() - t:.0f} s)")
        res = {}
        for name in ("read", "ours", "nilearn"):
            runs = [run_method(name, img) for _ in range(args.repeats)]
            res[name] = min(runs, key=lambda r: r["seconds"])
            print(f"{name:8s} {res[name]['seconds']:7.2f} s   peak {res[name]['peak_mb']:7.0f} MiB "
                  f"(after imports {res[name]['import_mb']:.0f} MiB)")
    speedup = res["nilearn"]["seconds"] / res["ours"]["seconds"]
    mem_ratio = res["ours"]["peak_mb"] / res["nilearn"]["peak_mb"]
    read_ratio = res["ours"]["seconds"] / res["read"]["seconds"]
    print(f"speed-up vs NiftiLabelsMasker: {speedup:.2f}x (target >= 3)")
    print(f"peak memory ours / NiftiLabelsMasker: {mem_ratio:.3f} (target <= 0.25)")
    print(f"time ours / read+decompress only: {read_ratio:.2f} (target <= 1.5)")
    ok = speedup >= 3 and mem_ratio <= 0.25 and read_ratio <= 1.5
    print("targets met" if ok else "targets NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

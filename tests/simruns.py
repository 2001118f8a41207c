"""Simulated ROI-series runs and a descriptor corpus for tokenizer and fMRI-LM tests."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"
ATLAS_DIR = SHARED / "atlases"
N_ROI = 200


def _coords(n: int = N_ROI) -> np.ndarray:
    """CC200 centroids when the shared atlases are present, else random points in a brain box."""
    if (ATLAS_DIR / "CC200_centroids.csv").is_file():
        os.environ.setdefault("BIDS_FMRILM_ATLAS_DIR", str(ATLAS_DIR))
        from bids_fmrilm.signals.atlas import load_atlas

        c = load_atlas("cc200").coords
        if len(c) == n:
            return c
    return np.random.default_rng(1).uniform([-70, -100, -40], [70, 70, 80], size=(n, 3))


def _simulate(rng, coords, n_vol=48, n_net=4):
    """Network-structured signals: ROIs share one of a few slow latent series, plus noise."""
    net = np.argsort(coords[:, 0])[np.arange(len(coords))] % n_net
    t = np.arange(n_vol)
    latents = np.stack([np.sin(2 * np.pi * (0.03 + 0.01 * k) * t + rng.uniform(0, 6)) for k in range(n_net)], 1)
    latents += 0.3 * rng.standard_normal(latents.shape)
    amp = rng.uniform(0.5, 1.5, len(coords))
    return latents[:, net] * amp + 0.4 * rng.standard_normal((n_vol, len(coords)))


def _write_dataset(root: Path, coords: np.ndarray, n_sub: int = 9) -> Path:
    """A participant-level output folder + a corpus of texts, three sites."""
    rng = np.random.default_rng(0)
    names = [f"ROI{i + 1:03d}" for i in range(len(coords))]
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "simulated ROI series", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
         "GeneratedBy": [{"Name": "tests"}]}))
    lines = []
    for i in range(n_sub):
        sub = f"{i + 1:02d}"
        ts = _simulate(rng, coords, n_vol=40)
        func = root / f"sub-{sub}" / "func"
        func.mkdir(parents=True)
        stem = func / f"sub-{sub}_task-rest_atlas-Sim_timeseries"
        with gzip.open(str(stem) + ".tsv.gz", "wt") as fh:
            fh.write("\t".join(names) + "\n")
            for row in ts:
                fh.write("\t".join(f"{v:.5f}" for v in row) + "\n")
        Path(str(stem) + ".json").write_text(json.dumps({"RepetitionTime": 2.0}))
        zf, zm = (1.5, -1.2) if i % 2 else (-1.4, 0.3)
        lines.append({"run": {"path": f"sub-{sub}/func/x.tsv.gz", "subject": sub, "session": None, "task": "rest",
                              "run": None},
                      "text": f"Run {i} shows {'high' if i % 2 else 'low'} connectivity. Average within-network "
                              f"connectivity is {'higher' if i % 2 else 'lower'} than average.",
                      "z": {"fc_within.mean": zf, "graph.modularity": zm},
                      "phenotype": {"site": "ABC"[i % 3], "sex": "MF"[i % 2], "diagnosis": ["ASD", "TD"][(i // 2) % 2],
                                    "age": 8.0 + 2.5 * i}})
    table = {"index": range(1, len(coords) + 1), "name": names, "network": ["n/a"] * len(coords)}
    import pandas as pd

    pd.DataFrame({**table, "x": coords[:, 0], "y": coords[:, 1], "z": coords[:, 2]}).to_csv(
        root / "atlas-Sim_dseg.tsv", sep="\t", index=False)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return corpus

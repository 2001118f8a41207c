"""Descriptor corpus: features, reference/z-scores, text and the JSON-lines corpus."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bids_fmrilm.descriptors import (
    build_corpus_from_dir,
    build_reference,
    compute_features,
    describe,
    level_of,
    load_reference,
    read_corpus,
    save_reference,
    zscore,
)
from bids_fmrilm.descriptors.reference import robust_scale
from bids_fmrilm.descriptors.text import MARKED_Z, MILD_Z, verbal_level

SHARED = Path(__file__).parents[1] / ".." / "shared"
ABIDE = SHARED / "data" / "abide-cc200"
CC200 = SHARED / "atlases" / "CC200_centroids.csv"

TR = 2.0
N_VOL = 240


def _rois(networks: list[str]) -> pd.DataFrame:
    n = len(networks)
    return pd.DataFrame(
        {"index": np.arange(1, n + 1), "name": [f"R{i}" for i in range(n)], "network": networks,
         "x": np.zeros(n), "y": np.zeros(n), "z": np.zeros(n)}
    )


def _ar1(rng, n, phi, size=1):
    x = np.zeros((n, size))
    e = rng.standard_normal((n, size))
    for t in range(1, n):
        x[t] = phi * x[t - 1] + e[t]
    return x


def simulate(seed: int = 0, coupling: float = 1.0, n_per: int = 6, n_vol: int = N_VOL) -> tuple[np.ndarray, pd.DataFrame]:
    """Two coupled networks (A, B; independent of each other), a noise network and an unassigned ROI.

    Each ROI of A/B is ``coupling * latent + noise``; C is white noise only.
    """
    rng = np.random.default_rng(seed)
    cols, nets = [], []
    for net in ("NetA", "NetB"):
        latent = _ar1(rng, n_vol, 0.5)
        cols.append(coupling * latent + 0.6 * rng.standard_normal((n_vol, n_per)))
        nets += [net] * n_per
    cols.append(rng.standard_normal((n_vol, n_per)))
    nets += ["NetC"] * n_per
    cols.append(rng.standard_normal((n_vol, 1)))
    nets += ["unassigned"]
    ts = np.hstack(cols)
    return ts - ts.mean(0), _rois(nets)


def _all_finite_or_none(d: dict) -> bool:
    return all(v is None or (isinstance(v, float) and math.isfinite(v)) for v in d.values())


# ----------------------------------------------------------------------------------- features
def test_fc_known_structure():
    ts, rois = simulate()
    f = compute_features(ts, rois, TR)
    assert f["fc_within.NetA"] > 0.5 and f["fc_within.NetB"] > 0.5
    assert abs(f["fc_between.NetA-NetB"]) < 0.1
    assert abs(f["fc_within.NetC"]) < 0.15
    assert abs(f["fc_between.NetA-NetC"]) < 0.1
    assert f["fc.segregation"] > 0.2
    assert "fc_within.unassigned" not in f and not any("unassigned" in k for k in f)
    for k in ("graph.global_efficiency", "graph.modularity", "graph.clustering", "graph.strength"):
        assert f[k] is not None and f[k] >= 0
    # Two independent modules dominate the top edges: clearly modular.
    assert f["graph.modularity"] > 0.3
    assert f["motion.fd_mean"] is None
    assert _all_finite_or_none(f)


def test_slow_vs_white_spectral():
    rng = np.random.default_rng(1)
    slow = _ar1(rng, 400, 0.9, size=5)
    white = rng.standard_normal((400, 5))
    ts = np.hstack([slow, white])
    f = compute_features(ts - ts.mean(0), _rois(["Slow"] * 5 + ["White"] * 5), TR)
    assert f["autocorr1.Slow"] > 0.7 and abs(f["autocorr1.White"]) < 0.15
    assert f["power_ratio.Slow"] > 2 * f["power_ratio.White"]
    assert f["falff.Slow"] > f["falff.White"]
    # amplitude is relative to the run's median ROI SD: scaling the whole run changes nothing
    g = compute_features(1000 * (ts - ts.mean(0)), _rois(["Slow"] * 5 + ["White"] * 5), TR)
    for k in ("amplitude.Slow", "alff.White", "falff.Slow", "power_ratio.White"):
        assert g[k] == pytest.approx(f[k], rel=1e-9)


def test_power_ratio_clips_to_nyquist():
    rng = np.random.default_rng(2)
    ts = rng.standard_normal((150, 4))
    f = compute_features(ts, _rois(["N"] * 4), tr=3.0)  # Nyquist 0.167 Hz < 0.25 Hz
    assert f["power_ratio.N"] is not None and f["power_ratio.N"] > 0


def test_no_signal_columns_excluded():
    ts, rois = simulate(seed=3)
    f_ref = compute_features(ts, rois, TR)
    bad = np.hstack([ts, np.full((N_VOL, 1), 7.0), np.full((N_VOL, 1), np.nan), np.zeros((N_VOL, 1))])
    rois_bad = _rois(list(rois["network"]) + ["NetA", "NetD", "NetE"])
    f = compute_features(bad, rois_bad, TR, fd_mean=0.2)
    assert _all_finite_or_none(f)
    for k, v in f_ref.items():
        if v is not None and k in f and not k.startswith("motion"):
            assert f[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    # networks with no ROI carrying signal are explicitly unavailable
    assert f["fc_within.NetD"] is None and f["amplitude.NetE"] is None and f["fc_between.NetA-NetD"] is None
    assert f["motion.fd_mean"] == 0.2
    # everything unavailable, but never NaN
    empty = compute_features(np.full((N_VOL, 3), np.nan), _rois(["A", "A", "B"]), TR)
    assert all(v is None for v in empty.values())
    assert set(empty) == set(compute_features(np.random.default_rng(0).standard_normal((N_VOL, 3)),
                                              _rois(["A", "A", "B"]), TR))


def test_motion_from_fd_series():
    ts, rois = simulate(seed=4)
    fd = np.array([np.nan, 0.1, 0.2, 0.9, 0.1])
    f = compute_features(ts, rois, TR, fd=fd)
    assert f["motion.fd_mean"] == pytest.approx(0.325)
    assert f["motion.fd_max"] == pytest.approx(0.9)
    assert f["motion.fd_frac_gt_0p5"] == pytest.approx(0.25)


# ---------------------------------------------------------------------------- reference and z
@pytest.fixture(scope="module")
def population():
    return [compute_features(*simulate(seed=s), TR) for s in range(12)]


def test_reference_z_and_text(population, tmp_path):
    ref = build_reference(population, name="sim")
    assert ref["n_runs"] == 12 and len(ref["id"]) == 16
    assert build_reference(population, name="sim")["id"] == ref["id"]
    zs = [zscore(f, ref) for f in population]
    key = "fc_within.NetA"
    assert abs(np.median([z[key] for z in zs])) < 1e-9
    med_abs = np.median([abs(np.median([z[k] for z in zs if z[k] is not None])) for k in zs[0] if zs[0][k] is not None])
    assert med_abs < 0.05

    strong = compute_features(*simulate(seed=99, coupling=2.0), TR)
    z = zscore(strong, ref)
    assert z[key] > MILD_Z and z["fc_within.NetB"] > MILD_Z
    assert level_of(z[key]) in {"higher", "markedly_higher"}
    text = describe(strong, z, seed=0)
    assert "within-network connectivity of the neta network" in text.lower() or "higher" in text
    assert "higher" in text

    path = save_reference(ref, tmp_path / "sub" / "ref.json")
    assert load_reference(path) == ref
    assert not list((tmp_path / "sub").glob("*.tmp"))


def test_zscore_unavailable():
    ref = build_reference([{"a": 1.0, "b": 5.0}, {"a": 2.0, "b": 5.0}, {"a": 4.0, "b": 5.0}, {"a": None, "b": 5.0}], "t")
    assert ref["features"]["b"]["scale"] is None
    z = zscore({"a": 2.0, "b": 5.0, "c": 1.0, "d": None}, ref)
    assert z == {"a": 0.0, "b": None, "c": None, "d": None}


def test_robust_scale_fallbacks():
    assert robust_scale(np.array([1.0, 2, 3, 4, 5]))[1] == "mad"
    # MAD 0 (majority ties) -> IQR or SD fallback
    s, m = robust_scale(np.array([0.0] * 6 + [1.0, 2.0, 3.0]))
    assert m in {"iqr", "std"} and s > 0
    s, m = robust_scale(np.array([0.0] * 8 + [5.0]))
    assert m == "std" and s > 0
    assert robust_scale(np.ones(5)) == (None, "none")


def test_level_of_thresholds():
    assert level_of(None) == "unavailable" and level_of(float("nan")) == "unavailable"
    assert level_of(0.0) == level_of(0.99) == level_of(-0.99) == "typical"
    assert level_of(MILD_Z) == "higher" and level_of(-MILD_Z) == "lower"
    assert level_of(MARKED_Z) == "markedly_higher" and level_of(-2.5) == "markedly_lower"
    assert verbal_level(-2.14) == "markedly lower than average (z=-2.1)"
    assert verbal_level(-0.04) == "typical (z=0.0)"


def test_describe_seeded(population):
    ref = build_reference(population, name="sim")
    f = compute_features(*simulate(seed=50, coupling=1.5), TR)
    z = zscore(f, ref)
    assert describe(f, z, seed=3) == describe(f, z, seed=3)
    texts = {describe(f, z, seed=s) for s in range(6)}
    assert len(texts) >= 2
    n_sentences = describe(f, z, seed=0).count(". ") + 1
    assert n_sentences <= 12
    assert "NetA" not in describe(f, z, seed=0) or "neta" in describe(f, z, seed=0).lower()


# ----------------------------------------------------------------------------------- real data
@pytest.mark.shared
def test_abide_features_finite(monkeypatch):
    if not ABIDE.is_dir() or not CC200.is_file():
        pytest.skip(f"shared ABIDE CC200 data not found under {SHARED}")
    monkeypatch.setenv("BIDS_FMRILM_ATLAS_DIR", str(CC200.parent))
    from bids_fmrilm.bids.layout import find_runs
    from bids_fmrilm.descriptors import run_record

    labels = sorted(p.name for p in ABIDE.glob("sub-*"))[::70][:10]
    runs = find_runs(ABIDE, participant_label=tuple(labels))
    assert len(runs) == 10
    for r in runs:
        rec = run_record(r)
        assert _all_finite_or_none(rec["features"]), r.path
        assert rec["features"]["fc_within.DefaultMode"] is not None
        assert rec["tr"] == 2.0  # the model TR, as at the participant level


# -------------------------------------------------------------------------------------- corpus
def _write_dataset(root: Path, n_sub: int = 3) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "sim", "BIDSVersion": "1.10.0", "DatasetType": "derivative", "GeneratedBy": [{"Name": "test"}]}))
    rows = []
    for i in range(n_sub):
        sub = f"{i + 1:02d}"
        ts, rois = simulate(seed=10 + i, coupling=1.0 + 0.3 * i)
        ts = ts + 100.0  # raw-like offset, removed by cleaning
        if i == 1:
            ts[:, 2] = 5.0  # zero-variance ROI
        d = root / f"sub-{sub}" / "func"
        d.mkdir(parents=True)
        stem = f"sub-{sub}_task-rest_atlas-Sim_timeseries"
        df = pd.DataFrame(ts, columns=[f"ROI{j:03d}" for j in range(ts.shape[1])])
        if i == 2:
            df["ROI003"] = np.nan
        with gzip.open(d / f"{stem}.tsv.gz", "wt") as fh:
            df.to_csv(fh, sep="\t", index=False, na_rep="n/a")
        (d / f"{stem}.json").write_text(json.dumps({"RepetitionTime": TR}))
        rows.append({"participant_id": f"sub-{sub}", "site": "A" if i < 2 else "B",
                     "fd_mean": 0.1 * (i + 1), "diagnosis": "n/a" if i == 0 else "TD"})
    pd.DataFrame(rows).to_csv(root / "participants.tsv", sep="\t", index=False)


def test_run_record_uses_the_signal_pipeline(tmp_path):
    from bids_fmrilm.bids.layout import find_runs
    from bids_fmrilm.descriptors import run_record
    from bids_fmrilm.signals.pipeline import extract_signals

    _write_dataset(tmp_path / "ds")
    run = find_runs(tmp_path / "ds", participant_label=("02",))[0]
    sig = extract_signals(run, __import__("bids_fmrilm.config", fromlist=["SignalSettings"]).SignalSettings())
    assert sig.timeseries.shape == (N_VOL, 19) and sig.flat_rois == ["ROI002"]
    assert np.isnan(sig.timeseries[:, 2]).all() and abs(np.nanmean(sig.timeseries[:, 0])) < 0.5
    rec = run_record(run, phenotype={"fd_mean": 0.2})
    assert rec["atlas"] == "Sim" and rec["qc"]["n_rois_no_signal"] == 1 and rec["tr"] == TR
    assert _all_finite_or_none(rec["features"]) and rec["features"]["motion.fd_mean"] == pytest.approx(0.2)


def test_corpus_build_and_resume(tmp_path):
    ds, out = tmp_path / "ds", tmp_path / "out" / "corpus.jsonl"
    _write_dataset(ds)
    res = build_corpus_from_dir(ds, out, nprocs=1, seed=1, progress=False, save_reference_to=tmp_path / "ref.json")
    assert res["written"] == 3 and not res["failed"]
    lines = read_corpus(out)
    assert [ln["run"]["subject"] for ln in lines] == ["01", "02", "03"]
    for ln in lines:
        assert set(ln) >= {"run", "atlas", "tr", "features", "z", "levels", "text", "reference_id", "phenotype"}
        assert ln["run"]["task"] == "rest" and ln["run"]["path"].startswith(f"sub-{ln['run']['subject']}/func/")
        assert ln["reference_id"] == res["reference"]["id"] == load_reference(tmp_path / "ref.json")["id"]
        assert set(ln["z"]) == set(ln["features"]) == set(ln["levels"])
        assert _all_finite_or_none(ln["features"]) and _all_finite_or_none(ln["z"])
        assert isinstance(ln["text"], str) and len(ln["text"]) > 50
    assert lines[0]["phenotype"]["diagnosis"] is None and lines[1]["phenotype"]["site"] == "A"
    assert lines[2]["features"]["motion.fd_mean"] == pytest.approx(0.3)

    # Resume after losing the last line (and leaving a partial one): same lines, no duplicates.
    raw = out.read_text().splitlines(keepends=True)
    out.write_text("".join(raw[:-1]) + raw[-1][:40])
    res2 = build_corpus_from_dir(ds, out, nprocs=1, seed=1, progress=False)
    assert res2["written"] == 1 and res2["skipped"] == 2
    again = read_corpus(out)
    assert len(out.read_text().splitlines()) == 3
    assert [ln["run"]["path"] for ln in again] == [ln["run"]["path"] for ln in lines]
    assert again == lines

    # Reference from one site only; a different reference may not be mixed into the same file.
    out2 = tmp_path / "site.jsonl"
    res3 = build_corpus_from_dir(ds, out2, reference_sites=["A"], nprocs=2, progress=False)
    assert res3["reference"]["n_runs"] == 2
    with pytest.raises(ValueError, match="another reference"):
        build_corpus_from_dir(ds, out2, progress=False)


def test_corpus_cli(tmp_path):
    from click.testing import CliRunner

    from bids_fmrilm.descriptors.cli import corpus_command

    _write_dataset(tmp_path / "ds")
    out = tmp_path / "c.jsonl"
    r = CliRunner().invoke(corpus_command, [str(tmp_path / "ds"), str(out), "--participant-label", "01,sub-02",
                                            "--save-reference", str(tmp_path / "r.json"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert len(read_corpus(out)) == 2
    r = CliRunner().invoke(corpus_command, [str(tmp_path / "ds"), str(tmp_path / "d.jsonl"), "--reference",
                                            str(tmp_path / "r.json"), "--quiet"])
    assert r.exit_code == 0, r.output
    ids = {ln["reference_id"] for ln in read_corpus(tmp_path / "d.jsonl")}
    assert ids == {load_reference(tmp_path / "r.json")["id"]}


def test_graph_measures_match_networkx():
    import networkx as nx

    from bids_fmrilm.descriptors.features import _average_clustering, _global_efficiency

    rng = np.random.default_rng(5)
    n = 30
    w = np.triu(rng.uniform(0.1, 1.0, (n, n)) * (rng.uniform(size=(n, n)) < 0.2), 1)
    w = w + w.T
    g = nx.from_numpy_array(w)
    assert _average_clustering(w) == pytest.approx(nx.average_clustering(g, weight="weight"), rel=1e-10)
    assert _global_efficiency(w > 0) == pytest.approx(nx.global_efficiency(g), rel=1e-10)


def test_parse_levels_reads_generated_statements():
    from bids_fmrilm.descriptors.text import describe, level_of, parse_levels

    z = {"fc_within.mean": 2.4, "fc_between.mean": -1.2, "graph.modularity": 0.3, "motion.fd_mean": 3.1,
         "alff.Visual": -2.2, "falff.mean": None}
    feats = {"motion.fd_mean": 0.41}
    for seed in range(5):  # every phrasing template parses back to the level it states
        text = describe(feats, z, seed=seed)
        got = parse_levels(text, z.keys())
        assert got == {k: level_of(v) for k, v in z.items() if v is not None}, text
    assert parse_levels("Modularity of the functional graph is typical. Nothing else.", z.keys()) == {
        "graph.modularity": "typical"}
    # a level in a later sentence is not attributed to a feature named without one
    assert parse_levels("The global efficiency of the functional graph. It is higher than average.",
                        ["graph.global_efficiency"]) == {}

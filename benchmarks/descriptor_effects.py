"""Descriptor corpus on ABIDE CC200: held-out-site calibration and group effects.

Builds the descriptor corpus of every ABIDE run with the reference taken from half of the sites
(alternate sites in alphabetical order), then, on the z-scores of the *other* sites' runs:

1. calibration: per feature, the median and the robust SD (1.4826*MAD) of z; reported as the
   median over features of |median| and of the spread (a perfectly transferable reference gives
   0 and 1), next to the same numbers for the reference sites themselves, and per held-out site;
2. group effects: the 5 features that differ most between ASD and TD, and between sexes
   (Cohen's d with pooled SD; Welch t-test and Mann-Whitney p-values; Benjamini-Hochberg q over
   all features).

Usage::

    python benchmarks/descriptor_effects.py [--data DIR] [--atlas-dir DIR] [--out /tmp/fmrilm_descriptors]
                                            [--nprocs 2]

Outputs (corpus JSONL, reference JSON, summary JSON) go to ``--out`` (default under /tmp).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

HERE = Path(__file__).resolve().parents[1]
SHARED = HERE / ".." / "shared"


def robust_sd(x: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


def calibration(z: pd.DataFrame) -> dict:
    """Median over features of |per-feature median z| and of per-feature robust SD."""
    med, spread = [], []
    for col in z.columns:
        x = z[col].dropna().to_numpy(float)
        if x.size >= 5:
            med.append(abs(np.median(x)))
            spread.append(robust_sd(x))
    vals = z.to_numpy(float)
    vals = vals[np.isfinite(vals)]
    return {
        "n_runs": int(len(z)),
        "n_features": len(med),
        "median_abs_median_z": float(np.median(med)),
        "median_robust_sd_z": float(np.median(spread)),
        "p90_abs_median_z": float(np.percentile(med, 90)),
        "frac_abs_z_ge_2": float(np.mean(np.abs(vals) >= 2)),
    }


def cohen_d(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = len(a), len(b)
    sp = np.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2))
    return float((a.mean() - b.mean()) / sp) if sp > 0 else float("nan")


def bh(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, float)
    n = len(p)
    order = np.argsort(p)
    q = p[order] * n / np.arange(1, n + 1)
    q = np.minimum.accumulate(q[::-1])[::-1]
    out = np.empty(n)
    out[order] = np.minimum(q, 1)
    return out


def group_effects(z: pd.DataFrame, groups: pd.Series, a: str, b: str) -> pd.DataFrame:
    rows = []
    for col in z.columns:
        x = z[col]
        xa = x[(groups == a)].dropna().to_numpy(float)
        xb = x[(groups == b)].dropna().to_numpy(float)
        if len(xa) < 5 or len(xb) < 5:
            continue
        rows.append({
            "feature": col, f"n_{a}": len(xa), f"n_{b}": len(xb), "d": cohen_d(xa, xb),
            f"median_z_{a}": float(np.median(xa)), f"median_z_{b}": float(np.median(xb)),
            "p_welch": float(stats.ttest_ind(xa, xb, equal_var=False).pvalue),
            "p_mwu": float(stats.mannwhitneyu(xa, xb).pvalue),
        })
    df = pd.DataFrame(rows)
    df["q_welch_bh"] = bh(df["p_welch"].to_numpy())
    df["q_mwu_bh"] = bh(df["p_mwu"].to_numpy())
    return df.reindex(df["d"].abs().sort_values(ascending=False).index)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "abide-cc200")
    ap.add_argument("--atlas-dir", type=Path, default=SHARED / "atlases")
    ap.add_argument("--out", type=Path, default=Path("/tmp/fmrilm_descriptors"))
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.environ["BIDS_FMRILM_ATLAS_DIR"] = str(args.atlas_dir.resolve())

    from bids_fmrilm.descriptors import build_corpus_from_dir, read_corpus, read_phenotype

    pheno = pd.DataFrame(read_phenotype(args.data).values())
    sites = sorted(pheno["site"].dropna().unique())
    ref_sites, held_sites = sites[0::2], sites[1::2]
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = args.out / "abide_cc200_corpus.jsonl"
    t0 = time.time()
    res = build_corpus_from_dir(args.data, corpus, reference_sites=ref_sites,
                                save_reference_to=args.out / "reference_half_sites.json",
                                nprocs=args.nprocs, seed=args.seed, progress=True)
    elapsed = time.time() - t0
    lines = read_corpus(corpus)
    print(f"corpus: {corpus} ({len(lines)} runs; {res['written']} written, {res['skipped']} reused, "
          f"{len(res['failed'])} failed) in {elapsed:.0f} s with nprocs={args.nprocs}")
    print(f"reference sites ({res['reference']['n_runs']} runs): {', '.join(ref_sites)}")
    print(f"held-out sites: {', '.join(held_sites)}")

    z = pd.DataFrame([ln["z"] for ln in lines]).astype(float)
    meta = pd.DataFrame([ln["phenotype"] for ln in lines])
    held = meta["site"].isin(held_sites).to_numpy()
    cal_held, cal_ref = calibration(z[held]), calibration(z[~held])
    print("\n== z-score calibration (per feature: median and robust SD of z; median over features) ==")
    print(f"{'runs':<22}{'n':>5}{'feats':>7}{'med|median z|':>15}{'p90|median z|':>15}{'med robustSD':>14}{'P(|z|>=2)':>11}")
    for label, c in (("reference sites", cal_ref), ("held-out sites", cal_held)):
        print(f"{label:<22}{c['n_runs']:>5}{c['n_features']:>7}{c['median_abs_median_z']:>15.3f}"
              f"{c['p90_abs_median_z']:>15.3f}{c['median_robust_sd_z']:>14.3f}{c['frac_abs_z_ge_2']:>11.3f}")
    per_site = {}
    for s in held_sites:
        c = calibration(z[(meta["site"] == s).to_numpy()])
        per_site[s] = c
        print(f"  {s:<20}{c['n_runs']:>5}{c['n_features']:>7}{c['median_abs_median_z']:>15.3f}"
              f"{c['p90_abs_median_z']:>15.3f}{c['median_robust_sd_z']:>14.3f}{c['frac_abs_z_ge_2']:>11.3f}")

    zh, mh = z[held].reset_index(drop=True), meta[held].reset_index(drop=True)
    # Site-centred z (per-site median removed): guards against group/site confounding.
    zc = zh - zh.groupby(mh["site"]).transform("median")
    tables = {}
    pd.set_option("display.width", 200)
    for title, col, a, b in (("ASD vs TD", "diagnosis", "ASD", "TD"), ("male vs female", "sex", "M", "F")):
        counts = mh.groupby("site")[col].value_counts().unstack(fill_value=0)
        print(f"\n{col} by held-out site: " + "; ".join(
            f"{s} " + "/".join(f"{g}={counts.loc[s].get(g, 0)}" for g in (a, b)) for s in counts.index))
        for variant, zz in (("z", zh), ("site-centred z", zc)):
            df = group_effects(zz, mh[col], a, b)
            tables[f"{title} [{variant}]"] = df
            print(f"== top 5 features, {title} (held-out sites, {variant}; d = {a} - {b}) ==")
            cols = ["feature", f"n_{a}", f"n_{b}", "d", "p_welch", "p_mwu", "q_welch_bh"]
            print(df[cols].head(5).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
            print(f"features with q_welch_bh < 0.05: {(df['q_welch_bh'] < 0.05).sum()} of {len(df)}")
            tag = "raw" if variant == "z" else "sitecentred"
            df.to_csv(args.out / f"effects_{col}_{tag}.tsv", sep="\t", index=False)

    summary = {"elapsed_s": elapsed, "n_runs": len(lines), "ref_sites": ref_sites, "held_sites": held_sites,
               "calibration": {"reference": cal_ref, "held_out": cal_held, "per_held_site": per_site},
               "top_effects": {k: v.head(5).to_dict(orient="records") for k, v in tables.items()}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\noutputs in {args.out}")
    return summary


if __name__ == "__main__":
    main()

"""Group level: labels, participant/site-grouped folds, baselines and metrics with intervals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from bids_fmrilm.errors import DataError, UsageError
from bids_fmrilm.levels.crossval import (
    _binary_metrics,
    bootstrap_ci,
    chance_baseline,
    linear_baseline,
    make_folds,
    metrics,
    out_of_fold,
)
from bids_fmrilm.levels.labels import load_labels


def _table(tmp_path, rows, name="participants.tsv"):
    p = tmp_path / name
    pd.DataFrame(rows).to_csv(p, sep="\t", index=False, na_rep="n/a")
    return p


def test_labels_task_type_missing_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"participant_id": f"sub-{i:02d}", "dx": "ASD" if i % 2 else "TD", "age": round(10 + rng.random() * 30, 2),
             "site": "A" if i < 10 else "B", "one": "x", "txt": "young" if i % 3 else "old"} for i in range(20)]
    rows[3]["dx"] = None
    p = _table(tmp_path, rows)
    lab = load_labels(p, "dx", group_column="site")
    assert lab.task_type == "classification" and lab.classes == ["ASD", "TD"]
    assert lab.excluded == ["03"] and len(lab.values) == 19 and lab.groups.loc["12"] == "B"
    assert load_labels(p, "age").task_type == "regression"
    with pytest.raises(UsageError, match="'nope' is not in the table"):
        load_labels(p, "nope")
    with pytest.raises(DataError, match="one class"):
        load_labels(p, "one")
    with pytest.raises(DataError, match="non-numeric"):
        load_labels(p, "txt", task_type="regression")
    dup = _table(tmp_path, rows + [rows[0]], "dup.tsv")
    with pytest.raises(DataError, match="duplicate participant_id 00"):
        load_labels(dup, "dx")


def test_folds_never_leak_participants_or_sites(tmp_path):
    rows = [{"participant_id": f"sub-{i:03d}", "dx": "ASD" if i % 3 else "TD", "site": f"s{i % 6}"} for i in range(60)]
    lab = load_labels(_table(tmp_path, rows), "dx", group_column="site")
    pids = list(lab.values.index)
    folds = make_folds(lab, pids, n_folds=5, seed=1)
    assert len(folds.splits) == 5 and folds.grouping.startswith("site")
    seen = np.concatenate([test for _, test in folds.splits])
    assert sorted(seen) == list(range(60))  # every participant held out exactly once
    for train, test in folds.splits:
        sites_train = set(lab.groups.iloc[train])
        assert not sites_train & set(lab.groups.iloc[test])
    with pytest.raises(DataError, match="3 labelled participants for 5 folds"):
        make_folds(lab, pids[:3], n_folds=5)


def test_fast_binary_metrics_equal_sklearn():
    rng = np.random.default_rng(3)
    for _ in range(20):
        y = rng.random(40) < 0.4
        s = np.clip(y * 0.3 + rng.random(40) * 0.7, 0, 1)
        s[:5] = 0.5  # ties
        m = _binary_metrics(y, s - 1e-12)
        hard = s - 1e-12 > 0.5
        assert m["auroc"] == pytest.approx(roc_auc_score(y, s))
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, hard))
        assert m["f1"] == pytest.approx(f1_score(y, hard, zero_division=0))


def test_linear_baseline_beats_chance_on_separable_data(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    y = np.array(["A", "B"] * (n // 2))
    X = rng.standard_normal((n, 500))
    X[y == "B", :20] += 1.0
    rows = [{"participant_id": f"sub-{i:02d}", "g": y[i]} for i in range(n)]
    lab = load_labels(_table(tmp_path, rows), "g")
    pids = list(lab.values.index)
    folds = make_folds(lab, pids, 5, seed=0)
    yy = lab.values.to_numpy()
    pred = out_of_fold(lambda yt: linear_baseline("classification", yt), X, yy, folds, ["A", "B"])
    chance = chance_baseline(yy, folds, ["A", "B"])
    m, mc = metrics(yy, pred, ["A", "B"]), metrics(yy, chance, ["A", "B"])
    assert m["auroc"] > 0.9 and m["balanced_accuracy"] > 0.8
    assert mc["auroc"] <= 0.6
    ci = bootstrap_ci(yy, pred, ["A", "B"], n_boot=200)
    assert ci["auroc"][0] <= m["auroc"] <= ci["auroc"][1] and ci["auroc"][0] > 0.75
    # regression
    t = X[:, :5].sum(1) + rng.normal(0, 0.5, n)
    rows = [{"participant_id": f"sub-{i:02d}", "t": t[i]} for i in range(n)]
    lab = load_labels(_table(tmp_path, rows, "r.tsv"), "t")
    folds = make_folds(lab, list(lab.values.index), 5)
    pr = out_of_fold(lambda yt: linear_baseline("regression", yt), X, lab.values.to_numpy(), folds, None)
    mr = metrics(lab.values.to_numpy(), pr, None)
    assert mr["pearson_r"] > 0.5 and set(bootstrap_ci(lab.values.to_numpy(), pr, None, n_boot=100)) == {"mae", "pearson_r"}


def test_group_label_analysis_end_to_end(sim_dataset_12, tmp_path):
    from bids_fmrilm.cli import _run, bids_app_command

    ds = sim_dataset_12
    out = tmp_path / "out"
    assert _run(bids_app_command, [str(ds), str(out), "participant", "--nprocs", "2"], "bids_fmrilm") == 0
    code = _run(bids_app_command, [str(ds), str(out), "group", "--label", "diagnosis", "--cv-group", "site",
                                   "--folds", "2"], "bids_fmrilm")
    assert code == 0
    pred = pd.read_csv(out / "group" / "label-diagnosis_predictions.tsv", sep="\t")
    assert len(pred) == 12 and set(pred["fold"]) == {0, 1}
    assert {"fc_linear_p_ASD", "fc_linear_p_TD", "chance_prediction"} <= set(pred.columns)
    np.testing.assert_allclose(pred["fc_linear_p_ASD"] + pred["fc_linear_p_TD"], 1.0)
    met = pd.read_csv(out / "group" / "label-diagnosis_metrics.tsv", sep="\t")
    assert set(met["method"]) == {"chance", "fc_linear"}
    assert (met["ci_low"] <= met["value"] + 1e-9).all() and (met["value"] <= met["ci_high"] + 1e-9).all()
    # too many folds for the participants
    code = _run(bids_app_command, [str(ds), str(out), "group", "--label", "diagnosis", "--folds", "20"], "bids_fmrilm")
    assert code == 65


@pytest.fixture(scope="module")
def sim_dataset_12(tmp_path_factory):
    from bids_fmrilm.simulate import make_fmriprep_dataset

    return make_fmriprep_dataset(tmp_path_factory.mktemp("sim12") / "ds", n_subjects=12, n_volumes=40, voxel_mm=8.0)


def test_tiny_training_folds_use_a_fixed_penalty(tmp_path):
    """With 2 participants per class in a training fold, inner CV is impossible: C=1 is used."""
    rng = np.random.default_rng(1)
    rows = [{"participant_id": f"sub-{i:02d}", "dx": "ASD" if i % 2 else "TD"} for i in range(6)]
    lab = load_labels(_table(tmp_path, rows), "dx")
    folds = make_folds(lab, list(lab.values.index), 3)
    pred = out_of_fold(lambda yt: linear_baseline("classification", yt), rng.standard_normal((6, 30)),
                       lab.values.to_numpy(), folds, lab.classes)
    assert pred.shape == (6, 2) and np.isfinite(pred).all()
    np.testing.assert_allclose(pred.sum(1), 1.0)


def test_within_fold_auroc_ignores_fold_offsets():
    """A constant-per-fold predictor scores 0.5 within folds whatever its pooled AUROC; per-fold
    offsets added to a good ranking leave the within-fold AUROC unchanged."""
    from bids_fmrilm.levels.crossval import Folds, within_fold_auroc

    rng = np.random.default_rng(0)
    y = np.array(["A", "B"] * 30)
    folds = Folds([(np.setdiff1d(np.arange(60), t), t) for t in np.array_split(rng.permutation(60), 3)], "participant")
    prior = np.zeros((60, 2))
    for k, (_, t) in enumerate(folds.splits):
        prior[t] = [0.2 + 0.3 * k, 0.8 - 0.3 * k]
    value, ci = within_fold_auroc(y, prior, ["A", "B"], folds, n_boot=200)
    assert value == 0.5 and ci == [0.5, 0.5]
    score = (y == "B") + rng.normal(0, 0.8, 60)
    base = np.stack([1 - score, score], 1)
    shifted = base.copy()
    for k, (_, t) in enumerate(folds.splits):
        shifted[t, 1] += 3.0 * k
    a = within_fold_auroc(y, base, ["A", "B"], folds, n_boot=50)[0]
    assert a > 0.7 and within_fold_auroc(y, shifted, ["A", "B"], folds, n_boot=50)[0] == a
    assert metrics(y, shifted, ["A", "B"])["auroc"] != a  # pooled AUROC moves with the offsets
    assert np.isnan(within_fold_auroc(y, base, None, folds)[0])

"""Answer calibration of zero-shot answers (model/calibration.py)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

import pytest

from bids_fmrilm.model.calibration import apply_calibration, evidence_matrix, fit_calibration, task_evidence
from bids_fmrilm.model.tasks import AGE_GROUP, DIAGNOSIS, SEX, descriptor_task, label_task


def _biased(n=600, prior=(0.0, 2.5, 0.0), signal=1.5, seed=0):
    """Three-answer probabilities whose ranking is informative but whose prior favours answer 1
    (a language model that says 'typical' too often), true answers balanced."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = signal * np.eye(3)[y] + rng.normal(0, 1, (n, 3)) + np.asarray(prior)
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True), y


def test_calibration_moves_thresholds_and_improves_balanced_accuracy_on_new_runs():
    p_fit, y_fit = _biased(seed=0)
    p_new, y_new = _biased(seed=1)
    cal = fit_calibration(p_fit, y_fit, ["lower", "typical", "higher"])
    assert cal["answers"] == ["lower", "typical", "higher"] and cal["n"] == 600
    assert cal["bias"][0] == 0.0 and cal["bias"][1] < -1.5  # the 'typical' prior is taken back
    before = balanced_accuracy_score(y_new, p_new.argmax(1))
    after = balanced_accuracy_score(y_new, apply_calibration(p_new, cal).argmax(1))
    assert before < 0.50 and after > before + 0.15
    q = apply_calibration(p_new, cal)
    assert np.allclose(q.sum(1), 1.0) and (q >= 0).all()


def test_calibration_of_a_calibrated_model_is_near_identity_and_keeps_binary_auroc():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 1.5, (2000, 3))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in p])  # answers drawn from the probabilities: calibrated
    cal = fit_calibration(p, y)
    assert abs(cal["scale"] - 1.0) < 0.25 and max(abs(b) for b in cal["bias"]) < 0.25
    # two answers: calibration is monotone in p(positive), so the AUROC cannot change
    rng = np.random.default_rng(3)
    y2 = rng.integers(0, 2, 300)
    s = 0.8 * y2 + rng.normal(0, 1, 300) - 2.0
    p2 = np.stack([1 / (1 + np.exp(s)), 1 / (1 + np.exp(-s))], 1)
    cal2 = fit_calibration(p2, y2)
    q2 = apply_calibration(p2, cal2)
    assert roc_auc_score(y2, q2[:, 1]) == roc_auc_score(y2, p2[:, 1])
    assert balanced_accuracy_score(y2, q2.argmax(1)) > balanced_accuracy_score(y2, p2.argmax(1))


def test_calibration_applies_only_to_its_own_answers():
    p, y = _biased(seed=4)
    cal = fit_calibration(p, y, ["lower", "typical", "higher"])
    assert np.array_equal(apply_calibration(p, None), p)
    assert np.array_equal(apply_calibration(p, cal, ["higher", "typical", "lower"]), p)  # another order
    assert np.array_equal(apply_calibration(p[:, :2] / p[:, :2].sum(1, keepdims=True), cal),
                          p[:, :2] / p[:, :2].sum(1, keepdims=True))  # another number of answers
    assert not np.allclose(apply_calibration(p, cal, ["lower", "typical", "higher"]), p)


NAMES = ["pc1", "pc2", "sex:M", "age_group:value", "diagnosis:TD", "z:fc_within.mean"]


def test_task_evidence_maps_readout_scores_to_answers():
    assert task_evidence(DIAGNOSIS, NAMES) == {"columns": ["diagnosis:TD"], "design": [[0.0, 1.0]]}  # TD -> control
    assert task_evidence(SEX, NAMES) == {"columns": ["sex:M"], "design": [[0.0, 1.0]]}
    assert task_evidence(AGE_GROUP, NAMES) == {"columns": ["age_group:value"], "design": [[-1.0, 0.0, 1.0]]}
    assert task_evidence(descriptor_task("fc_within.mean"), NAMES) == {"columns": ["z:fc_within.mean"],
                                                                       "design": [[-1.0, 0.0, 1.0]]}
    # nothing to read: a descriptor the readout has no score for, a user's own label
    assert task_evidence(descriptor_task("graph.modularity"), NAMES) is None
    assert task_evidence(label_task("handedness", ["L", "R"]), NAMES) is None
    # three classes, one indicator each
    three = ["site:A", "site:B", "site:C"]
    from bids_fmrilm.model.tasks import Task

    t = Task("site", "Which site?", ("a", "b", "c"), "phenotype:site", {"a": "a", "b": "b", "c": "c"})
    ev = task_evidence(t, three)
    assert ev["columns"] == three and np.array_equal(np.asarray(ev["design"]), np.eye(3))
    R = np.array([[1.0, 2.0, 3.0]])
    assert np.array_equal(evidence_matrix(ev, R, three), R)


def _two_sources(n, seed):
    """An LLM answer and a readout score, each weakly and independently informative."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    llm = 0.6 * y + rng.normal(0, 1, n) - 1.0
    readouts = rng.normal(0, 1, (n, len(NAMES)))
    readouts[:, NAMES.index("diagnosis:TD")] = 0.6 * y + rng.normal(0, 1, n)
    return y, np.stack([1 / (1 + np.exp(llm)), 1 / (1 + np.exp(-llm))], 1), readouts


def test_readout_evidence_fuses_two_sources_better_than_either_on_new_runs():
    spec = task_evidence(DIAGNOSIS, NAMES)
    y, p, R = _two_sources(2000, 0)
    cal = fit_calibration(p, y, DIAGNOSIS.answers, evidence=evidence_matrix(spec, R, NAMES), evidence_spec=spec)
    assert cal["evidence"] == spec and cal["weight"] > 0.3 and cal["scale"] > 0.3
    y2, p2, R2 = _two_sources(2000, 1)
    fused = apply_calibration(p2, cal, DIAGNOSIS.answers, R2, NAMES)[:, 1]
    a_llm, a_ro, a_fused = (roc_auc_score(y2, s) for s in (p2[:, 1], R2[:, NAMES.index("diagnosis:TD")], fused))
    assert a_fused > max(a_llm, a_ro) + 0.03
    # the evidence is read by name: another readout value order gives the same answers
    order = np.random.default_rng(5).permutation(len(NAMES))
    again = apply_calibration(p2, cal, DIAGNOSIS.answers, R2[:, order], [NAMES[i] for i in order])
    assert np.allclose(again[:, 1], fused)
    with pytest.raises(ValueError, match="diagnosis:TD"):
        apply_calibration(p2, cal, DIAGNOSIS.answers)  # the readouts are needed


def test_uninformative_evidence_gets_no_weight():
    spec = task_evidence(DIAGNOSIS, NAMES)
    y, p, R = _two_sources(3000, 2)
    R[:, NAMES.index("diagnosis:TD")] = np.random.default_rng(3).normal(0, 1, len(y))  # noise
    cal = fit_calibration(p, y, DIAGNOSIS.answers, evidence=evidence_matrix(spec, R, NAMES), evidence_spec=spec)
    assert abs(cal["weight"]) < 0.1


def _site(n, seed, llm=-0.8, readout=1.5):
    """Two-answer runs of a new site: the LLM's answer is anti-informative there, the readout's
    evidence informative (what the sex task does on ABIDE's held-out sites)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = llm * (2 * y - 1) + rng.normal(0, 1, n)
    p = np.stack([1 / (1 + np.exp(s)), 1 / (1 + np.exp(-s))], 1)
    e = readout * (2 * y - 1) + rng.normal(0, 1, n)
    return p, np.stack([-e / 2, e / 2], 1), y


def test_refit_calibration_learns_new_weights_from_a_few_participants_and_keeps_a_good_prior():
    from bids_fmrilm.model.calibration import apply_calibration_matrix, balanced_log_loss, refit_calibration

    spec = {"columns": ["sex:F", "sex:M"], "design": [[1.0, 0.0], [0.0, 1.0]]}
    prior = {"scale": 1.0, "bias": [0.0, 0.0], "weight": 0.3, "evidence": spec, "answers": ["female", "male"]}
    p, e, y = _site(32, seed=0)
    groups = [f"p{i // 2}" for i in range(len(y))]  # two runs per participant
    new, report = refit_calibration(p, y, groups, prior, e, seed=0)
    assert report["chosen"] != "checkpoint" and report["folds"] == 5
    assert report["cv_loss"][report["chosen"]] < report["cv_loss"]["checkpoint"]
    assert new["weight"] > prior["weight"] and new["scale"] < prior["scale"] and new["refit"] > 0
    assert new["evidence"] == spec and new["answers"] == ["female", "male"]
    p2, e2, y2 = _site(2000, seed=1)
    assert roc_auc_score(y2, apply_calibration_matrix(p2, new, e2)[:, 1]) \
        > roc_auc_score(y2, apply_calibration_matrix(p2, prior, e2)[:, 1]) + 0.1
    # apply_calibration_matrix is apply_calibration with the evidence given directly
    readouts = np.stack([-e2[:, 1], e2[:, 1]], 1)
    assert np.allclose(apply_calibration_matrix(p2, new, evidence_matrix(spec, readouts, ["sex:F", "sex:M"])),
                       apply_calibration(p2, new, readouts=readouts, readout_names=["sex:F", "sex:M"]))
    # a calibration that fits the new site already is kept (or barely moved)
    good = {**prior, "scale": 0.05, "weight": 1.5}
    kept, rep = refit_calibration(p, y, groups, good, e, seed=0)
    p3 = apply_calibration_matrix(p2, kept, e2)
    assert balanced_log_loss(p3, y2) < balanced_log_loss(apply_calibration_matrix(p2, good, e2), y2) + 0.02
    # one participant of a class: nothing to cross-validate, the checkpoint's calibration stays
    one, rep1 = refit_calibration(p[:3], np.array([0, 0, 1]), ["a", "a", "b"], prior, e[:3])
    assert rep1 == {"cv_loss": {}, "chosen": "checkpoint", "folds": 0} and one["refit"] is None
    assert {k: v for k, v in one.items() if k != "refit"} == prior


def test_fit_calibration_with_a_strong_prior_stays_at_the_prior():
    p, e, y = _site(200, seed=3)
    prior = {"scale": 0.7, "bias": [0.0, 0.4], "weight": 0.9}
    cal = fit_calibration(p, y, ridge=1e4, evidence=e, prior=prior)
    assert abs(cal["scale"] - 0.7) < 0.01 and abs(cal["bias"][1] - 0.4) < 0.01 and abs(cal["weight"] - 0.9) < 0.01
    free = fit_calibration(p, y, ridge=1e-4, evidence=e, prior=prior)
    assert free["weight"] > 1.0  # the data pull the weight up from the prior's 0.9


def test_fit_probe_is_a_linear_map_of_the_raw_readout_values():
    from sklearn.linear_model import LogisticRegression

    from bids_fmrilm.model.calibration import fit_probe, probe_evidence

    rng = np.random.default_rng(0)
    R = rng.normal(3.0, [1.0, 5.0, 0.2, 2.0], (60, 4))
    y = (R[:, 1] / 5 + rng.normal(0, 0.5, 60) > 0.6).astype(int)
    spec, const = fit_probe(R, y, 3, ["a", "b", "c", "d"], C=1.0)
    assert spec["columns"] == ["a", "b", "c", "d"] and np.shape(spec["design"]) == (4, 3)
    ev = probe_evidence(spec, const, R)
    assert np.allclose(ev[:, [0, 2]], 0.0)  # one decision function: the second class's log-odds; answer 2 has no runs
    z = (R - R.mean(0)) / R.std(0)
    ref = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000).fit(z, y).decision_function(z)
    np.testing.assert_allclose(ev[:, 1], ref, atol=1e-4)
    assert np.allclose(evidence_matrix(spec, R, spec["columns"]) + const, ev)


def test_refit_calibration_takes_a_readout_probe_only_when_it_clearly_beats_the_checkpoint():
    """The checkpoint's evidence (column 0) carries nothing at the user's site, another readout
    value (column 3) carries the label: the probe is chosen, stored as a calibration that
    ``apply_calibration`` applies to readouts, and ranks new runs of that site far better. When
    no readout value carries the label, the probe is not chosen."""
    from bids_fmrilm.model.calibration import apply_calibration, refit_calibration

    names = ["score:pos", "pc1", "pc2", "pc3", "pc4"]
    spec = {"columns": ["score:pos"], "design": [[0.0, 1.0]]}
    prior = {"scale": 1.0, "bias": [0.0, 0.0], "weight": 1.0, "evidence": spec, "answers": ["no", "yes"]}

    def site(n, seed, signal):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 2, n)
        R = rng.normal(0, 1, (n, len(names)))
        R[:, 3] += signal * (2 * y - 1)
        s = rng.normal(0, 1, n)  # the LLM's answer: noise
        return np.stack([1 / (1 + np.exp(s)), 1 / (1 + np.exp(-s))], 1), R, y

    p, R, y = site(40, 0, 1.5)
    groups = [f"p{i}" for i in range(len(y))]
    ev = evidence_matrix(spec, R, names)
    new, report = refit_calibration(p, y, groups, prior, ev, seed=0, readouts=R, readout_names=names)
    assert report["chosen"].startswith("probe:") and new["refit"] == report["chosen"]
    assert {"checkpoint", "1.0", "0.1", "0.01", "probe:0.01", "probe:0.1"} == set(report["cv_loss"])
    mean, se = report["probe_margin"][report["chosen"]]
    assert mean + se < 0
    assert new["evidence"]["columns"] == names and new["weight"] > 0
    p2, R2, y2 = site(1000, 1, 1.5)
    q = apply_calibration(p2, new, ["no", "yes"], R2, names)
    assert roc_auc_score(y2, q[:, 1]) > 0.85
    assert roc_auc_score(y2, apply_calibration(p2, prior, ["no", "yes"], R2, names)[:, 1]) < 0.6
    # the stored biases carry the probe's constant: the balanced accuracy at 0.5 is that of the probe
    assert balanced_accuracy_score(y2, q[:, 1] > 0.5) > 0.75
    # nothing in the readout: the probe does not replace the checkpoint's candidates
    p3, R3, y3 = site(40, 2, 0.0)
    kept, rep3 = refit_calibration(p3, y3, groups, prior, evidence_matrix(spec, R3, names), seed=0,
                                   readouts=R3, readout_names=names)
    assert not rep3["chosen"].startswith("probe:") and not str(kept["refit"]).startswith("probe:")

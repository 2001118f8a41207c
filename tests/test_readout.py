"""The run readout (model/readout.py) and attention branches (several questions, one fMRI pass)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bids_fmrilm.model.readout import (BANDS_HZ, SIGNAL_STATS, Readout, Target, _affine, default_targets, fit_readout,
                                      modularity_shares, run_vector, signal_statistics,
                                      to_reference)
from bids_fmrilm.model.tasks import DIAGNOSIS, SEX, default_tasks


def test_affine_map_equals_the_fitted_pipelines():
    """The readout stores each sklearn pipeline as one matrix: it must give the pipeline's outputs."""
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from bids_fmrilm.levels.crossval import linear_baseline

    rng = np.random.default_rng(0)
    X = rng.standard_normal((80, 30)) * rng.uniform(0.1, 5, 30) + rng.uniform(-3, 3, 30)
    y = (X[:, 0] / 5 + rng.standard_normal(80) > 0).astype(int)
    clf = linear_baseline("classification", y).fit(X, y)
    W, b = _affine(clf, 30)
    np.testing.assert_allclose(X @ W[:, 0] + b[0], clf.decision_function(X), rtol=1e-6, atol=1e-8)
    pca = make_pipeline(StandardScaler(), PCA(5, whiten=True)).fit(X)
    W, b = _affine(pca, 30)
    np.testing.assert_allclose(X @ W + b, pca.transform(X), rtol=1e-6, atol=1e-8)


def test_run_vector_and_resampling_onto_reference_centroids():
    feats = np.stack([np.full((3, 2), 1.0), np.full((3, 2), 4.0)]).astype(np.float32)  # 2 windows, 3 ROIs
    v = run_vector(feats, np.array([160, 40]), np.array([0.5, -np.inf, 1.5]))
    assert v.shape == (3, 3 + SIGNAL_STATS) and not v[:, 3:].any()  # no series: no signal statistics
    np.testing.assert_allclose(v[:, 0], 1.0 * 0.8 + 4.0 * 0.2)  # windows weighted by their volumes
    np.testing.assert_allclose(v[:, 2], [0.5, 1.0, 1.5])  # a zero-variance ROI gets the run's median
    ref = np.array([[0, 0, 0], [40, 0, 0], [0, 40, 0]], float)
    vals = np.arange(9, dtype=np.float32).reshape(3, 3)
    assert to_reference(vals, ref, ref) is vals  # the training atlas: used as is
    # another atlas: its regions near each reference centroid dominate; unknown centroids are skipped
    other = np.array([[1, 0, 0], [0, 39, 1], [np.nan, np.nan, np.nan], [41, 1, 0]], float)
    got = to_reference(np.array([[1, 1, 1], [3, 3, 3], [100, 100, 100], [2, 2, 2]], np.float32), other, ref)
    np.testing.assert_allclose(got[:, 0], [1, 2, 3], atol=1e-3)


def test_signal_statistics_measure_spectrum_autocorrelation_and_connectivity():
    rng = np.random.default_rng(0)
    t = np.arange(200) * 2.0
    slow = np.sin(2 * np.pi * 0.05 * t)  # inside the 0.027-0.073 Hz band
    x = np.stack([slow + 0.1 * rng.standard_normal(200), slow + 0.1 * rng.standard_normal(200),
                  rng.standard_normal(200), np.zeros(200)], axis=1)
    st = signal_statistics(x, 2.0)
    nb = len(BANDS_HZ) - 1
    assert st.shape == (4, SIGNAL_STATS) and not st[3].any()  # a zero-variance region: zeros
    assert np.argmax(st[0, :nb]) == 2 and np.argmax(st[1, :nb]) == 2
    assert st[0, nb] > 0.7 and abs(st[2, nb]) < 0.2  # lag-1 autocorrelation: slow vs white
    strength, spread = st[:3, nb + 1], st[:3, nb + 2]
    assert strength[0] > 0.5 > abs(strength[2]) and spread[0] > spread[2]
    # degree in the strongest 15 % of edges: 10 regions, 45 edges, 7 kept, the coupled pair's first
    y = np.concatenate([x[:, :2], rng.standard_normal((200, 8))], axis=1)
    deg = signal_statistics(y, 2.0)[:, nb + 3]
    assert deg[0] >= 1 / 9 and deg[1] >= 1 / 9
    assert deg.sum() * 9 == pytest.approx(2 * 7) or deg.sum() * 9 < 2 * 7  # only positive edges are kept
    # nodal efficiency and clustering agree with networkx on the same graph
    import networkx as nx

    full = signal_statistics(y, 2.0)
    z = np.arctanh(np.clip(np.corrcoef(y.T), -0.999, 0.999))
    iu = np.triu_indices(10, 1)
    order = np.argsort(-z[iu], kind="stable")[:7]
    order = order[z[iu][order] > 0]
    g = nx.Graph()
    g.add_nodes_from(range(10))
    g.add_edges_from(zip(iu[0][order], iu[1][order]))
    np.testing.assert_allclose(full[:, nb + 4].mean(), nx.global_efficiency(g), atol=1e-6)
    np.testing.assert_allclose(full[:, nb + 5], [nx.clustering(g, i) for i in range(10)], atol=1e-6)
    v = run_vector(np.zeros((1, 4, 2), np.float32), None, np.zeros(4), x, 2.0)
    np.testing.assert_array_equal(v[:, 3:], st)


def test_modularity_shares_sum_to_the_descriptors_modularity():
    from bids_fmrilm.descriptors.features import _graph_features

    rng = np.random.default_rng(3)
    T, R = 240, 30
    communities = np.repeat(np.arange(3), 10)
    latent = rng.standard_normal((T, 3))
    for weak in (0.6, 1.5):  # clear and blurred communities: different modularities, both matched
        y = latent[:, communities] + weak * rng.standard_normal((T, R))
        shares = signal_statistics(y, 2.0)[:, -1]
        want = _graph_features(np.corrcoef(y.T))["graph.modularity"]
        assert want > 0.05
        np.testing.assert_allclose(shares.sum(), want, atol=1e-6)
        # a community's members add to it (a region left without edges in the sparse graph adds 0)
        assert (shares[communities == 0] >= 0).all() and shares[communities == 0].sum() > 0.05
    assert not modularity_shares(np.zeros((4, 4))).any()  # no edges: no modularity


def test_an_older_readout_reads_the_leading_features_of_a_longer_run_vector():
    R, names = 3, ["a", "b"]
    ro = Readout(np.zeros((R, 3)), 4, names)
    ro.weight.copy_(torch.arange(R * 4 * 2, dtype=torch.float32).reshape(R * 4, 2))
    vec = np.random.default_rng(0).standard_normal((R, 4)).astype(np.float32)
    longer = np.concatenate([vec, np.full((R, 2), 99.0, np.float32)], axis=1)
    np.testing.assert_allclose(ro.vector(longer, np.zeros((R, 3))), ro.vector(vec, np.zeros((R, 3))))


def _synthetic(n_sites=4, per_site=40, R=10, c=3, seed=0):
    rng = np.random.default_rng(seed)
    vecs, sites, pheno, z = [], [], [], []
    for s in range(n_sites):
        for _ in range(per_site):
            v = rng.standard_normal((R, c + 1)).astype(np.float32)
            v[:, 0] += s * 0.5  # a site offset everywhere
            dx = v[0, 1] + v[1, 1] + 0.5 * rng.standard_normal() > 0
            vecs.append(v)
            sites.append(f"S{s}")
            pheno.append({"diagnosis": "TD" if dx else "ASD", "sex": rng.choice(["M", "F"]), "age": 10 + 20 * rng.random()})
            z.append({"fc_within.mean": float(v[2, 2] * 2), "falff.mean": float(rng.standard_normal())})
    return vecs, sites, pheno, z


def test_readout_scores_generalise_across_sites_and_training_runs_are_cross_fitted():
    vecs, sites, pheno, z = _synthetic()
    tasks = default_tasks(("fc_within.mean",))
    targets = default_targets(tasks, z, pheno)
    names = [t.name for t in targets]
    assert names[:3] == ["sex:M", "age_group:value", "diagnosis:TD"] and "z:fc_within.mean" in names
    coords = np.random.default_rng(1).uniform(-60, 60, (10, 3))
    fit = fit_readout(vecs, coords, sites, pheno, z, targets, n_components=4, log=lambda m: None)
    ro = fit.readout
    assert ro.dim == 4 + len(targets) and fit.crossfit.shape == (len(vecs), ro.dim)
    np.testing.assert_allclose(fit.crossfit.mean(0), 0, atol=1e-5)  # standardised over training runs
    info = ro.info["crossfit"]
    assert info["diagnosis:TD"]["auroc"] > 0.75  # a real signal survives leaving each site out
    assert info["z:fc_within.mean"]["r2"] > 0.8 and info["z:falff.mean"]["r2"] < 0.2  # noise stays noise
    assert 0.3 < info["sex:M"]["auroc"] < 0.7
    # the full-fit readout of a training run differs from its cross-fitted one (which never saw it)
    full = np.stack([ro.vector(v, coords) for v in vecs])
    j = ro.names.index("diagnosis:TD")
    assert not np.allclose(full[:, j], fit.crossfit[:, j])
    assert np.corrcoef(full[:, j], fit.crossfit[:, j])[0, 1] > 0.5


def test_readout_saves_and_loads(tmp_path):
    vecs, sites, pheno, z = _synthetic(n_sites=2, per_site=20)
    coords = np.random.default_rng(1).uniform(-60, 60, (10, 3))
    ro = fit_readout(vecs, coords, sites, pheno, z, [Target("diagnosis:TD", "class", "phenotype:diagnosis", "TD")],
                     n_components=3, log=lambda m: None).readout
    ro.save(tmp_path)
    back = Readout.load(tmp_path)
    assert back.names == ro.names and back.info == ro.info
    np.testing.assert_array_equal(back.vector(vecs[0], coords), ro.vector(vecs[0], coords))
    with pytest.raises(ValueError, match="features per region"):
        ro.vector(vecs[0][:, :2], coords)


def test_targets_of_binary_and_binned_tasks():
    pheno = [{"diagnosis": "ASD", "sex": "F", "age": 9}, {"diagnosis": "TD", "sex": "M", "age": ""}]
    t = {x.name: x for x in default_targets([SEX, DIAGNOSIS], [{}, {}], pheno)}
    assert set(t) == {"sex:M", "diagnosis:TD"}
    np.testing.assert_array_equal(t["diagnosis:TD"].values(pheno, [{}, {}]), [0, 1])
    age = Target("age_group:value", "value", "phenotype:age")
    v = age.values(pheno, [{}, {}])
    assert v[0] == 9 and np.isnan(v[1])


def _tiny_fm():
    """A 2-layer Llama with a word-level vocabulary, a tiny fMRI-LM with a readout, and 3 blocks."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from bids_fmrilm.model.config import get_config
    from bids_fmrilm.model.fmrilm import FMRILM, fmri_block

    words = "question what is the participant's sex options female male answer does have an autism spectrum " \
            "diagnosis or are they a typical control ? , : .".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(sorted(set(words)))}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()
    cfg = get_config("tiny")
    ro = Readout(np.zeros((5, 3)), 2, ["a", "b", "c"])
    fm = FMRILM(llm, tok, torch.randn(8, 4), roi_dim=6, run_dim=5, cfg=cfg, readout=ro).eval()
    rng = np.random.default_rng(0)
    blocks = [fmri_block(rng.integers(0, 8, (2, 5)), torch.randn(5, 6), rng.standard_normal(5), 3,
                         feats=rng.standard_normal((2, 5, 4)), readout=rng.standard_normal(3)) for _ in range(3)]
    return fm, blocks


def test_branches_score_each_question_as_if_asked_alone(tmp_path):
    """Questions in branches after one fMRI block get the log-probabilities they get alone."""
    from bids_fmrilm.model.fmrilm import fmri_block
    from bids_fmrilm.model.inference import score_options, score_tasks
    from bids_fmrilm.model.tasks import TEXT, instruction_segments, multi_instruction_segments

    fm, blocks = _tiny_fm()
    with torch.no_grad():
        alone = []
        for task, ans in ((SEX, "male"), (DIAGNOSIS, "control")):
            b = fm.build([instruction_segments(task, 0, ans)], blocks)
            alone.append(fm.text_logprobs(fm.hidden(b), b["targets"]).numpy())
        b = fm.build([multi_instruction_segments(0, [(SEX, "male"), (DIAGNOSIS, "control")]),
                      instruction_segments(SEX, 1, "female")], blocks)  # padded beside a plain example
        lp = fm.text_logprobs(fm.hidden(b), b["targets"]).numpy()
        rows = np.array([t[0] for t in b["targets"]])
    np.testing.assert_allclose(lp[rows == 0], np.concatenate(alone), atol=1e-5)
    # all tasks' answers of a run in one pass = one sequence per (run, answer)
    both = score_tasks(fm, blocks, [SEX, DIAGNOSIS])
    for task, p in zip((SEX, DIAGNOSIS), both):
        ref = np.zeros((3, 2))
        with torch.no_grad():
            for i in range(3):
                for a, ans in enumerate(task.answers):
                    b = fm.build([instruction_segments(task, i) + [(TEXT, " " + ans, True)]], blocks)
                    ref[i, a] = fm.text_logprobs(fm.hidden(b), b["targets"]).sum()
        ref = np.exp(ref - ref.max(1, keepdims=True))
        np.testing.assert_allclose(p, ref / ref.sum(1, keepdims=True), atol=1e-5)
        np.testing.assert_allclose(score_options(fm, blocks, task), p, atol=1e-6)
    # the readout position is read: another readout changes the answers
    blocks2 = [fmri_block(b.ids.numpy(), b.roi, b.run_emb.numpy(), 3, feats=b.feats.numpy(), readout=-3 * b.readout.numpy())
               for b in blocks]
    assert not np.allclose(score_options(fm, blocks2, SEX), both[0], atol=1e-4)


def test_readout_adapter_starts_neutral_learns_and_conditions_only_what_follows_a_block():
    from bids_fmrilm.model.inference import generate_descriptions
    from bids_fmrilm.model.tasks import few_shot_segments, instruction_segments

    fm, blocks = _tiny_fm()
    segs = [instruction_segments(SEX, 0, "male")]
    with torch.no_grad():
        built = fm.build(segs, blocks)
        h0 = fm.hidden(built)
        text0 = generate_descriptions(fm, blocks[:1], max_new_tokens=4)
    fm.add_readout_adapter(1)
    assert len(fm.projector.adapter) == 1
    with torch.no_grad():
        assert torch.equal(fm.hidden(fm.build(segs, blocks)), h0)  # zero start: the model as it was
    fm.train()
    fm(segs, blocks, ["instruct"], {"instruct": 1.0}, 0.0)["loss"].backward()
    grad = fm.projector.adapter[0].weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0  # the answer loss reaches the adapter
    fm.eval()
    with torch.no_grad():
        torch.nn.init.normal_(fm.projector.adapter[0].weight, std=0.5)
        end = built["spans"][0][2] + 1  # first position after </fmri>
        h1 = fm.hidden(built)
        torch.testing.assert_close(h1[0, :end], h0[0, :end])  # the block and what precedes it: untouched
        assert not torch.allclose(h1[0, end:], h0[0, end:], atol=1e-4)  # the question and answer: conditioned
        assert (built["readout_src"][0, :end] == -1).all() and (built["readout_src"][0, end:] == 0).all()
        # a prompt with several blocks: the text after each block reads that block's readout
        fs = fm.build([few_shot_segments(SEX, [(1, "male")], 2)], blocks)
        src = fs["readout_src"][0]
        firsts = [int((src == k).nonzero()[0]) for k in range(2)]
        assert firsts[0] < firsts[1] and (src[firsts[1]:] == 1).all()
        torch.testing.assert_close(fs["readouts"], torch.stack([blocks[1].readout, blocks[2].readout]))
        assert fm._conditioning is None  # the context is left cleanly
        # generation is conditioned at every decoding step: an adapter that pushes the last layer
        # toward the output row of "male" makes every greedy token "male"
        male = fm.text_tokenizer.convert_tokens_to_ids("male")
        fm.projector.adapter[0].weight.zero_()
        fm.projector.adapter[0].bias.copy_(1e3 * fm.llm.lm_head.weight[male])
        assert generate_descriptions(fm, blocks[:1], max_new_tokens=4) == ["male male male male"] != text0


def test_each_score_reads_every_feature_or_the_signal_statistics_whichever_generalises_across_sites():
    """A descriptor made of the signal statistics is fitted on them alone (the encoder's many
    noise columns left out); a label carried by the encoder features keeps every feature. An
    earlier readout's principal components can be kept while the scores are refitted on more
    features (the LLM learned to read those components)."""
    rng = np.random.default_rng(0)
    R, c, n_sites, per_site = 12, 40, 4, 50
    F = c + 1 + SIGNAL_STATS
    vecs, sites, pheno, z = [], [], [], []
    for s in range(n_sites):
        for _ in range(per_site):
            v = rng.standard_normal((R, F)).astype(np.float32)
            vecs.append(v)
            sites.append(f"S{s}")
            pheno.append({"diagnosis": "TD" if v[0, 0] + v[1, 0] + 0.3 * rng.standard_normal() > 0 else "ASD"})
            z.append({"graph.modularity": float(v[:, -1].sum() / np.sqrt(R) + 0.1 * rng.standard_normal())})
    targets = [Target("diagnosis:TD", "class", "phenotype:diagnosis", "TD"),
               Target("z:graph.modularity", "value", "descriptor:graph.modularity")]
    coords = rng.uniform(-60, 60, (R, 3))
    fit = fit_readout(vecs, coords, sites, pheno, z, targets, n_components=3, log=lambda m: None)
    ro = fit.readout
    assert ro.info["features"] == {"diagnosis:TD": "all", "z:graph.modularity": "signal"}
    W = ro.weight.numpy().reshape(R, F, -1)
    assert not W[:, : c, 3 + 1].any() and W[:, -1, 3 + 1].min() > 0  # modularity: no encoder weight
    assert np.abs(W[:, 0, 3]).max() > 0  # diagnosis reads the encoder's first feature
    assert ro.info["crossfit"]["z:graph.modularity"]["r2"] > 0.8
    off = fit_readout(vecs, coords, sites, pheno, z, targets, n_components=3, log=lambda m: None,
                      select_features=False)
    assert set(off.readout.info["features"].values()) == {"all"}
    assert off.readout.info["crossfit"]["z:graph.modularity"]["r2"] < ro.info["crossfit"]["z:graph.modularity"]["r2"]
    # scores refitted on one more feature per region, the components kept
    longer = [np.concatenate([v, rng.standard_normal((R, 1)).astype(np.float32)], axis=1) for v in vecs]
    kept = fit_readout(longer, coords, sites, pheno, z, targets, log=lambda m: None, components=ro)
    assert kept.readout.n_features == F + 1 and kept.readout.names == ro.names
    Wk = kept.readout.weight.numpy().reshape(R, F + 1, -1)
    np.testing.assert_allclose(Wk[:, :F, :3], W[:, :, :3], rtol=1e-4, atol=1e-6)
    assert not Wk[:, F, :3].any()
    np.testing.assert_allclose(kept.crossfit[:, :3], fit.crossfit[:, :3], atol=1e-4)
    assert kept.readout.info["components_from"]["n_features"] == F
    with pytest.raises(ValueError, match="features per region"):
        fit_readout([v[:, :-1] for v in vecs], coords, sites, pheno, z, targets, log=lambda m: None, components=ro)

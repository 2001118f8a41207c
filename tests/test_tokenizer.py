"""The VQ tokenizer: training mechanics, determinism, checkpoints, other atlases, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bids_fmrilm.errors import DataError
from bids_fmrilm.tokenizer import Tokenizer, VectorQuantizerEMA, get_config, scale_run
from bids_fmrilm.tokenizer.model import kmeans

from simruns import ATLAS_DIR, N_ROI, _coords, _simulate, _write_dataset  # noqa: F401


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    from bids_fmrilm.training.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tok")
    coords = _coords()
    corpus = _write_dataset(root / "data", coords)
    text_emb = np.random.default_rng(3).standard_normal((9, 24)).astype(np.float32)
    metrics = train_tokenizer(corpus, root / "data", root / "out", config="tiny", seed=0, heldout_sites=["C"],
                              text_embeddings=text_emb, progress=False, max_steps=20)
    return {"out": root / "out", "metrics": metrics, "coords": coords,
            "run": scale_run(_simulate(np.random.default_rng(9), coords, n_vol=40))}


def test_tiny_training_loss_falls_and_reports(trained):
    log = [json.loads(x) for x in (trained["out"] / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "step" in r]
    assert steps[-1]["step"] == 20
    assert steps[-1]["loss"] < steps[0]["loss"]
    m = trained["metrics"]
    for key in ("recon_r2", "kmeans_r2", "codebook_usage", "perplexity", "recall_at_1"):
        assert key in m and np.isfinite(m[key])
    assert (trained["out"] / "tokenizer.safetensors").is_file()
    meta = json.loads((trained["out"] / "tokenizer.json").read_text())
    assert meta["config"]["name"] == "tiny" and meta["training"]["heldout_sites"] == ["C"]
    assert meta["scaling"]["mode"] == "robust" and meta["metrics"]["heldout"]["recon_r2"] == m["recon_r2"]


def test_encode_is_deterministic_and_in_range(trained):
    tok = Tokenizer.load(trained["out"])
    a = tok.encode(trained["run"], trained["coords"])
    b = tok.encode(trained["run"], trained["coords"])
    P, m = tok.patch_len, tok.min_patch_len
    assert (P, m) == (16, 8)  # 40 volumes: two full windows and a partial one of 8 volumes
    assert a.shape == (3, N_ROI)
    assert list(tok.patch_lengths(40)) == [16, 16, 8] and list(tok.patch_lengths(39)) == [16, 16]
    assert np.array_equal(a, b)
    assert a.min() >= 0 and a.max() < tok.codebook_size
    rec = tok.decode(a, trained["coords"], tok.patch_lengths(40))
    assert rec.shape == (40, N_ROI) and np.isfinite(rec).all()
    assert tok.reconstruct(trained["run"], trained["coords"]).shape == (40, N_ROI)
    feats = tok.features(trained["run"], trained["coords"])
    assert feats.shape == (3, N_ROI, tok.config.code_dim)
    assert np.array_equal(tok.ids_of(feats), a)  # ids are the features' nearest codes
    assert Tokenizer.run_representation(feats).shape == (N_ROI * tok.config.code_dim,)
    # patches weigh by their real volumes: the 8-volume window counts half of a 16-volume one
    rep = tok.represent_run(trained["run"], trained["coords"])
    want = (16 * feats[0] + 16 * feats[1] + 8 * feats[2]) / 40
    assert np.allclose(rep, want.reshape(-1), atol=1e-5)
    emb = tok.embed_run(trained["run"], trained["coords"])
    assert emb.shape == (tok.config.embed_dim,) and abs(np.linalg.norm(emb) - 1) < 1e-4


def test_frozen_fixed_profile_dims_are_a_linear_map_of_fc():
    """With a frozen identity fc_skip the first code dims are the connectivity profile on the
    fixed Fourier keys, whatever the transformer branch learned."""
    from bids_fmrilm.tokenizer.model import TokenizerModel, fc_profile, fixed_key_dim, fixed_partner_keys, window_fc

    cfg = get_config("tiny", freeze_encoder_skip=True, code_dim=16, fc_fixed_bands=2)
    torch.manual_seed(0)
    m = TokenizerModel(cfg, text_dim=8, llm_dim=8).eval()
    for p in m.encoder.to_code.parameters():  # a trained branch is not zero
        torch.nn.init.normal_(p)
    coords = torch.from_numpy(_coords().astype(np.float32))
    x = torch.randn(2, 3, N_ROI, cfg.patch_len)
    with torch.no_grad():
        z, _ = m.encode(x, coords)
        prof = fc_profile(window_fc(x), fixed_partner_keys(coords, cfg))
    k = fixed_key_dim(cfg)
    assert k == 12 and torch.allclose(z[..., :k], prof, atol=1e-5)
    assert not torch.allclose(z[..., k:], torch.zeros_like(z[..., k:]))
    assert not m.encoder.fc_skip.weight.requires_grad


def test_save_load_round_trip(trained, tmp_path):
    tok = Tokenizer.load(trained["out"])
    tok.save(tmp_path / "copy")
    tok2 = Tokenizer.load(tmp_path / "copy")
    assert np.array_equal(tok.encode(trained["run"], trained["coords"]), tok2.encode(trained["run"], trained["coords"]))
    assert tok2.meta["training"]["heldout_sites"] == ["C"]


@pytest.mark.skipif(not (ATLAS_DIR / "CC200_centroids.csv").is_file(), reason="needs ../shared/atlases")
def test_other_atlas_without_retraining(trained, monkeypatch):
    monkeypatch.setenv("BIDS_FMRILM_ATLAS_DIR", str(ATLAS_DIR))
    from bids_fmrilm.signals.atlas import load_atlas

    try:
        coords = load_atlas("schaefer400tian").coords
    except Exception as exc:  # pragma: no cover - depends on the shared files
        pytest.skip(f"schaefer400tian unavailable: {exc}")
    assert coords.shape == (450, 3)
    tok = Tokenizer.load(trained["out"])
    run = scale_run(_simulate(np.random.default_rng(5), coords, n_vol=32))
    ids = tok.encode(run, coords)
    assert ids.shape == (2, 450)
    assert ids.min() >= 0 and ids.max() < tok.codebook_size
    # unknown centroids use the learned "unknown" ROI embedding
    coords_nan = coords.copy()
    coords_nan[:10] = np.nan
    assert tok.encode(run, coords_nan).shape == ids.shape


def test_short_run_raises_data_error(trained):
    tok = Tokenizer.load(trained["out"])
    short = np.zeros((tok.min_patch_len - 1, N_ROI))
    with pytest.raises(DataError) as err:
        tok.encode(short, trained["coords"], source="sub-01_task-rest_timeseries.tsv.gz")
    msg = str(err.value)
    assert "sub-01_task-rest_timeseries.tsv.gz" in msg and f"{tok.min_patch_len - 1} volumes" in msg and "Fix:" in msg


def test_dead_code_restart_revives_unused_codes():
    torch.manual_seed(0)
    cfg = get_config("tiny", codebook_size=16, code_dim=4, ema_decay=0.5, dead_code_threshold=0.5)
    vq = VectorQuantizerEMA(cfg).train()
    data = torch.randn(512, 4)
    with torch.no_grad():
        vq.embed.copy_(torch.cat([data[:8], torch.full((8, 4), 100.0)]))  # half the codes far away
        vq.embed_sum.copy_(vq.embed)
        vq.cluster_size.fill_(1.0)
        vq.initialized.fill_(True)
    _, ids, _ = vq(data)
    assert set(ids.tolist()) <= set(range(8))
    for _ in range(5):
        vq(torch.randn(512, 4))
    assert int(vq.restarts) >= 8
    assert vq.embed.abs().max() < 50  # re-seeded from the data
    vq.eval()
    _, ids, _ = vq(torch.randn(4096, 4))
    assert len(set(ids.tolist()) & set(range(8, 16))) >= 6


def test_kmeans_init_uses_the_data():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, -5.0]])
    x = (centres[:, None] + 0.1 * torch.randn(4, 200, 2, generator=g)).reshape(-1, 2)
    cfg = get_config("tiny", codebook_size=4, code_dim=2)
    vq = VectorQuantizerEMA(cfg)
    vq.kmeans_init(x, iters=10)
    assert bool(vq.initialized)
    d = torch.cdist(centres, vq.embed)
    assert d.min(dim=1).values.max() < 0.2  # every data cluster got a code
    c, counts = kmeans(x, 4, iters=10, generator=g)
    assert counts.sum() == x.shape[0] and (counts > 0).all()


def test_command_object():
    from click.testing import CliRunner

    from bids_fmrilm.training.tokenizer import train_tokenizer_command

    res = CliRunner().invoke(train_tokenizer_command, ["--help"])
    assert res.exit_code == 0 and "--heldout-sites" in res.output and "--max-minutes" in res.output


def test_resumes_from_checkpoint(trained, tmp_path):
    import shutil

    from bids_fmrilm.training.tokenizer import train_tokenizer

    out = tmp_path / "resumed"
    shutil.copytree(trained["out"], out)
    data = trained["out"].parent / "data"
    text_emb = np.random.default_rng(3).standard_normal((9, 24)).astype(np.float32)
    m = train_tokenizer(data / "corpus.jsonl", data, out, config="tiny", seed=0, heldout_sites=["C"],
                        text_embeddings=text_emb, progress=False, max_steps=25, log_every=5)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
    assert steps[-1] == 25 and 21 not in steps and steps.count(20) == 1  # continued after step 20
    assert m["steps"] == 25


def test_adversarial_alignment_reverses_gradients():
    from bids_fmrilm.tokenizer.model import TokenizerModel

    torch.manual_seed(0)
    cfg = get_config("tiny", adversarial_weight=0.1)
    model = TokenizerModel(cfg, llm_dim=16)
    q = torch.randn(2, 3, 5, cfg.code_dim, requires_grad=True)
    loss = model.adversarial_loss(q, torch.randn(100, 16))
    loss.backward()
    assert model.discriminator[0].weight.grad is not None and q.grad is not None
    # gradient reversal: q's gradient ascends the discriminator loss
    eps = 1e-2
    with torch.no_grad():
        torch.manual_seed(1)
        l0 = model.adversarial_loss(q, torch.randn(100, 16))
        torch.manual_seed(1)
        l1 = model.adversarial_loss(q + eps * q.grad / q.grad.norm(), torch.randn(100, 16))
    assert torch.isfinite(l0) and torch.isfinite(l1)


def test_window_fc_matches_numpy_and_ignores_padding():
    from bids_fmrilm.tokenizer.data import frame_mask, patchify
    from bids_fmrilm.tokenizer.model import window_fc

    rng = np.random.default_rng(0)
    ts = rng.standard_normal((40, 6)).astype(np.float32)
    ts[:, 5] = 0.0  # a region without signal
    patches, lengths = patchify(ts, 16, min_len=8, return_lengths=True)
    assert list(lengths) == [16, 16, 8] and np.all(patches[2, :, 8:] == 0)
    fm = torch.from_numpy(frame_mask(lengths, 16))[None]
    fc = window_fc(torch.from_numpy(patches)[None], fm)[0].numpy()
    for j, (a, b) in enumerate(((0, 16), (16, 32), (32, 40))):
        r = np.corrcoef(ts[a:b, :5].T)
        expect = np.arctanh(np.clip(r, -0.99, 0.99))
        np.fill_diagonal(expect, 0.0)
        assert np.allclose(fc[j, :5, :5], expect, atol=1e-4)
    assert np.all(fc[:, 5] == 0) and np.all(fc[:, :, 5] == 0)


def test_connectivity_profile_does_not_depend_on_atlas_resolution():
    """The profile is a mean over partners: splitting every region into two identical halves
    (a finer atlas of the same signal) leaves each region's profile unchanged."""
    from bids_fmrilm.tokenizer.model import fc_profile

    rng = np.random.default_rng(1)
    R, d = 8, 5
    fc = torch.from_numpy(rng.standard_normal((1, 1, R, R)).astype(np.float32))
    keys = torch.from_numpy(rng.standard_normal((R, d)).astype(np.float32))
    fine = fc.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    p, p2 = fc_profile(fc, keys), fc_profile(fine, keys.repeat_interleave(2, dim=0))
    assert torch.allclose(p2[:, :, ::2], p, atol=1e-5)


def test_tokens_carry_connectivity(trained):
    """Gate 1 and the FC reconstruction are measured and stored; the FC loss is trained."""
    m = trained["metrics"]
    assert np.isfinite(m["fc_recon_r2"])
    log = [json.loads(x) for x in (trained["out"] / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "step" in r]
    assert all(np.isfinite(r["fc"]) for r in steps) and steps[-1]["fc"] < steps[0]["fc"]
    probe = m["probe"]
    assert set(probe) <= {"diagnosis", "sex"} and probe  # the tiny corpus has both classes on both sides
    for g in probe.values():
        assert 0 <= g["probe_auroc"] <= 1 and 0 <= g["fc_logistic_auroc"] <= 1
        assert g["probe_beats_fc"] == (g["probe_auroc"] >= g["fc_logistic_auroc"])
    meta = json.loads((trained["out"] / "tokenizer.json").read_text())
    assert meta["format_version"] == 2 and meta["metrics"]["heldout"]["probe"] == probe


def test_config_settings_from_the_command_line_are_typed_and_checked():
    from bids_fmrilm.errors import UsageError
    from bids_fmrilm.model.config import FMRILMConfig
    from bids_fmrilm.tokenizer.config import TokenizerConfig, get_config
    from bids_fmrilm.training.tokenizer import parse_settings

    over = parse_settings(["fc_input=false", "fc_weight=0", "patch_len=8"], TokenizerConfig)
    assert over == {"fc_input": False, "fc_weight": 0.0, "patch_len": 8}
    cfg = get_config("cpu", **over)
    assert cfg.fc_input is False and cfg.patch_len == 8 and cfg.codebook_size == 256
    assert parse_settings(["lora_targets=q_proj, v_proj"], FMRILMConfig) == {"lora_targets": ("q_proj", "v_proj")}
    for bad in (["no_such_field=1"], ["patch_len=long"], ["fc_input=maybe"], ["patch_len"]):
        with pytest.raises(UsageError):
            parse_settings(bad, TokenizerConfig)

"""Tokenizer configurations (dataclasses saved in every checkpoint).

Presets:

- ``tiny``: for tests on a CPU (trains a few steps in seconds);
- ``cpu``: per-region tokens over 160-volume windows with connectivity input, trained on ABIDE
  (CC200, ~590 training runs) in minutes on a 2-core CPU;
- ``patch``: the earlier design (8-volume patches, no connectivity input), kept for ablations;
- ``paper``: the fMRI-LM paper's sizes (8192 x 128 codebook, 160-volume windows), for GPUs.

One token per (time patch, ROI): each ROI's robust-scaled series is cut into non-overlapping
patches of ``patch_len`` volumes (a trailing partial patch of at least ``min_patch_len`` volumes
is kept, so long windows use the whole run), each token an index into a codebook of
``codebook_size`` vectors. With a long patch (a window of minutes) a token describes a region
over the window, and ``fc_input`` gives the encoder the region's connectivity profile (its row
of the window's Fisher-z correlation matrix, weighted onto the partners' coordinate
embeddings, so it does not depend on the atlas); ``fc_weight`` adds the window's correlation
matrix to the reconstruction targets. The LLM reads the continuous encoder features; codebook
ids are the fMRI head's targets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import choose_preset, dataclass_from_dict


@dataclass
class TokenizerConfig:
    name: str = "cpu"
    # --- patches
    patch_len: int = 8  # volumes per patch (8 x TR 2 s = 16 s; 160 = a 5.3-min window)
    min_patch_len: int = 0  # a trailing partial patch of at least this many volumes is kept (0: patch_len)
    # --- transformer
    d_model: int = 32
    n_heads: int = 2
    enc_layers: int = 1  # each layer: attention over ROIs, attention over time patches, MLP
    dec_layers: int = 2
    mlp_ratio: int = 2
    dropout: float = 0.0
    fourier_bands: int = 12  # frequencies per coordinate axis for ROI embeddings
    fourier_min_wavelength_mm: float = 8.0
    fourier_max_wavelength_mm: float = 400.0
    # --- quantizer
    codebook_size: int = 256
    code_dim: int = 16
    ema_decay: float = 0.99
    commitment: float = 0.25
    dead_code_threshold: float = 0.5  # EMA usage count below which a code is re-seeded
    kmeans_init_batches: int = 4
    kmeans_iters: int = 15
    # --- losses
    spectral_weight: float = 0.1  # |rFFT| amplitude loss on each patch
    fc_input: bool = False  # the encoder reads each region's connectivity profile in the patch
    fc_weight: float = 0.0  # weight of the patch's Fisher-z FC in the reconstruction loss
    fc_rank: int = 16  # rank of the decoder's bilinear FC reconstruction
    fc_fixed_bands: int = 2  # fixed Fourier partner keys (6 per band) beside the learned ones
    contrastive_weight: float = 0.2
    embed_dim: int = 128  # joint fMRI-text space
    n_groups: int = 16  # soft ROI groups (from coordinates) for the pooled connectivity summary
    adversarial_weight: float = 0.0  # domain-adversarial alignment with LLM word embeddings (off)
    # --- optimisation
    batch_size: int = 4
    crop_patches: int = 12  # random crop length (patches) during training
    max_position: int = 64  # training crops get random time offsets so positions < this are all seen
    lr: float = 2e-3
    # The encoder learns only through the straight-through estimator; on a short CPU budget its
    # context branch stays at its zero initialisation (tokens = nearest code of the patch) and all
    # context is learned by the decoder. GPU configs train it.
    encoder_lr_scale: float = 0.0
    freeze_encoder_skip: bool = True  # keep the code space anchored to the patch space
    weight_decay: float = 0.01
    warmup_steps: int = 50
    max_steps: int = 3000
    grad_clip: float = 1.0
    log_every: int = 50
    checkpoint_every: int = 500

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TokenizerConfig":
        return dataclass_from_dict(cls, d)


CONFIGS: dict[str, TokenizerConfig] = {
    "tiny": TokenizerConfig(
        name="tiny", patch_len=16, min_patch_len=8, fc_input=True, fc_weight=1.0, fc_rank=4, d_model=32, n_heads=2,
        enc_layers=1, dec_layers=1, fourier_bands=4, codebook_size=32, code_dim=8, ema_decay=0.9, encoder_lr_scale=1.0,
        freeze_encoder_skip=False, kmeans_init_batches=1, kmeans_iters=5, embed_dim=16, n_groups=4,
        batch_size=4, crop_patches=3, max_position=8, lr=3e-3, warmup_steps=2, max_steps=30, log_every=5,
        checkpoint_every=15, contrastive_weight=0.1,
    ),
    "cpu": TokenizerConfig(
        name="cpu", patch_len=160, min_patch_len=40, d_model=64, n_heads=4, enc_layers=2, dec_layers=2,
        codebook_size=256, code_dim=24, fc_input=True, fc_weight=1.0, fc_rank=16, encoder_lr_scale=1.0,
        freeze_encoder_skip=True, kmeans_init_batches=8, batch_size=8, crop_patches=3, max_position=8, lr=1e-3,
        warmup_steps=100, max_steps=2000, log_every=50, checkpoint_every=500,
    ),
    "patch": TokenizerConfig(name="patch"),
    "paper": TokenizerConfig(
        name="paper", patch_len=160, min_patch_len=40, fc_input=True, fc_weight=1.0, fc_rank=64, d_model=256, n_heads=8, enc_layers=4, dec_layers=4, mlp_ratio=4, fourier_bands=32,
        codebook_size=8192, code_dim=128, ema_decay=0.99, encoder_lr_scale=1.0, freeze_encoder_skip=False, kmeans_init_batches=8, kmeans_iters=20,
        embed_dim=256, n_groups=32, batch_size=32, crop_patches=4, max_position=16, lr=5e-4, warmup_steps=1000,
        max_steps=100_000, log_every=100, checkpoint_every=2000,
    ),
}


def get_config(name_or_config: str | TokenizerConfig, **overrides) -> TokenizerConfig:
    """A preset by name (``tiny``, ``cpu``, ``patch``, ``paper``) or a config, with field overrides."""
    return choose_preset(CONFIGS, name_or_config, "tokenizer", **overrides)

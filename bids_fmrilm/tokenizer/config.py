"""Tokenizer configurations (dataclasses saved in every checkpoint).

Three presets:

- ``tiny``: for tests on a CPU (trains a few steps in seconds);
- ``cpu``: trains on ABIDE (CC200, ~560 training runs) in under 45 minutes on a 2-core CPU;
- ``paper``: the fMRI-LM paper's codebook (8192 x 128), for GPUs.

One token per (time patch, ROI): each ROI's robust-scaled series is cut into non-overlapping
patches of ``patch_len`` volumes, so a run of T volumes and R ROIs becomes ``T // patch_len`` x R
tokens, each an index into a codebook of ``codebook_size`` vectors. Tokens carry the same bits as
a k-means code of the raw patch (the same-bits baseline); the tokenizer beats it because the
encoder and decoder see context (other ROIs at the same time, other patches of the same ROI).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import choose_preset, dataclass_from_dict


@dataclass
class TokenizerConfig:
    name: str = "cpu"
    # --- patches
    patch_len: int = 8  # volumes per patch (8 x TR 2 s = 16 s)
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
        name="tiny", patch_len=4, d_model=32, n_heads=2, enc_layers=1, dec_layers=1, fourier_bands=4,
        codebook_size=32, code_dim=8, ema_decay=0.9, encoder_lr_scale=0.1, kmeans_init_batches=1, kmeans_iters=5, embed_dim=16, n_groups=4,
        batch_size=4, crop_patches=6, lr=3e-3, warmup_steps=2, max_steps=30, log_every=5,
        checkpoint_every=15, contrastive_weight=0.1,
    ),
    "cpu": TokenizerConfig(),
    "paper": TokenizerConfig(
        name="paper", patch_len=8, d_model=256, n_heads=8, enc_layers=4, dec_layers=4, mlp_ratio=4, fourier_bands=32,
        codebook_size=8192, code_dim=128, ema_decay=0.99, encoder_lr_scale=1.0, freeze_encoder_skip=False, kmeans_init_batches=8, kmeans_iters=20,
        embed_dim=256, n_groups=32, batch_size=32, crop_patches=16, lr=5e-4, warmup_steps=1000,
        max_steps=100_000, log_every=100, checkpoint_every=2000,
    ),
}


def get_config(name_or_config: str | TokenizerConfig, **overrides) -> TokenizerConfig:
    """A preset by name (``tiny``, ``cpu``, ``paper``) or a config, with field overrides."""
    return choose_preset(CONFIGS, name_or_config, "tokenizer", **overrides)

"""The VQ neural tokenizer: ROI x time patches -> discrete tokens -> patches.

Shapes used throughout: ``B`` runs, ``T`` time patches, ``R`` ROIs, ``P`` volumes per patch,
``d`` model width, ``c`` code width, ``K`` codebook size.

    patches (B,T,R,P) --patch_in--> + ROI embedding (Fourier features of the MNI centroid)
                                    + time embedding (sinusoidal, any length)
        --> [ROI-axis attention, time-axis attention] x enc_layers --> z (B,T,R,c)
        --> EMA vector quantizer --> ids (B,T,R), q (B,T,R,c)
        --> code_in + ROI + time embeddings --> axial blocks x dec_layers --> recon (B,T,R,P)

Attention is axial (nanoGPT-style blocks applied along one axis at a time): over ROIs within a
time patch, then over time patches within an ROI. Each token is one (patch, ROI), so a token has
the bits of a k-means code of that patch, but the decoder reads all tokens of the run and the
encoder writes each code knowing its context.

With ``fc_input`` a patch is a long window (minutes) and each region also enters with its
connectivity profile: its row of the window's Fisher-z correlation matrix, as a weighted sum of
the partner regions' coordinate embeddings (so any atlas with centroids works). With
``fc_weight`` the decoder reconstructs that matrix too (a symmetric bilinear form of the decoded
region features), so the codes must carry each region's coupling, not only its signal.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .config import TokenizerConfig


# ------------------------------------------------------------------------------- embeddings
class FourierROIEmbedding(nn.Module):
    """ROI embedding from its MNI centroid: fixed log-spaced Fourier features -> MLP.

    Rows of ``coords`` with a non-finite value (unknown centroid) get a learned embedding.
    """

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        n = cfg.fourier_bands
        wavelengths = torch.logspace(math.log10(cfg.fourier_min_wavelength_mm),
                                     math.log10(cfg.fourier_max_wavelength_mm), n)
        self.register_buffer("freqs", 2 * math.pi / wavelengths, persistent=False)  # rad / mm
        self.mlp = nn.Sequential(nn.Linear(6 * n, cfg.d_model), nn.GELU(), nn.Linear(cfg.d_model, cfg.d_model))
        self.unknown = nn.Parameter(0.02 * torch.randn(cfg.d_model))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:  # (R,3) -> (R,d)
        known = torch.isfinite(coords).all(dim=-1, keepdim=True)
        c = torch.nan_to_num(coords, nan=0.0, posinf=0.0, neginf=0.0)
        ang = c[..., None] * self.freqs  # (R,3,n)
        feats = torch.cat([ang.sin(), ang.cos()], dim=-1).flatten(-2)  # (R,6n)
        return torch.where(known, self.mlp(feats), self.unknown)


def time_embedding(n: int, d: int, device=None, offset: int = 0) -> torch.Tensor:
    """Sinusoidal embedding of patch positions offset..offset+n-1, (n,d) (no length limit)."""
    pos = offset + torch.arange(n, device=device, dtype=torch.float32)[:, None]
    i = torch.arange(d // 2, device=device, dtype=torch.float32)[None]
    ang = pos / (100.0 ** (2 * i / d))
    emb = torch.zeros(n, d, device=device)
    emb[:, 0::2] = ang.sin()
    emb[:, 1::2] = ang.cos()[:, : (d - d // 2)]
    return emb


# ------------------------------------------------------------------------------- blocks
class MLP(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x))))


class AxialAttention(nn.Module):
    """Multi-head self-attention along one axis of (B,T,R,d): ``"roi"`` or ``"time"``."""

    def __init__(self, cfg: TokenizerConfig, axis: str):
        super().__init__()
        assert axis in ("roi", "time") and cfg.d_model % cfg.n_heads == 0
        self.axis, self.n_heads, self.dropout = axis, cfg.n_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, time_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, R, d = x.shape
        mask = None
        if self.axis == "roi":
            h = x.reshape(B * T, R, d)
        else:
            h = x.transpose(1, 2).reshape(B * R, T, d)
            if time_mask is not None:  # (B,T) True = real patch; padded keys are ignored
                mask = time_mask[:, None, :].expand(B, R, T).reshape(B * R, 1, 1, T)
        N, L, _ = h.shape
        q, k, v = self.qkv(h).view(N, L, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = self.proj(y.transpose(1, 2).reshape(N, L, d))
        if self.axis == "roi":
            return y.view(B, T, R, d)
        return y.view(B, R, T, d).transpose(1, 2)


class Block(nn.Module):
    """Axial transformer block: attention over ROIs, then over time patches, then an MLP."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.ln_roi = nn.LayerNorm(cfg.d_model)
        self.attn_roi = AxialAttention(cfg, "roi")
        self.ln_time = nn.LayerNorm(cfg.d_model)
        self.attn_time = AxialAttention(cfg, "time")
        self.ln_mlp = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x, time_mask=None):
        x = x + self.attn_roi(self.ln_roi(x))
        x = x + self.attn_time(self.ln_time(x), time_mask)
        return x + self.mlp(self.ln_mlp(x))


def _identity_like(linear: nn.Linear) -> None:
    """Initialise a bias-free linear map as an isometric embedding (or its transpose)."""
    with torch.no_grad():
        w = torch.zeros_like(linear.weight)
        n = min(w.shape)
        w[:n, :n] = torch.eye(n)
        linear.weight.copy_(w)


def window_fc(patches: torch.Tensor, frame_mask: torch.Tensor | None = None, clip: float = 0.99) -> torch.Tensor:
    """Fisher-z correlation matrix of every patch: (B,T,R,P) -> (B,T,R,R), diagonal 0.

    ``frame_mask`` (B,T,P) marks real volumes (padding is ignored). Regions without variance in
    a patch get zero connectivity.
    """
    m = torch.ones(patches.shape[:2] + patches.shape[-1:], device=patches.device) if frame_mask is None \
        else frame_mask.float()
    m = m[:, :, None, :]
    n = m.sum(-1, keepdim=True).clamp(min=2)
    xc = (patches - (patches * m).sum(-1, keepdim=True) / n) * m
    cov = xc @ xc.transpose(-1, -2) / n
    var = cov.diagonal(dim1=-2, dim2=-1)
    alive = var > 1e-6
    sd = var.clamp(min=1e-6).sqrt()
    r = (cov / (sd[..., :, None] * sd[..., None, :])).clamp(-clip, clip)
    keep = alive[..., :, None] & alive[..., None, :]
    keep = keep & ~torch.eye(r.shape[-1], dtype=torch.bool, device=r.device)
    return torch.where(keep, torch.atanh(r), torch.zeros_like(r))


def fixed_key_dim(cfg: TokenizerConfig) -> int:
    return 6 * cfg.fc_fixed_bands


def fixed_partner_keys(coords: torch.Tensor, cfg: TokenizerConfig) -> torch.Tensor:
    """Fixed Fourier features of the regions' centroids (R, 6 * fc_fixed_bands), standardised over
    the atlas's regions (unknown centroids: 0). Partner keys that training cannot wash out: the
    connectivity profile on them is a fixed linear map of the FC row, which keeps what a linear
    model on FC finds (the held-out diagnosis signal)."""
    n = cfg.fc_fixed_bands
    if n == 0:
        return coords.new_zeros(coords.shape[0], 0)
    wl = torch.logspace(math.log10(cfg.fourier_min_wavelength_mm), math.log10(cfg.fourier_max_wavelength_mm), n,
                        device=coords.device)
    known = torch.isfinite(coords).all(-1, keepdim=True)
    ang = torch.nan_to_num(coords, nan=0.0, posinf=0.0, neginf=0.0)[..., None] * (2 * math.pi / wl)
    f = torch.cat([ang.sin(), ang.cos()], dim=-1).flatten(-2)
    f = torch.where(known, f, torch.zeros_like(f))
    k = known.float()
    mu = (f * k).sum(0) / k.sum().clamp(min=1)
    sd = (((f - mu) * k) ** 2).sum(0).div(k.sum().clamp(min=1)).sqrt().clamp(min=1e-6)
    return (f - mu) / sd * k


def fc_profile(fc: torch.Tensor, partner_keys: torch.Tensor) -> torch.Tensor:
    """Connectivity profile of each region, (B,T,R,R) x (R,d) -> (B,T,R,d): the mean over partner
    regions of Fisher z times the partner's coordinate key, rescaled so that a 200-region atlas
    gives unit-order values. A mean, not a sum, so the profile does not grow with the atlas."""
    return 16.0 * fc @ partner_keys / fc.shape[-1]


class Encoder(nn.Module):
    """Patch -> code vector. A linear skip (initialised as an isometric embedding of the patch)
    plus a transformer branch that sees the run's context: at initialisation the tokenizer is
    k-means of the raw patches; training adds what context buys. With ``fc_input``, each region's
    connectivity profile enters the transformer and, through a linear skip of its own, the code."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.patch_in = nn.Linear(cfg.patch_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.enc_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.to_code = nn.Linear(cfg.d_model, cfg.code_dim)
        self.skip = nn.Linear(cfg.patch_len, cfg.code_dim, bias=False)
        if cfg.fc_input:
            n_key = cfg.d_model + fixed_key_dim(cfg)
            self.fc_key = nn.Linear(cfg.d_model, cfg.d_model)  # learned partner keys from coordinate embeddings
            self.fc_in = nn.Linear(n_key, cfg.d_model)
            self.fc_skip = nn.Linear(n_key, cfg.code_dim, bias=False)
        # With a frozen identity fc_skip, the first code dims are the profile on the fixed keys (a
        # fixed linear map of FC); the transformer branch writes only the other dims, so training
        # cannot wash out what a linear model on FC finds.
        mask = torch.ones(cfg.code_dim)
        if cfg.fc_input and cfg.freeze_encoder_skip:
            mask[: min(fixed_key_dim(cfg), cfg.code_dim)] = 0.0
        self.register_buffer("branch_mask", mask, persistent=False)

    def forward(self, patches, roi_emb, time_mask=None, offset: int = 0, fc=None, fixed_keys=None):
        B, T, R, P = patches.shape
        x = self.patch_in(patches) + roi_emb[None, None] + time_embedding(T, roi_emb.shape[-1], patches.device, offset)[None, :, None]
        skip = self.skip(patches)
        if fc is not None:
            prof = fc_profile(fc, torch.cat([fixed_keys, self.fc_key(roi_emb)], dim=-1))
            x = x + self.fc_in(prof)
            skip = skip + self.fc_skip(prof)
        for blk in self.blocks:
            x = blk(x, time_mask)
        return skip + self.to_code(self.ln_f(x)) * self.branch_mask


class Decoder(nn.Module):
    """Code vectors of the run -> patches: a linear skip (the inverse of the encoder's at
    initialisation) plus a transformer branch reading all tokens of the run."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.code_in = nn.Linear(cfg.code_dim, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.dec_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.patch_len)
        self.skip = nn.Linear(cfg.code_dim, cfg.patch_len, bias=False)
        if cfg.fc_weight > 0:
            self.fc_head = nn.Linear(cfg.d_model, 2 * cfg.fc_rank)

    def forward(self, q, roi_emb, time_mask=None, offset: int = 0):
        B, T, R, _ = q.shape
        x = self.code_in(q) + roi_emb[None, None] + time_embedding(T, roi_emb.shape[-1], q.device, offset)[None, :, None]
        for blk in self.blocks:
            x = blk(x, time_mask)
        h = self.ln_f(x)
        return self.skip(q) + self.head(h), h

    def connectivity(self, h: torch.Tensor) -> torch.Tensor:
        """Reconstructed Fisher-z FC of each patch, (B,T,R,d) -> (B,T,R,R): a symmetric bilinear
        form of the decoded region features."""
        a, b = self.fc_head(h).chunk(2, dim=-1)
        ab = a @ b.transpose(-1, -2)
        return (ab + ab.transpose(-1, -2)) / (2 * math.sqrt(a.shape[-1]))


# ------------------------------------------------------------------------------- quantizer
def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(t, src=0)
    return t


def kmeans(x: torch.Tensor, k: int, iters: int = 10, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd k-means on (N,c) rows (initialised from distinct random rows). Returns centres, counts."""
    n = x.shape[0]
    idx = torch.randperm(n, generator=generator)[:k] if n >= k else torch.randint(n, (k,), generator=generator)
    centres = x[idx].clone()
    counts = torch.zeros(k)
    for _ in range(max(1, iters)):
        ids = torch.cdist(x, centres).argmin(dim=1)
        counts = torch.bincount(ids, minlength=k).float()
        sums = torch.zeros_like(centres).index_add_(0, ids, x)
        empty = counts == 0
        centres = torch.where(empty[:, None], centres, sums / counts.clamp(min=1)[:, None])
        if empty.any():  # re-seed empty clusters on random points
            centres[empty] = x[torch.randint(n, (int(empty.sum()),), generator=generator)]
    return centres, counts


class VectorQuantizerEMA(nn.Module):
    """Vector quantizer with an EMA codebook (van den Oord et al. 2017; Razavi et al. 2019).

    - k-means initialisation (:meth:`kmeans_init`) from encoder outputs of the first batches;
    - EMA updates of code counts and sums in training mode (all-reduced across processes);
    - dead-code restarts: codes whose EMA count falls below ``dead_code_threshold`` are re-seeded
      from encoder outputs of the current batch;
    - commitment loss ``||z - sg(q)||^2`` and a straight-through gradient to the encoder.
    """

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        K, c = cfg.codebook_size, cfg.code_dim
        self.K, self.decay, self.threshold, self.eps = K, cfg.ema_decay, cfg.dead_code_threshold, 1e-5
        self.register_buffer("embed", torch.randn(K, c) * 0.1)
        self.register_buffer("cluster_size", torch.ones(K))
        self.register_buffer("embed_sum", self.embed.clone())
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("restarts", torch.tensor(0, dtype=torch.long))

    @torch.no_grad()
    def kmeans_init(self, z: torch.Tensor, iters: int = 10, n_batches: int = 1, seed: int = 0) -> None:
        """Set the codebook to k-means centres of encoder outputs ``z`` (N,c) pooled from ``n_batches``."""
        g = torch.Generator().manual_seed(seed)
        centres, counts = kmeans(z.detach().float().cpu(), self.K, iters, g)
        centres, counts = _broadcast(centres.to(self.embed.device)), _broadcast(counts.to(self.embed.device))
        per_batch = counts / max(1, n_batches)
        self.embed.copy_(centres)
        self.cluster_size.copy_(per_batch)
        self.embed_sum.copy_(centres * per_batch[:, None])
        self.initialized.fill_(True)

    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed)

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed.t() + self.embed.pow(2).sum(1)[None]
        return d.argmin(dim=1)

    def forward(self, z: torch.Tensor, valid: torch.Tensor | None = None):
        """Quantize z (...,c). ``valid`` (...) marks tokens that may update the codebook.

        Returns q (straight-through, same shape as z), ids (...), commitment loss (scalar).
        """
        shape = z.shape
        flat = z.reshape(-1, shape[-1])
        ids = self.nearest(flat.detach())
        q = self.codes(ids)
        keep = None if valid is None else valid.reshape(-1)
        if self.training:
            self._ema_update(flat.detach(), ids, keep)
        diff = (flat - q.detach()).pow(2).mean(-1)
        commit = diff.mean() if keep is None else (diff * keep).sum() / keep.sum().clamp(min=1)
        q_st = flat + (q - flat).detach()
        return q_st.view(shape), ids.view(shape[:-1]), commit

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor | None) -> None:
        if keep is not None:
            flat, ids = flat[keep], ids[keep]
        counts = _all_reduce(torch.bincount(ids, minlength=self.K).float())
        sums = _all_reduce(torch.zeros_like(self.embed).index_add_(0, ids, flat))
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        size = (self.cluster_size + self.eps) / (n + self.K * self.eps) * n  # Laplace smoothing
        self.embed.copy_(self.embed_sum / size[:, None])
        self.restart_dead(flat)

    @torch.no_grad()
    def restart_dead(self, recent: torch.Tensor) -> int:
        """Re-seed codes with an EMA count below the threshold from ``recent`` encoder outputs."""
        dead = self.cluster_size < self.threshold
        n_dead = int(dead.sum())
        if n_dead == 0 or recent.shape[0] == 0:
            return 0
        pick = torch.randint(recent.shape[0], (n_dead,), device=recent.device)
        new = recent[pick] + 1e-3 * recent.std() * torch.randn_like(recent[pick])
        new = _broadcast(new)
        self.embed[dead] = new
        self.cluster_size[dead] = 1.0
        self.embed_sum[dead] = new
        self.restarts.add_(n_dead)
        return n_dead


def usage_and_perplexity(ids: torch.Tensor, K: int) -> tuple[float, float]:
    """Fraction of the K codes used by ``ids`` and the perplexity of their distribution."""
    counts = torch.bincount(ids.reshape(-1).long(), minlength=K).float()
    p = counts / counts.sum().clamp(min=1)
    ppl = torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
    return float((counts > 0).float().mean()), float(ppl)


# ------------------------------------------------------------------------------- alignment
class GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -ctx.scale * g, None


class RunPooler(nn.Module):
    """Pooled run embedding from the decoded run: token features + soft-network connectivity.

    ROIs are softly assigned to ``n_groups`` groups by their (coordinate-derived) embedding, so
    the summary is atlas-agnostic; the correlation matrix of the group-mean decoded signals and
    their log amplitude join the mean of the decoder's token features. ``log_scale`` (B,R), the
    log interquartile range of each ROI before robust scaling, restores the amplitude that
    scaling removed: its run median and the group means of its deviation from that median.
    """

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        G = cfg.n_groups
        self.group_logits = nn.Linear(cfg.d_model, G)
        self.iu = torch.triu_indices(G, G, offset=1)
        n_in = cfg.d_model + self.iu.shape[1] + 3 * G + 1
        # Standardisation of the run-level log scale (units differ between sites and software);
        # set from the training runs and saved with the checkpoint.
        self.register_buffer("level_mean", torch.zeros(()))
        self.register_buffer("level_std", torch.ones(()))
        self.mlp = nn.Sequential(nn.LayerNorm(n_in), nn.Linear(n_in, 2 * cfg.embed_dim), nn.GELU(),
                                 nn.Linear(2 * cfg.embed_dim, cfg.embed_dim))

    def forward(self, recon, hidden, roi_emb, time_mask=None, log_scale=None):
        B, T, R, P = recon.shape
        if time_mask is None:
            time_mask = torch.ones(B, T, dtype=torch.bool, device=recon.device)
        m = time_mask.float()
        n_tok = (m.sum(1) * R).clamp(min=1)
        tok = (hidden * m[:, :, None, None]).sum((1, 2)) / n_tok[:, None]  # (B,d)
        A = torch.softmax(self.group_logits(roi_emb), dim=-1)  # (R,G)
        A = A / A.sum(0, keepdim=True).clamp(min=1e-6)
        # Connectivity of the decoded signal; detached so the alignment loss shapes the tokens
        # through the token features, not by distorting the reconstruction.
        series = recon.detach().permute(0, 1, 3, 2).reshape(B, T * P, R)
        mv = m.repeat_interleave(P, dim=1)[..., None]  # (B,TP,1)
        g = series @ A  # (B,TP,G)
        nv = mv.sum(1).clamp(min=2)
        mu = (g * mv).sum(1, keepdim=True) / nv[:, None]
        gc = (g - mu) * mv
        cov = gc.transpose(1, 2) @ gc / nv[:, None]
        std = cov.diagonal(dim1=1, dim2=2).clamp(min=1e-6).sqrt()
        corr = cov / (std[:, :, None] * std[:, None, :])
        fc = corr[:, self.iu[0], self.iu[1]]
        # lag-1 autocorrelation of each group signal (spectral shape: fALFF / autocorrelation)
        pair = mv[:, 1:] * mv[:, :-1]
        lag1 = (gc[:, 1:] * gc[:, :-1] * pair).sum(1) / pair.sum(1).clamp(min=1) / std.pow(2)
        if log_scale is None:
            log_scale = torch.zeros(B, R, device=recon.device)
        level = log_scale.median(dim=1, keepdim=True).values
        rel = (log_scale - level) @ A  # (B,G) relative amplitude of each ROI group
        level = (level - self.level_mean) / self.level_std.clamp(min=1e-3)
        feats = torch.cat([tok, fc, std.log(), lag1, rel, level], dim=-1)
        return F.normalize(self.mlp(feats), dim=-1)


# ------------------------------------------------------------------------------- the model
class TokenizerModel(nn.Module):
    def __init__(self, cfg: TokenizerConfig, text_dim: int = 0, llm_dim: int = 0):
        super().__init__()
        self.cfg, self.text_dim, self.llm_dim = cfg, int(text_dim), int(llm_dim)
        self.roi_embed = FourierROIEmbedding(cfg)
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizerEMA(cfg)
        self.decoder = Decoder(cfg)
        self.pooler = RunPooler(cfg)
        if self.text_dim:
            self.text_proj = nn.Linear(self.text_dim, cfg.embed_dim)
            self.register_buffer("text_mean", torch.zeros(self.text_dim))
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        if self.llm_dim:
            self.code_to_llm = nn.Linear(cfg.code_dim, self.llm_dim)
            self.discriminator = nn.Sequential(nn.Linear(self.llm_dim, 256), nn.GELU(), nn.Linear(256, 1))
        self.apply(self._init)
        # Start as "k-means of the raw patches": isometric skips, context branches silent.
        if cfg.fc_input:
            # codes start as the profile on the fixed keys (a linear map of FC); the signal enters
            # through the transformer (a window's first samples are no summary of it)
            nn.init.zeros_(self.encoder.skip.weight)
            _identity_like(self.encoder.fc_skip)
        else:
            _identity_like(self.encoder.skip)
        _identity_like(self.decoder.skip)
        nn.init.zeros_(self.encoder.to_code.weight)
        nn.init.zeros_(self.decoder.head.weight)
        if cfg.freeze_encoder_skip:  # keep the code space anchored to the patch (or profile) space
            self.encoder.skip.weight.requires_grad_(False)
            if cfg.fc_input:
                self.encoder.fc_skip.weight.requires_grad_(False)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # -- pieces
    def patch_fc(self, patches, frame_mask=None):
        """Fisher-z FC of each patch (B,T,R,R) when the model reads or reconstructs it, else None."""
        if not (self.cfg.fc_input or self.cfg.fc_weight > 0):
            return None
        return window_fc(patches, frame_mask)

    def encode(self, patches, coords, time_mask=None, offset: int = 0, frame_mask=None, fc=None):
        """(B,T,R,P), (R,3) -> z (B,T,R,c), ROI embedding (R,d). ``frame_mask`` (B,T,P) marks the
        real volumes of partial patches; ``fc`` is :meth:`patch_fc` when already computed."""
        roi = self.roi_embed(coords)
        if not self.cfg.fc_input:
            return self.encoder(patches, roi, time_mask, offset), roi
        if fc is None:
            fc = window_fc(patches, frame_mask)
        return self.encoder(patches, roi, time_mask, offset, fc, fixed_partner_keys(coords, self.cfg)), roi

    def decode_codes(self, q, coords=None, roi=None, time_mask=None):
        roi = self.roi_embed(coords) if roi is None else roi
        return self.decoder(q, roi, time_mask)

    def embed_text(self, text_emb: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text_emb - self.text_mean), dim=-1)

    def forward(self, patches, coords, time_mask=None, with_embedding=False, text_emb=None, offset: int = 0,
                log_scale=None, frame_mask=None):
        """Encode, quantize, decode; optionally the pooled run embedding and projected texts.

        Everything trainable runs inside ``forward`` so that DDP/FSDP wrappers see it. With
        ``fc_weight`` the output also holds the patches' FC (``fc``) and its reconstruction
        (``fc_recon``).
        """
        if frame_mask is not None and time_mask is None:
            time_mask = frame_mask.any(-1)
        fc = self.patch_fc(patches, frame_mask)
        z, roi = self.encode(patches, coords, time_mask, offset, frame_mask, fc)
        valid = None if time_mask is None else time_mask[:, :, None].expand(z.shape[:3])
        q, ids, commit = self.quantizer(z, valid)
        recon, hidden = self.decoder(q, roi, time_mask, offset)
        out = {"z": z, "q": q, "ids": ids, "commit": commit, "recon": recon, "hidden": hidden, "roi": roi}
        if self.cfg.fc_weight > 0:
            out["fc"], out["fc_recon"] = fc, self.decoder.connectivity(hidden)
        if with_embedding:
            out["run_emb"] = self.pooler(recon, hidden, roi, time_mask, log_scale)
        if text_emb is not None:
            out["text_emb"] = self.embed_text(text_emb)
            out["logit_scale"] = self.logit_scale.clamp(max=math.log(100.0)).exp()
        return out

    def run_embedding(self, out: dict, time_mask=None, log_scale=None) -> torch.Tensor:
        """Pooled run embedding (B, embed_dim) of a :meth:`forward` output."""
        if "run_emb" in out:
            return out["run_emb"]
        return self.pooler(out["recon"], out["hidden"], out["roi"], time_mask, log_scale)

    def adversarial_loss(self, q: torch.Tensor, word_emb: torch.Tensor, n: int = 1024) -> torch.Tensor:
        """Domain-adversarial loss: a discriminator tells projected code vectors from LLM word
        embeddings; the gradient reversal pushes the codes' projection toward the word-embedding
        distribution (the quantized vectors pass the straight-through gradient to the encoder)."""
        flat = q.reshape(-1, q.shape[-1])
        pick = torch.randint(flat.shape[0], (min(n, flat.shape[0]),), device=flat.device)
        fake = GradReverse.apply(self.code_to_llm(flat[pick]), 1.0)
        real = word_emb[torch.randint(word_emb.shape[0], (fake.shape[0],), device=flat.device)]
        logits = self.discriminator(torch.cat([fake, real])).squeeze(-1)
        target = torch.cat([torch.zeros(fake.shape[0]), torch.ones(real.shape[0])]).to(logits)
        return F.binary_cross_entropy_with_logits(logits, target)


def spectral_loss(recon: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between |rFFT| amplitude spectra along the patch (last) axis (orthonormal FFT, so the
    loss does not grow with the patch length)."""
    d = (torch.fft.rfft(recon, dim=-1, norm="ortho").abs()
         - torch.fft.rfft(target, dim=-1, norm="ortho").abs()).pow(2).mean(-1)
    return d.mean() if mask is None else (d * mask).sum() / mask.sum().clamp(min=1)


def fc_loss(out: dict, time_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between the reconstructed and the real Fisher-z FC of each real patch (off-diagonal)."""
    fc, rec = out["fc"], out["fc_recon"]
    R = fc.shape[-1]
    off = ~torch.eye(R, dtype=torch.bool, device=fc.device)
    d = ((rec - fc) ** 2 * off).sum((-1, -2)) / (R * (R - 1))  # (B,T)
    if time_mask is None:
        return d.mean()
    m = time_mask.float()
    return (d * m).sum() / m.sum().clamp(min=1)


def reconstruction_losses(out: dict, patches: torch.Tensor, frame_mask: torch.Tensor, cfg: TokenizerConfig) -> dict:
    """Signal MSE and amplitude-spectrum loss over real volumes, and the FC loss (``fc_weight``).

    ``frame_mask`` (B,T,P) marks real volumes; the spectrum is compared on full patches only
    (a zero-padded patch has another spectrum)."""
    fm = frame_mask[:, :, None, :].float()  # (B,T,1,P)
    fm = fm.expand(patches.shape)
    mse = (((out["recon"] - patches) ** 2) * fm).sum() / fm.sum().clamp(min=1)
    full = frame_mask.all(-1)[:, :, None].expand(patches.shape[:3]).float()
    parts = {"mse": mse, "spectral": spectral_loss(out["recon"], patches, full)}
    if "fc" in out:
        parts["fc"] = fc_loss(out, frame_mask.any(-1))
    return parts

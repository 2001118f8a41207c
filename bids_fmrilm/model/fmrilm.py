"""The fMRI-LM: a causal LLM that reads fMRI tokens between ``<fmri>`` and ``</fmri>``.

Shapes: ``n`` time patches, ``R`` ROIs, ``c`` code width, ``K`` codebook size, ``M`` slots per
patch, ``H`` LLM hidden size, ``L`` sequence length.

    encoder features (n,R,c) (``fmri_input="features"``; or the codebook vectors of the token
    ids, ``"codes"``) + ROI embeddings (R,d) (frozen tokenizer)
        --Projector: M learned queries attend over ROIs--> (n*M, H) patch slots
    run embedding (tokenizer, language-aligned) --Projector.summary--> (1, H)
    run readout (S,) (model/readout.py: frozen linear scores of the whole run) --Projector.readout--> (1, H)
    sequence:  text ... <fmri> slot_1 ... slot_nM summary readout </fmri> text ...
        --LLM (LoRA on attention/MLP, QLoRA when 4-bit)--> hidden (L, H)
        stage 3: + adapter_k(readout) added after each of the top ``readout_layers`` decoder layers,
        at the text positions that follow the block (zero-initialised; FMRILM.add_readout_adapter)
        hidden at the last slot of patch p --FMRIHead--> logits (R, K) of patch p+1's token ids
        hidden at text positions --lm_head--> next text token
        mean hidden over the block (the run embedding) --Projector.align--> readout (w_align > 0:
        MSE against the run readout, so the written embedding carries what the readout measures)
        hidden at each slot of patch p --Projector.reconstruct--> patch p's features (R,c)
        (w_recon > 0: relative MSE; the head is affine in the hidden state, so what the slots keep
        of the features their mean, the run embedding, keeps too)

The summary and the readout sit after the patch slots, so causal attention keeps the next-patch
objective honest (no slot sees a summary of patches that follow it). ``<fmri>``/``</fmri>`` are learned vectors,
not new vocabulary rows, so the checkpoint stays small and the base LLM untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import FMRILMConfig
from .tasks import BRANCH, TEXT


@dataclass
class FMRIBlock:
    """One run's fMRI input: token ids (n,R), ROI embeddings (R,d), run embedding (e,), the
    tokenizer's continuous encoder features (n,R,c) when the checkpoint reads them, and the run
    readout (S,) when it has one (computed from the whole run, before any crop)."""

    ids: torch.Tensor
    roi: torch.Tensor
    run_emb: torch.Tensor
    feats: torch.Tensor | None = None
    readout: torch.Tensor | None = None


def fmri_block(ids, roi: torch.Tensor, run_emb, max_patches: int, rng=None, feats=None, readout=None) -> FMRIBlock:
    """A run as model input: a random crop of ``max_patches`` patches (``rng`` given, training)
    or its first ``max_patches`` patches (``feats``, when given, cropped alike)."""
    if len(ids) > max_patches:
        s = int(rng.integers(0, len(ids) - max_patches + 1)) if rng is not None else 0
        ids = ids[s:s + max_patches]
        feats = None if feats is None else feats[s:s + max_patches]
    return FMRIBlock(torch.as_tensor(ids, dtype=torch.long), roi, torch.as_tensor(run_emb, dtype=torch.float32),
                     None if feats is None else torch.as_tensor(np.asarray(feats, dtype=np.float32)),
                     None if readout is None else torch.as_tensor(np.asarray(readout, dtype=np.float32)))


class Projector(nn.Module):
    """Features (or code vectors) of a patch's ROIs -> ``M`` LLM positions, each pooling the ROIs
    (``slot_pooling``: a content-dependent softmax average, or a signed linear spatial filter), or
    one position per ROI (``"region"``)."""

    def __init__(self, code_dim: int, roi_dim: int, run_dim: int, hidden: int, cfg: FMRILMConfig, emb_norm: float,
                 readout_dim: int = 0):
        super().__init__()
        P, M = cfg.proj_dim, cfg.slots_per_patch
        self.M = M
        self.code_in = nn.Linear(code_dim, P)
        self.roi_in = nn.Linear(roi_dim, P)
        if cfg.slot_pooling not in ("softmax", "linear", "region"):
            raise ValueError(f"slot_pooling must be 'softmax', 'linear' or 'region', not {cfg.slot_pooling!r}")
        self.linear_pool = cfg.slot_pooling == "linear"
        self.per_region = cfg.slot_pooling == "region"
        if not self.per_region:
            self.queries = nn.Parameter(torch.randn(M, P) / math.sqrt(P))
            self.slot_pos = nn.Parameter(torch.zeros(M, P))
        self.out = nn.Sequential(nn.LayerNorm(P), nn.Linear(P, 2 * P), nn.GELU(), nn.Linear(2 * P, hidden))
        self.summary = nn.Sequential(nn.LayerNorm(run_dim), nn.Linear(run_dim, 2 * P), nn.GELU(), nn.Linear(2 * P, hidden))
        if readout_dim:
            # a linear map around a learned anchor: the LLM's RMS norm keeps the direction, so the
            # anchor keeps each score's sign and size readable after normalisation
            self.readout_in = nn.Linear(readout_dim, hidden)
            nn.init.normal_(self.readout_in.weight, std=0.5 / math.sqrt(readout_dim * hidden))
            nn.init.normal_(self.readout_in.bias, std=1.0 / math.sqrt(hidden))
        self.readout_dim = readout_dim
        if readout_dim and cfg.w_align > 0:
            # alignment head: run embedding (mean final hidden state over the fMRI block) -> readout
            self.align = nn.Linear(hidden, readout_dim)
        if cfg.w_recon > 0:
            # reconstruction head, bilinear: (hidden state) x (region's coordinate embedding) -> features
            D = cfg.head_dim
            self.recon_h = nn.Linear(hidden, D)
            self.recon_roi = nn.Linear(roi_dim, D)
            self.recon_out = nn.Linear(D, code_dim, bias=False)
        self.adapter = nn.ModuleList()  # readout -> residual stream of the top LLM layers (stage 3)
        if cfg.fmri_scale not in ("word", "legacy"):
            raise ValueError(f"fmri_scale must be 'word' or 'legacy', not {cfg.fmri_scale!r}")
        # a normalised vector has norm sqrt(hidden): "word" divides it out, so that the slots, the
        # summary and the markers are as large as the word embeddings around them
        self.unit = 1.0 / math.sqrt(hidden) if cfg.fmri_scale == "word" else 1.0
        self.markers = nn.Parameter(torch.randn(2, hidden) * emb_norm * self.unit)  # <fmri>, </fmri>
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.scale = nn.Parameter(torch.tensor(float(emb_norm)))  # learned; starts at the word embeddings' norm

    def positions_per_patch(self, n_rois: int) -> int:
        """LLM positions each time patch of a run with ``n_rois`` ROIs takes (``M``; R per region)."""
        return n_rois if self.per_region else self.M

    def forward(self, codes: torch.Tensor, roi: torch.Tensor, run_emb: torch.Tensor,
                readout: torch.Tensor | None = None) -> torch.Tensor:
        """codes (n,R,c), roi (R,d), run_emb (e,), readout (S,) -> (2 + n*M + 1 [+ 1], H):
        markers, slots, summary [, readout]; ``M`` is R with one position per region."""
        H = self.markers.shape[1]
        parts = [self.markers[:1]]
        if self.positions_per_patch(roi.shape[0]):
            r, v = self.roi_in(roi), self.code_in(codes)  # (R,P), (n,R,P)
            if self.per_region:  # no pooling: each region's features keyed by its coordinates
                slots = v + r[None]  # (n,R,P)
            elif self.linear_pool:  # signed weights from the coordinates alone, variance-preserving over R
                w = (r @ self.queries.t()).t() / math.sqrt(roi.shape[0])  # (M,R)
                slots = torch.einsum("mr,nrp->nmp", w, v) + self.slot_pos  # (n,M,P)
            else:
                k = v + r[None]
                att = torch.softmax(torch.einsum("nrp,mp->nmr", k, self.queries) / math.sqrt(k.shape[-1]), dim=-1)
                slots = torch.einsum("nmr,nrp->nmp", att, k) + self.slot_pos  # (n,M,P)
            parts.append(self.scale * self.unit * self.norm(self.out(slots)).reshape(-1, H))
        parts.append(self.scale * self.unit * self.norm(self.summary(run_emb[None])))
        if hasattr(self, "readout_in"):
            if readout is None:
                raise ValueError("this fMRI-LM reads a run readout; the block has none")
            parts.append(self.scale * self.readout_in(readout[None].to(self.markers.dtype)))
        return torch.cat(parts + [self.markers[1:]])

    def reconstruct(self, h: torch.Tensor, roi: torch.Tensor) -> torch.Tensor:
        """Final hidden states h (..., H) and ROI embeddings (R,d) -> features (..., R, c), affine in h."""
        g = self.recon_roi(roi)  # (R,D)
        return torch.einsum("...k,rkc->...rc", self.recon_h(h), g[:, :, None] * self.recon_out.weight.t()[None])

    def add_adapter(self, n_layers: int) -> None:
        """Zero-initialised maps readout -> hidden, one per top LLM layer: the model starts exactly
        as it was and instruction tuning learns how far each layer is moved."""
        if not self.readout_dim:
            raise ValueError("a readout adapter needs a run readout")
        H = self.markers.shape[1]
        while len(self.adapter) < n_layers:
            lin = nn.Linear(self.readout_dim, H).to(self.markers.device)
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
            self.adapter.append(lin)


class FMRIHead(nn.Module):
    """LLM hidden state at a patch -> logits over the codebook for every ROI of the next patch.

    Logits are the negative squared distances of a predicted code vector to every codebook entry
    (the quantizer's own geometry), standardised over the codebook so that their scale does not
    depend on the codebook's, times a learned sharpness, plus a learned log-prior of each code.
    """

    def __init__(self, hidden: int, roi_dim: int, code_dim: int, cfg: FMRILMConfig, codebook_size: int):
        super().__init__()
        D = cfg.head_dim
        self.h_in = nn.Linear(hidden, D)
        self.roi_in = nn.Linear(roi_dim, D)
        self.out = nn.Sequential(nn.GELU(), nn.LayerNorm(D), nn.Linear(D, code_dim))
        self.log_sharpness = nn.Parameter(torch.tensor(math.log(2.0)))
        self.prior = nn.Parameter(torch.zeros(codebook_size))

    def forward(self, h: torch.Tensor, roi: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """h (n,H), roi (R,d), codebook (K,c) -> logits (n,R,K)."""
        e = self.out(self.h_in(h)[:, None] + self.roi_in(roi)[None])  # (n,R,c)
        d = e.pow(2).sum(-1, keepdim=True) - 2 * e @ codebook.t() + codebook.pow(2).sum(-1)
        d = (d - d.mean(-1, keepdim=True)) / (d.std(-1, keepdim=True) + 1e-6)
        return -d * self.log_sharpness.exp() + self.prior


class FMRILM(nn.Module):
    """LLM (PEFT-wrapped) + projector + fMRI head. The tokenizer stays outside (frozen)."""

    def __init__(self, llm, text_tokenizer, codebook: torch.Tensor, roi_dim: int, run_dim: int, cfg: FMRILMConfig,
                 readout=None):
        super().__init__()
        self.cfg, self.llm, self.text_tokenizer = cfg, llm, text_tokenizer
        H = llm.config.hidden_size
        wemb = llm.get_input_embeddings().weight
        emb_norm = float(wemb.detach().float().pow(2).mean().sqrt()) * math.sqrt(H)  # a word embedding's norm (RMS)
        self.register_buffer("codebook", codebook.detach().float().clone(), persistent=False)
        self.readout = readout  # model.readout.Readout (frozen) or None
        self.projector = Projector(codebook.shape[1], roi_dim, run_dim, H, cfg, emb_norm,
                                   readout_dim=0 if readout is None else readout.dim)
        self.fmri_head = FMRIHead(H, roi_dim, codebook.shape[1], cfg, codebook.shape[0])
        self.calibration: dict[str, dict] = {}  # task name -> zero-shot answer calibration (model/calibration.py)
        self._conditioning: tuple[torch.Tensor, torch.Tensor] | None = None  # (src (B,L), readouts (N,S))
        self._hooked = 0

    def add_readout_adapter(self, n_layers: int) -> None:
        """Condition the top ``n_layers`` decoder layers on the run readout.

        After each of those layers, every text position that follows an fMRI block gets
        ``adapter_k(readout)`` added to its hidden state (the block's readout, the latest block's
        when a sequence holds several, as in few-shot prompts). The LLM reads the run once more at
        each of those layers, where a single readout position early in the sequence is hard to
        attend to for a few hundred CPU steps (cf. LLaMA-Adapter's zero-init gated prompts).
        Positions of and before the block are untouched, so next-patch prediction stays causal.
        """
        if n_layers <= 0:
            return
        self.projector.add_adapter(n_layers)
        backbone, _ = self._backbone()
        layers = backbone.layers
        if n_layers > len(layers):
            raise ValueError(f"readout adapter on {n_layers} layers; the LLM has {len(layers)}")
        for k in range(self._hooked, n_layers):
            layers[len(layers) - n_layers + k].register_forward_hook(self._adapter_hook(k))
        self._hooked = max(self._hooked, n_layers)

    def _adapter_hook(self, k: int):
        def hook(module, args, output):
            if self._conditioning is None:
                return output
            src, readouts = self._conditioning
            h = output[0] if isinstance(output, tuple) else output
            if h.shape[1] != src.shape[1]:  # incremental decoding: the new tokens follow the last block
                src = src[:, -1:].expand(-1, h.shape[1])
            vec = self.projector.adapter[k](readouts.to(self.projector.adapter[k].weight.dtype))  # (N,H)
            add = vec[src.clamp(min=0)] * (src >= 0)[..., None]
            h = h + add.to(h.dtype)
            return (h, *output[1:]) if isinstance(output, tuple) else h
        return hook

    class _Conditioned:
        def __init__(self, fm: "FMRILM", built: dict):
            self.fm, self.built = fm, built

        def __enter__(self):
            if len(self.fm.projector.adapter) and self.built.get("readouts") is not None:
                self.fm._conditioning = (self.built["readout_src"], self.built["readouts"])

        def __exit__(self, *exc):
            self.fm._conditioning = None

    def conditioned(self, built: dict) -> "FMRILM._Conditioned":
        """Context in which LLM passes over ``built`` see the readout adapter (no-op without one)."""
        return FMRILM._Conditioned(self, built)

    # ------------------------------------------------------------------ helpers
    def _backbone(self):
        """The decoder stack (LoRA layers injected) without the LM head."""
        m = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        return m.model, m.lm_head

    def fmri_input(self, blk: FMRIBlock) -> torch.Tensor:
        """What the projector reads of a block, (n,R,c): encoder features or codebook vectors."""
        dev = self.codebook.device
        if self.cfg.fmri_input == "features":
            if blk.feats is None:
                raise ValueError("this fMRI-LM reads encoder features; the block has token ids only")
            return blk.feats.to(dev)
        return self.codebook[blk.ids.to(dev)]

    def _encode_text(self, text: str) -> list[int]:
        return self.text_tokenizer(text, add_special_tokens=False)["input_ids"]

    def build(self, examples: list[list[tuple]], blocks: list[FMRIBlock], max_text_tokens: int | None = None):
        """Token ids, input embeddings and bookkeeping of a batch of segment lists (right padded).

        A ``(BRANCH,)`` segment starts a branch: what follows it, up to the next branch, attends to
        the shared prefix (everything before the first branch) and to itself only, at the positions
        it would have right after the prefix. Several questions (or answers) about one fMRI block
        thus cost one pass over the block, and each is scored as if asked alone.

        Returns a dict with ``embeds`` (B,L,H), ``mask`` (B,L), ``targets`` list of (b, pos, token),
        ``fmri`` list of (b, block index, first slot position, n patches), ``fmri_spans`` list of
        (b, start, end) for pooling, and ``branches`` {b: (prefix length, [(start, end), ...])}.
        """
        dev = self.codebook.device
        wemb = self.llm.get_input_embeddings()
        rows, targets, fmri, spans, branches = [], [], [], [], {}
        readouts, after = [], []  # readout of each block occurrence; (b, first position after it, index)
        for b, segs in enumerate(examples):
            pieces, pos = [], 0
            for seg in segs:
                if seg[0] == BRANCH:
                    prefix, spans_b = branches.setdefault(b, (pos, []))
                    if spans_b:
                        spans_b[-1] = (spans_b[-1][0], pos)
                    spans_b.append((pos, pos))
                    continue
                if seg[0] == TEXT:
                    ids = self._encode_text(seg[1])
                    if seg[2] and max_text_tokens:
                        ids = ids[:max_text_tokens]
                    if not ids:
                        continue
                    t = torch.tensor(ids, device=dev)
                    pieces.append(wemb(t))
                    if seg[2]:  # a target: predicted from the position before each token
                        start = branches[b][1][-1][0] if b in branches else 0
                        for j, tok in enumerate(ids):
                            q = pos + j - 1
                            if q < start:  # a branch's first token follows the shared prefix
                                q = branches[b][0] - 1 if b in branches else -1
                            if q >= 0:
                                targets.append((b, q, tok))
                    pos += len(ids)
                else:
                    if b in branches:
                        raise ValueError("fMRI blocks belong to the shared prefix, before any branch")
                    blk = blocks[seg[1]]
                    ro = None if blk.readout is None else blk.readout.to(dev)
                    v = self.projector(self.fmri_input(blk), blk.roi.to(dev), blk.run_emb.to(dev), ro)
                    v = v.to(pieces[0].dtype if pieces else wemb.weight.dtype)
                    n = blk.ids.shape[0]
                    fmri.append((b, seg[1], pos + 1, n))
                    spans.append((b, pos + 1, pos + v.shape[0] - 1))
                    pieces.append(v)
                    pos += v.shape[0]
                    if ro is not None:
                        after.append((b, pos, len(readouts)))
                        readouts.append(ro)
            rows.append(torch.cat(pieces))
            if b in branches:
                sp = branches[b][1]
                sp[-1] = (sp[-1][0], pos)
        L = max(r.shape[0] for r in rows)
        H = rows[0].shape[1]
        embeds = torch.zeros(len(rows), L, H, device=dev, dtype=rows[0].dtype)
        mask = torch.zeros(len(rows), L, dtype=torch.long, device=dev)
        for b, r in enumerate(rows):
            embeds[b, : r.shape[0]] = r
            mask[b, : r.shape[0]] = 1
        src = torch.full((len(rows), L), -1, dtype=torch.long, device=dev)
        for b, start, k in after:  # blocks come in order: a later block takes over what follows it
            src[b, start:] = k
        return {"embeds": embeds, "mask": mask, "targets": targets, "fmri": fmri, "spans": spans,
                "branches": branches, "readout_src": src,
                "readouts": torch.stack(readouts).float() if readouts else None}

    @staticmethod
    def attention(built: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention mask of a built batch: (B,L) padding mask, or with branches a (B,1,L,L)
        boolean mask (True = may attend) and (B,L) position ids."""
        mask = built["mask"]
        if not built.get("branches"):
            return mask, None
        B, L = mask.shape
        dev = mask.device
        causal = torch.tril(torch.ones(L, L, dtype=torch.bool, device=dev))
        allow = (causal[None] & mask.bool()[:, None, :]).clone()
        pos = torch.arange(L, device=dev).repeat(B, 1)
        for b, (prefix, sp) in built["branches"].items():
            for s, e in sp:
                allow[b, s:e, prefix:s] = False  # a branch does not see the branches before it
                pos[b, s:e] = torch.arange(prefix, prefix + e - s, device=dev)
        return allow[:, None], pos

    def hidden(self, built: dict) -> torch.Tensor:
        backbone, _ = self._backbone()
        mask, pos = self.attention(built)
        with self.conditioned(built):
            out = backbone(inputs_embeds=built["embeds"], attention_mask=mask, position_ids=pos)
        return out.last_hidden_state  # (B,L,H), after the final norm

    @staticmethod
    def run_embeddings(h: torch.Tensor, built: dict) -> torch.Tensor:
        """Run embeddings (n_blocks, H), in ``built["spans"]`` order: the mean final hidden state
        over each fMRI block's positions (what the participant level writes, and what ``w_align`` aligns)."""
        if not built["spans"]:
            return h.new_zeros((0, h.shape[-1]), dtype=torch.float32)
        return torch.stack([h[b, s:e].float().mean(0) for b, s, e in built["spans"]])

    def text_logprobs(self, h: torch.Tensor, targets: list[tuple]) -> torch.Tensor:
        """Log-probability of each target token (only target positions go through the LM head)."""
        if not targets:
            return h.new_zeros(0)
        _, lm_head = self._backbone()
        b = torch.tensor([t[0] for t in targets], device=h.device)
        p = torch.tensor([t[1] for t in targets], device=h.device)
        tok = torch.tensor([t[2] for t in targets], device=h.device)
        logits = lm_head(h[b, p]).float()
        return torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0]

    def fmri_logits(self, h: torch.Tensor, built: dict, blocks: list[FMRIBlock], include_last: bool = False):
        """Next-patch logits for each fMRI block: list of (block index, logits (n-1,R,K)).

        With ``include_last`` the logits are (n,R,K): the last row forecasts the patch after the block.
        """
        out = []
        for b, j, first, n in built["fmri"]:
            m = n if include_last else n - 1
            M = self.projector.positions_per_patch(blocks[j].roi.shape[0])
            if m < 1 or M == 0:  # M == 0: no patch positions, nothing to forecast from
                continue
            last_slots = first + M * torch.arange(1, m + 1, device=h.device) - 1  # last slot of patches 0..m-1
            out.append((j, self.fmri_head(h[b, last_slots].float(), blocks[j].roi.to(h.device), self.codebook)))
        return out

    def forward(self, examples: list[list[tuple]], blocks: list[FMRIBlock], kinds: list[str],
                weights: dict[str, float], fmri_weight: float, max_text_tokens: int | None = None,
                align_weight: float | None = None, recon_weight: float | None = None) -> dict:
        """Weighted training loss of a batch. ``kinds[b]`` names example b's objective;
        ``align_weight`` and ``recon_weight`` (default: the config's ``w_align``, ``w_recon``) weigh
        the run-embedding alignment and the feature reconstruction."""
        built = self.build(examples, blocks, max_text_tokens)
        h = self.hidden(built)
        lp = self.text_logprobs(h, built["targets"])
        losses, total = {}, h.new_zeros((), dtype=torch.float32)
        kind_of = torch.tensor([weights_index(kinds[t[0]]) for t in built["targets"]], device=h.device, dtype=torch.long) \
            if built["targets"] else None
        for i, kind in enumerate(KINDS):
            if kind_of is None or kind not in weights:
                continue
            sel = kind_of == i
            if sel.any():
                losses[kind] = -lp[sel].mean()
                total = total + weights[kind] * losses[kind]
        fl = self.fmri_logits(h, built, blocks)
        if fl and fmri_weight > 0:
            ce, correct, count = [], 0, 0
            for j, logits in fl:
                tgt = blocks[j].ids[1:].to(h.device)
                ce.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum"))
                correct += int((logits.argmax(-1) == tgt).sum())
                count += tgt.numel()
            losses["fmri"] = torch.stack(ce).sum() / count
            losses["fmri_acc"] = torch.tensor(correct / count)
            total = total + fmri_weight * losses["fmri"]
        align_weight = self.cfg.w_align if align_weight is None else align_weight
        if align_weight > 0 and hasattr(self.projector, "align"):
            keep = [i for i, (_, j, _, _) in enumerate(built["fmri"]) if blocks[j].readout is not None]
            if keep:
                pred = self.projector.align(self.run_embeddings(h, built)[keep])
                tgt = torch.stack([blocks[built["fmri"][i][1]].readout for i in keep]).to(h.device).float()
                losses["align"] = F.mse_loss(pred, tgt)
                total = total + align_weight * losses["align"]
        recon_weight = self.cfg.w_recon if recon_weight is None else recon_weight
        if recon_weight > 0 and hasattr(self.projector, "recon_h"):
            err = []
            for b, j, first, n in built["fmri"]:
                roi = blocks[j].roi.to(h.device)
                M = self.projector.positions_per_patch(roi.shape[0])
                if M == 0:
                    continue
                tgt = self.fmri_input(blocks[j]).float()  # (n,R,c)
                pred = self.projector.reconstruct(h[b, first:first + n * M].float().reshape(n, M, -1), roi)
                err.append(F.mse_loss(pred, tgt[:, None].expand_as(pred)) / tgt.var().clamp(min=1e-6))
            if err:
                losses["recon"] = torch.stack(err).mean()
                total = total + recon_weight * losses["recon"]
        losses["loss"] = total
        return losses


KINDS = ("text", "describe", "instruct")


def weights_index(kind: str) -> int:
    return KINDS.index(kind)

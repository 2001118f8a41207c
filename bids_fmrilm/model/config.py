"""fMRI-LM configurations (dataclasses saved in every checkpoint).

Presets:

- ``tiny``: a few steps in seconds, for tests (any small causal LM);
- ``cpu``: stages 2 and 3 on ABIDE with SmolLM2-135M on a 2-core CPU in under 2 hours;
- ``paper``: GPU sizes (more fMRI slots per patch, longer texts, larger LoRA rank).

Checkpoints written before ``fmri_input`` existed read codebook vectors (its default, ``codes``);
the presets read the tokenizer's continuous encoder features (``features``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..config import choose_preset, dataclass_from_dict


@dataclass
class FMRILMConfig:
    name: str = "cpu"
    # --- fMRI input to the LLM
    fmri_input: str = "codes"  # "features": the tokenizer's continuous encoder features; "codes": codebook vectors
    slots_per_patch: int = 1  # LLM positions per time patch (pooling over ROIs)
    # how a slot pools the ROIs: "softmax", a content-dependent convex average (attention); "linear",
    # signed weights set by each ROI's coordinate embedding alone, so a slot is a linear spatial
    # filter of the regions' features and region-specific differences are not averaged away;
    # "region", no pooling: one position per region and patch, as in the paper (slots_per_patch unused)
    slot_pooling: str = "softmax"
    max_patches: int = 12  # longer runs: the last max_patches patches (forecast) or a crop (training)
    proj_dim: int = 128  # projector width before the LLM hidden size
    # size of the fMRI positions and markers: "word", the LLM's mean word-embedding norm; "legacy",
    # sqrt(hidden) times that (checkpoints before 2026-12-07: 24x the word embeddings of SmolLM2)
    fmri_scale: str = "legacy"
    readout: bool = True  # one more position: the run readout (model/readout.py), fitted at stage 2
    readout_components: int = 16  # whitened principal components of the run vector in the readout
    readout_layers: int = 4  # stage 3 adds the readout to the residual stream of this many top layers
    w_align: float = 0.0  # the fMRI positions' mean final hidden state (the run embedding) must predict the readout
    # the final hidden state at every query position of a window must give back that window's encoder features
    # (Projector.reconstruct: affine in the hidden state, each region keyed by its coordinates); off in
    # every preset: at 60 stage-2 steps it did not lift the held-out embedding probe (README, stage-2 arms E, E10)
    w_recon: float = 0.0
    calibration_runs: int = 256  # training runs the stage-3 answer calibration is fitted on (0: none)
    head_dim: int = 128  # fMRI head width
    # --- LoRA (PEFT) on attention and MLP projections
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # --- stage 2 objectives (loss weights)
    w_text: float = 1.0  # text LM on descriptor texts
    w_fmri: float = 1.0  # fMRI -> fMRI next-patch token prediction (fMRI head)
    w_describe: float = 1.0  # fMRI -> descriptor text
    text_only_fraction: float = 0.25  # share of stage-2 examples that are text-only
    max_text_tokens: int = 64  # descriptor text truncated to this many tokens
    # --- stage 3
    w_instruct: float = 1.0
    w_fmri_instruct: float = 0.2  # keep the fMRI head trained during instruction tuning
    describe_fraction_instruct: float = 0.2  # stage-3 examples that stay fMRI -> description (keeps it)
    questions_per_example: int = 4  # stage-3 questions about one run, each in its own attention branch
    descriptor_questions: tuple[str, ...] = (
        "fc_within.mean", "fc_between.mean", "graph.modularity", "graph.global_efficiency", "falff.mean",
        "fc_within.DefaultMode", "alff.mean",
    )
    # --- optimisation
    batch_size: int = 8
    lr: float = 3e-4  # LoRA
    lr_new: float = 1e-3  # projector, markers, fMRI head
    weight_decay: float = 0.0
    warmup_steps: int = 20
    pretrain_steps: int = 300
    instruct_steps: int = 400
    grad_clip: float = 1.0
    log_every: int = 10
    checkpoint_every: int = 100
    gradient_checkpointing: bool = False
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        d["descriptor_questions"] = list(self.descriptor_questions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FMRILMConfig":
        return dataclass_from_dict(cls, d, tuples=("lora_targets", "descriptor_questions"))


CONFIGS: dict[str, FMRILMConfig] = {
    "tiny": FMRILMConfig(name="tiny", fmri_input="features", slots_per_patch=2, max_patches=3, proj_dim=16, head_dim=16, lora_r=4,
                         lora_alpha=8, lora_dropout=0.0, max_text_tokens=24, batch_size=4, lr=3e-3, lr_new=3e-3,
                         warmup_steps=1, pretrain_steps=6, instruct_steps=6, log_every=2, checkpoint_every=3,
                         readout_layers=1, calibration_runs=16, descriptor_questions=("fc_within.mean", "graph.modularity")),
    # 32 learned queries per 160-volume window read the region features (runs up to 3 windows),
    # one position the run readout; the packaged default's step counts (about 100 min on 2 cores).
    # w_align stays off: it lifted the held-out embedding probe at 60 stage-2 steps, but the full
    # 150 + 150-step retrain with it lowered it below the packaged default's
    # (docs/model-development.md, "Run-embedding alignment"); --set w_align=1 turns it on
    "cpu": FMRILMConfig(fmri_input="features", slots_per_patch=32, max_patches=3, pretrain_steps=150,
                        instruct_steps=150, checkpoint_every=25),
    # fmri_scale: the cpu preset keeps the packaged default's "legacy" size (docs/model-development.md,
    # "The size of the fMRI positions"); paper trains at the word embeddings' size (--set fmri_scale=word for cpu)
    "paper": FMRILMConfig(name="paper", fmri_input="features", fmri_scale="word", slots_per_patch=64, max_patches=4,
                          proj_dim=512, head_dim=512, lora_r=64,
                          lora_alpha=128, max_text_tokens=384, batch_size=32, lr=2e-4, lr_new=5e-4,
                          warmup_steps=500, pretrain_steps=20_000, instruct_steps=10_000, log_every=50,
                          checkpoint_every=1000, gradient_checkpointing=True),
}


def get_config(name_or_config: str | FMRILMConfig, **overrides) -> FMRILMConfig:
    """A preset by name (``tiny``, ``cpu``, ``paper``) or a config, with field overrides."""
    return choose_preset(CONFIGS, name_or_config, "fMRI-LM", **overrides)

"""One configuration object for a BIDS-App invocation.

The command line fills a :class:`Config`; every step reads the fields it needs from it. It is
plain data, so it can be written next to the outputs and compared on re-runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class SignalSettings:
    """Settings of the signal pipeline (atlas to cleaned ROI time series)."""

    atlas: str = "seitzman300"
    target_tr: float = 2.0
    high_pass: float | None = 0.008
    low_pass: float | None = None
    detrend: bool = True
    confound_strategy: tuple[str, ...] = ("motion", "derivatives", "wm_csf")
    min_volumes: int = 16
    chunk_volumes: int = 32
    sphere_radius_mm: float = 5.0

    def digest(self) -> str:
        """Short hash of the settings, used to detect changed settings on re-runs."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class Config:
    """Everything one ``bids_fmrilm`` call needs to know."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    participant_label: tuple[str, ...] = ()
    session_label: tuple[str, ...] = ()
    task: tuple[str, ...] = ()
    bids_filters: dict[str, Any] = field(default_factory=dict)
    derivatives: tuple[Path, ...] = ()
    model: str | None = None
    device: str = "auto"
    quantization: str = "auto"
    work_dir: Path | None = None
    nprocs: int = 1
    skip_bids_validation: bool = False
    seed: int = 0
    force: bool = False
    label: str | None = None
    labels_file: Path | None = None
    task_type: str = "auto"
    cv_group: str | None = None
    folds: int = 5
    shots: tuple[str, ...] = ("8", "32", "all")  # group level: few-shot K per class for the learning curve
    adapt_steps: int = 20  # group level: LoRA optimisation steps per adaptation
    adapt_validation: float = 0.25  # group level: share of the shots held out for early stopping
    adapter: Path | None = None  # participant level: a group-level adapter used beside the checkpoint
    debug: bool = False
    descriptor_reference: Path | None = None
    signals: SignalSettings = field(default_factory=SignalSettings)
    preproc: str = "auto"  # raw native-space BOLD: "auto"/"minimal" run preprocessing/, "none" refuses it
    save_preproc: bool = False  # also write the preprocessed BOLD series
    omp_nthreads: int = 0  # threads per run for ANTs/ITK; 0: CPUs / nprocs

    def threads_per_run(self) -> int:
        """ANTs/ITK threads for one run (``--omp-nthreads``, else the CPUs shared by ``--nprocs``)."""
        import os

        if self.omp_nthreads and self.omp_nthreads > 0:
            return int(self.omp_nthreads)
        return max(1, (os.cpu_count() or 1) // max(1, int(self.nprocs)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view of the configuration."""
        d = dataclasses.asdict(self)
        return json.loads(json.dumps(d, default=str))


def dataclass_from_dict(cls, d: dict[str, Any], tuples: tuple[str, ...] = ()):
    """Build dataclass ``cls`` from a dict, ignoring unknown keys (older or newer checkpoints);
    fields named in ``tuples`` are converted from JSON lists."""
    known = {f.name for f in dataclasses.fields(cls)}
    kw = {k: (tuple(v) if k in tuples and v is not None else v) for k, v in d.items() if k in known}
    return cls(**kw)


def choose_preset(presets: dict[str, Any], name_or_config: Any, what: str, **overrides):
    """A copy of preset ``name_or_config`` (a name in ``presets`` or a config object) with field overrides."""
    if isinstance(name_or_config, str):
        if name_or_config not in presets:
            raise KeyError(f"unknown {what} config {name_or_config!r}; choose from {', '.join(presets)}")
        name_or_config = presets[name_or_config]
    return dataclasses.replace(name_or_config, **overrides)

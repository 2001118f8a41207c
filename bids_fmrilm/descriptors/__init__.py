"""Descriptor corpus: imaging-derived features of each run as z-scored, structured text.

Following fMRI-LM (arXiv 2511.21760), each run's ROI time series are summarised by
scale-free features (:func:`compute_features`), z-scored against a reference population
(:func:`build_reference`, :func:`zscore`), mapped to categorical levels (:func:`level_of`) and
verbalised (:func:`describe`); :func:`build_corpus_from_dir` writes one JSON line per run.
"""

from .corpus import (
    build_corpus,
    build_corpus_from_dir,
    compute_records,
    corpus_line,
    read_corpus,
    read_phenotype,
    run_features,
    run_record,
)
from .features import GRAPH_DENSITY, compute_features, feature_keys, signal_mask
from .reference import build_reference, load_reference, robust_scale, save_reference, zscore
from .text import describe, feature_subject, level_of, network_name, verbal_level

__all__ = [
    "GRAPH_DENSITY",
    "build_corpus",
    "build_corpus_from_dir",
    "build_reference",
    "compute_features",
    "compute_records",
    "corpus_line",
    "describe",
    "feature_keys",
    "feature_subject",
    "level_of",
    "load_reference",
    "network_name",
    "read_corpus",
    "read_phenotype",
    "robust_scale",
    "run_features",
    "run_record",
    "save_reference",
    "signal_mask",
    "verbal_level",
    "zscore",
]

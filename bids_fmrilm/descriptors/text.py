"""Structured text descriptors from z-scored imaging features.

Each z-score maps to a categorical level (:func:`level_of`, usable as a training target) and to a
verbal phrase (:func:`verbal_level`, e.g. ``"markedly lower than average (z=-2.1)"``).
:func:`describe` turns a run's features into a short paragraph: a fixed core set of descriptors
(:data:`CORE_FEATURES`) plus the remaining features with the largest ``|z|``, at most
:data:`MAX_DESCRIPTORS` sentences, each in one of several phrasings chosen by a seeded generator.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

MARKED_Z = 2.0
"""``|z|`` at or above which a feature is *markedly* lower/higher than average."""

MILD_Z = 1.0
"""``|z|`` at or above which a feature is lower/higher than average (else typical)."""

LEVELS = ("markedly_lower", "lower", "typical", "higher", "markedly_higher")
"""Categorical levels, ordered; ``"unavailable"`` is used for missing z-scores."""

UNAVAILABLE = "unavailable"

LEVEL_PHRASES = {
    "markedly_lower": "markedly lower than average",
    "lower": "lower than average",
    "typical": "typical",
    "higher": "higher than average",
    "markedly_higher": "markedly higher than average",
    UNAVAILABLE: "unavailable",
}

CORE_FEATURES = (
    "fc_within.mean",
    "fc_between.mean",
    "graph.modularity",
    "graph.global_efficiency",
    "falff.mean",
    "motion.fd_mean",
)
"""Descriptors always included when available, in this order."""

MAX_DESCRIPTORS = 10
"""Most descriptor sentences in one description."""

NETWORK_NAMES = {
    "DefaultMode": "default mode",
    "Visual": "visual",
    "FrontoParietal": "frontoparietal",
    "DorsalAttention": "dorsal attention",
    "VentralAttention": "ventral attention",
    "SalienceVentralAttention": "salience/ventral attention",
    "Salience": "salience",
    "CinguloOpercular": "cingulo-opercular",
    "SomatomotorDorsal": "dorsal somatomotor",
    "SomatomotorLateral": "lateral somatomotor",
    "Somatomotor": "somatomotor",
    "Auditory": "auditory",
    "Reward": "reward",
    "MedialTemporalLobe": "medial temporal lobe",
    "ParietoMedial": "parieto-medial",
    "Limbic": "limbic",
    "Subcortical": "subcortical",
    "Cerebellum": "cerebellar",
}

_FAMILY_SUBJECTS = {
    "fc_within": "within-network connectivity of the {net} network",
    "amplitude": "relative signal amplitude in the {net} network",
    "alff": "low-frequency amplitude (ALFF) in the {net} network",
    "falff": "fractional low-frequency amplitude (fALFF) in the {net} network",
    "power_ratio": "low-to-high frequency power ratio in the {net} network",
    "autocorr1": "temporal autocorrelation in the {net} network",
}

_GLOBAL_SUBJECTS = {
    "fc_within.mean": "average within-network connectivity",
    "fc_between.mean": "average between-network connectivity",
    "fc.mean": "average whole-brain connectivity",
    "fc.segregation": "network segregation (within minus between connectivity)",
    "graph.global_efficiency": "global efficiency of the functional graph",
    "graph.modularity": "modularity of the functional graph",
    "graph.clustering": "clustering of the functional graph",
    "graph.strength": "mean node strength of the functional graph",
    "alff.mean": "whole-brain low-frequency amplitude (ALFF)",
    "falff.mean": "whole-brain fractional low-frequency amplitude (fALFF)",
    "power_ratio.mean": "whole-brain low-to-high frequency power ratio",
    "autocorr1.mean": "whole-brain temporal autocorrelation",
    "motion.fd_mean": "head motion (mean framewise displacement)",
    "motion.fd_max": "peak head motion (maximum framewise displacement)",
    "motion.fd_frac_gt_0p5": "fraction of high-motion volumes",
}

_TEMPLATES = (
    "{Subject} is {level}.",
    "The {subject} was {level}.",
    "Compared with the reference population, {subject} is {level}.",
    "{Subject}: {level}.",
    "Relative to the reference, the {subject} appears {level}.",
    "This run shows {subject} that is {level}.",
)

_OPENINGS = (
    "Resting-state fMRI summary.",
    "Summary of this fMRI run relative to the reference population.",
    "Descriptors of this run's functional signals.",
    "Imaging-derived description of the scan.",
)


def level_of(z: float | None) -> str:
    """Categorical level of a z-score.

    Parameters
    ----------
    z : float or None

    Returns
    -------
    str
        ``"markedly_lower"`` (z <= -:data:`MARKED_Z`), ``"lower"`` (z <= -:data:`MILD_Z`),
        ``"typical"``, ``"higher"`` (z >= :data:`MILD_Z`), ``"markedly_higher"``
        (z >= :data:`MARKED_Z`), or ``"unavailable"`` for ``None``/non-finite values.
    """
    if z is None:
        return UNAVAILABLE
    try:
        z = float(z)
    except (TypeError, ValueError):
        return UNAVAILABLE
    if not np.isfinite(z):
        return UNAVAILABLE
    if z <= -MARKED_Z:
        return "markedly_lower"
    if z <= -MILD_Z:
        return "lower"
    if z >= MARKED_Z:
        return "markedly_higher"
    if z >= MILD_Z:
        return "higher"
    return "typical"


def verbal_level(z: float | None) -> str:
    """Phrase for a z-score, e.g. ``"markedly lower than average (z=-2.1)"``."""
    level = level_of(z)
    if level == UNAVAILABLE:
        return LEVEL_PHRASES[UNAVAILABLE]
    return level_phrase(level, z)


_LEVEL_RANGES = {"markedly_lower": (-np.inf, -MARKED_Z), "lower": (round(0.1 - MARKED_Z, 1), -MILD_Z),
                 "typical": (round(0.1 - MILD_Z, 1), round(MILD_Z - 0.1, 1)),
                 "higher": (MILD_Z, round(MARKED_Z - 0.1, 1)), "markedly_higher": (MARKED_Z, np.inf)}


def z_within_level(z: float, level: str) -> float:
    """``z`` rounded to one decimal and moved to the nearest value :func:`level_of` reads as ``level``.

    The number a description states beside a level chosen elsewhere: an estimate of the
    z-score that disagrees with the stated level would contradict it in the same sentence.
    """
    lo, hi = _LEVEL_RANGES[level]
    return float(np.clip(round(float(z), 1), lo, hi)) + 0.0


def level_phrase(level: str, z: float | None = None) -> str:
    """The phrase stating ``level``, with ``z`` as a description writes it when given:
    ``level_phrase("lower", -1.4)`` is ``"lower than average (z=-1.4)"``."""
    phrase = LEVEL_PHRASES[level]
    return phrase if z is None else f"{phrase} (z={round(float(z), 1) + 0.0:.1f})"  # + 0.0: -0.0 -> 0.0


def network_name(network: str) -> str:
    """Human-readable network name (``"DefaultMode"`` -> ``"default mode"``)."""
    if network in NETWORK_NAMES:
        return NETWORK_NAMES[network]
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", network).replace("_", " ").lower()


def feature_subject(key: str) -> str:
    """Noun phrase naming a feature, e.g. ``"connectivity between the default mode and visual networks"``."""
    if key in _GLOBAL_SUBJECTS:
        return _GLOBAL_SUBJECTS[key]
    family, _, rest = key.partition(".")
    if family == "fc_between" and "-" in rest:
        a, b = rest.split("-", 1)
        return f"connectivity between the {network_name(a)} and {network_name(b)} networks"
    if family in _FAMILY_SUBJECTS:
        return _FAMILY_SUBJECTS[family].format(net=network_name(rest))
    return key.replace("_", " ").replace(".", " ")


def select_descriptors(z: Mapping[str, float | None], max_descriptors: int = MAX_DESCRIPTORS) -> list[str]:
    """Keys to describe: available core features, then the others by decreasing ``|z|``.

    Ties are broken by key name so the selection is deterministic.
    """

    def ok(k):
        return level_of(z.get(k)) != UNAVAILABLE

    chosen = [k for k in CORE_FEATURES if k in z and ok(k)][:max_descriptors]
    rest = sorted((k for k in z if k not in chosen and ok(k)), key=lambda k: (-abs(float(z[k])), k))
    return chosen + rest[: max(0, max_descriptors - len(chosen))]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def describe(
    features: Mapping[str, float | None],
    z: Mapping[str, float | None],
    seed: int,
    max_descriptors: int = MAX_DESCRIPTORS,
) -> str:
    """Short paragraph of structured descriptor sentences for one run.

    Parameters
    ----------
    features : dict
        Raw feature values (used for values quoted in the text, e.g. motion in mm).
    z : dict
        z-scores of the same features against a reference (``None`` = unavailable).
    seed : int
        Seed of the phrasing choice; the same seed gives the same text, different seeds usually
        different wordings and orders of the non-core sentences.
    max_descriptors : int
        Most descriptor sentences.

    Returns
    -------
    str
        One opening sentence and at most ``max_descriptors`` descriptor sentences.
    """
    rng = np.random.default_rng(seed)
    keys = select_descriptors(z, max_descriptors)
    n_core = sum(k in CORE_FEATURES for k in keys)
    tail = keys[n_core:]
    if len(tail) > 1:
        tail = [tail[i] for i in rng.permutation(len(tail))]
    sentences = [_OPENINGS[int(rng.integers(len(_OPENINGS)))]]
    for key in keys[:n_core] + tail:
        subject = feature_subject(key)
        value = features.get(key)
        if key == "motion.fd_mean" and value is not None:
            subject = f"{subject} of {float(value):.2f} mm"
        template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
        sentences.append(template.format(Subject=_cap(subject), subject=subject, level=verbal_level(z[key])))
    if len(sentences) == 1:
        sentences.append("No imaging descriptor could be computed for this run.")
    return " ".join(sentences)


_LEVEL_PATTERN = re.compile(
    r"(markedly lower than average|markedly higher than average|lower than average|higher than average|typical)")
_PHRASE_LEVELS = {v: k for k, v in LEVEL_PHRASES.items() if k != UNAVAILABLE}


_STATED_Z = re.compile(_LEVEL_PATTERN.pattern + r" \(z=(-?\d+(?:\.\d+)?)\)")


def drop_contradicting_z(text: str) -> str:
    """``text`` without the ``(z=...)`` that follow a level phrase they contradict
    (``"lower than average (z=0.4)"`` becomes ``"lower than average"``); consistent ones stay."""
    def keep(m: re.Match) -> str:
        return m.group(0) if level_of(float(m.group(2))) == _PHRASE_LEVELS[m.group(1)] else m.group(1)

    return _STATED_Z.sub(keep, text)


def parse_levels(text: str, keys) -> dict[str, str]:
    """Levels a (generated) description states for the given feature keys.

    For each key whose :func:`feature_subject` appears in ``text``, the first level phrase after
    it in the same sentence. Keys not mentioned (or without a level) are absent.
    """
    out: dict[str, str] = {}
    low = text.lower()
    for key in keys:
        subject = feature_subject(key).lower()
        start = low.find(subject)
        if start < 0:
            continue
        rest = low[start + len(subject):]
        end = rest.find(". ")
        m = _LEVEL_PATTERN.search(rest if end < 0 else rest[:end + 1])
        if m:
            out[key] = _PHRASE_LEVELS[m.group(1)]
    return out


def pending_level(text: str, levels: Mapping[str, str], numbers: Mapping[str, float] | None = None
                  ) -> tuple[str, int] | None:
    """The level phrase a description being written is about to state, for guided decoding.

    Parameters
    ----------
    text : str
        The description so far.
    levels : mapping
        Feature key -> level (``"lower"``, ``"typical"``, ...) the description must state.
    numbers : mapping, optional
        Feature key -> the z-score to state after the level (:func:`level_phrase`), which then ends
        the sentence as in every training description (else the model goes on to state a number
        of its own); keys without one end the phrase at the level.

    Returns
    -------
    tuple or None
        ``(phrase, begun)`` when the current sentence names the subject of a key of ``levels``
        and states no level after it yet: the key's level phrase and how many of its characters
        already end ``text`` (0 before the phrase starts). None otherwise.
    """
    low = text.lower()
    cut = low.rfind(". ")
    sentence = low[cut + 2:] if cut >= 0 else low
    best = None  # (end of the subject, its length, phrase): the last subject named, the longest on ties
    for key, level in levels.items():
        subject = feature_subject(key).lower()
        i = sentence.rfind(subject)
        if i >= 0 and (best is None or (i + len(subject), len(subject)) > best[:2]):
            z = (numbers or {}).get(key)
            best = (i + len(subject), len(subject), level_phrase(level, z) + ("" if z is None else "."))
    if best is None:
        return None
    tail, phrase = sentence[best[0]:], best[2]
    if phrase in tail:
        return None
    for j in range(len(phrase) - 1, 0, -1):  # part of the phrase written (the level, not yet its number)
        if tail.endswith(phrase[:j]) and (len(tail) == j or tail[-j - 1] in " :("):
            return phrase, j
    if _LEVEL_PATTERN.search(tail):
        return None
    return phrase, 0


def drop_repeated_features(text: str, keys) -> str:
    """``text`` up to the first sentence that names a feature of ``keys`` an earlier sentence named.

    A generated description that starts describing a feature again has begun to loop; what
    follows adds nothing and may contradict the first statement.
    """
    subjects = [feature_subject(k).lower() for k in keys]
    seen: set[str] = set()
    parts = text.split(". ")
    for i, sentence in enumerate(parts):
        named = {s for s in subjects if s in sentence.lower()}
        if named & seen:
            return ". ".join(parts[:i]) + "."
        seen |= named
    return text

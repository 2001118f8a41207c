"""Batched inference on fMRI blocks: constrained answers, embeddings, descriptions, next patches.

Everything here runs in eval mode under ``torch.no_grad`` and is deterministic (greedy decoding).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..descriptors.text import LEVEL_PHRASES, drop_contradicting_z, drop_repeated_features, pending_level
from .calibration import apply_calibration
from .fmrilm import FMRILM, FMRIBlock
from .tasks import TEXT, Task, describe_segments, few_shot_segments, multi_instruction_segments


def _chunks(n: int, size: int):
    for s in range(0, n, size):
        yield range(s, min(n, s + size))


@torch.no_grad()
def score_options(fm: FMRILM, blocks: Sequence[FMRIBlock], task: Task, batch_size: int = 16,
                  shots: Sequence[tuple[int, str]] | None = None, shot_blocks: Sequence[FMRIBlock] = ()) -> np.ndarray:
    """Class probabilities (n_runs, n_answers) of a task's allowed answers for each block.

    Each answer's score is the summed log-probability of its tokens after the prompt; a softmax
    over the allowed answers turns scores into probabilities (constrained decoding: the model
    cannot answer outside the task's answers). With ``shots`` ((index into ``shot_blocks``,
    answer) pairs) the prompt is few-shot. The answers of a run are branches after one shared
    prompt (one pass over the fMRI block for all of them).
    """
    return score_tasks(fm, blocks, [task], batch_size, shots, shot_blocks)[0]


@torch.no_grad()
def score_tasks(fm: FMRILM, blocks: Sequence[FMRIBlock], tasks: Sequence[Task], batch_size: int = 8,
                shots: Sequence[tuple[int, str]] | None = None,
                shot_blocks: Sequence[FMRIBlock] = (), calibrated: bool = True) -> list[np.ndarray]:
    """:func:`score_options` of several tasks, one (n_runs, n_answers) array per task.

    Without shots, every (task, answer) of a run is a branch after the run's fMRI block (each
    sees the block and its own question only), so a run costs one forward pass for all tasks,
    and a task the checkpoint has an answer calibration for (``fm.calibration``,
    :mod:`~bids_fmrilm.model.calibration`) gets calibrated probabilities unless ``calibrated``
    is False.
    """
    fm.eval()
    all_blocks = list(shot_blocks) + list(blocks)
    off = len(shot_blocks)
    scores = [np.zeros((len(blocks), len(t.answers))) for t in tasks]
    if shots:  # few-shot: a separate sequence per (run, answer)
        for ti, task in enumerate(tasks):
            pairs = [(i, a) for i in range(len(blocks)) for a in range(len(task.answers))]
            for chunk in _chunks(len(pairs), batch_size):
                examples = [few_shot_segments(task, shots, off + pairs[k][0]) + [(TEXT, " " + task.answers[pairs[k][1]], True)]
                            for k in chunk]
                built = fm.build(examples, all_blocks)
                lp = fm.text_logprobs(fm.hidden(built), built["targets"]).float().cpu().numpy()
                rows = np.array([t[0] for t in built["targets"]])
                for b, k in enumerate(chunk):
                    scores[ti][pairs[k]] = lp[rows == b].sum()
    else:
        for chunk in _chunks(len(blocks), batch_size):
            for ti, sc in enumerate(answer_scores(fm, [blocks[i] for i in chunk], tasks)):
                scores[ti][list(chunk)] = sc.float().cpu().numpy()
    out = []
    names = readouts = None
    if calibrated and not shots and getattr(fm, "readout", None) is not None:
        readouts = block_readouts(blocks)
        names = None if readouts is None else fm.readout.names
    for task, sc in zip(tasks, scores):
        sc = sc - sc.max(1, keepdims=True)
        p = np.exp(sc)
        p = p / p.sum(1, keepdims=True)
        if calibrated and not shots:
            p = apply_calibration(p, getattr(fm, "calibration", {}).get(task.name), task.answers, readouts, names)
        out.append(p)
    return out


def answer_scores(fm: FMRILM, blocks: Sequence[FMRIBlock], tasks: Sequence[Task]) -> list[torch.Tensor]:
    """Summed log-probabilities of each answer after each block's question, one (n_blocks,
    n_answers) tensor per task, with gradients unless the caller turns them off (few-shot
    training). Every (task, answer) of a block is a branch after the block: one pass per block."""
    qa = [(task, a) for task in tasks for a in task.answers]
    built = fm.build([multi_instruction_segments(i, qa) for i in range(len(blocks))], list(blocks))
    lp = fm.text_logprobs(fm.hidden(built), built["targets"])
    rows = torch.tensor([t[0] for t in built["targets"]], device=lp.device)
    n_tok = [len(fm._encode_text(" " + a)) for _, a in qa]
    sums = []
    for b in range(len(blocks)):
        vals = lp[rows == b]
        assert len(vals) == sum(n_tok), "answer tokens and targets disagree"
        sums.append(torch.stack([part.sum() for part in torch.split(vals, n_tok)]))
    per_answer = torch.stack(sums)
    return list(torch.split(per_answer, [len(t.answers) for t in tasks], dim=1))


def block_readouts(blocks: Sequence[FMRIBlock]) -> np.ndarray | None:
    """The blocks' run readouts (n_blocks, S), or None when there are no blocks or one has none."""
    if not len(blocks) or any(b.readout is None for b in blocks):
        return None
    return np.stack([b.readout.float().cpu().numpy() for b in blocks])


@torch.no_grad()
def embed_blocks(fm: FMRILM, blocks: Sequence[FMRIBlock], batch_size: int = 16) -> np.ndarray:
    """Run embeddings (n_runs, hidden): mean final hidden state over each fMRI block's positions."""
    fm.eval()
    out = []
    for chunk in _chunks(len(blocks), batch_size):
        built = fm.build([describe_segments(i) for i in chunk], list(blocks))
        out.append(fm.run_embeddings(fm.hidden(built), built).cpu().numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, fm.llm.config.hidden_size), np.float32)


@torch.no_grad()
def generate_descriptions(fm: FMRILM, blocks: Sequence[FMRIBlock], max_new_tokens: int = 64,
                          levels: Sequence[dict[str, str]] | None = None,
                          numbers: Sequence[dict[str, float]] | None = None) -> list[str]:
    """Greedy descriptions after ``<fmri>...</fmri> Description:`` (one run at a time).

    With ``levels`` (one ``{feature key: level}`` per block, e.g. from :func:`description_levels`)
    decoding is guided: wherever the model starts to state the level of one of those features,
    the level phrase is the given one (:class:`LevelGuide`), followed by the z-score of ``numbers``
    (one ``{feature key: z}`` per block, :func:`description_numbers`) where it has one; everything
    else, including which features it describes and the text after the level, is the model's own
    greedy choice. In a guided description a number the model wrote itself is dropped where it
    contradicts the level (:func:`~bids_fmrilm.descriptors.text.drop_contradicting_z`), and the
    text ends before a sentence that describes a feature a second time
    (:func:`~bids_fmrilm.descriptors.text.drop_repeated_features`).
    """
    fm.eval()
    texts = []
    tok = fm.text_tokenizer
    for i in range(len(blocks)):
        built = fm.build([describe_segments(i)], list(blocks))
        guide = None
        if levels is not None and levels[i]:
            guide = LogitsProcessorList([LevelGuide(tok, levels[i], numbers[i] if numbers is not None else None)])
        with fm.conditioned(built):
            ids = fm.llm.generate(inputs_embeds=built["embeds"], attention_mask=built["mask"],
                                  max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id, logits_processor=guide)
        text = tok.decode(ids[0], skip_special_tokens=True).strip()
        texts.append(drop_contradicting_z(drop_repeated_features(text, levels[i])) if guide is not None else text)
    return texts


_LEVEL_WORDS = tuple(dict.fromkeys(p.split()[0] for p in LEVEL_PHRASES.values()))  # markedly, lower, ...


class LevelGuide(LogitsProcessor):
    """Logits processor (``transformers`` protocol) that makes a description state given levels.

    At each step the text so far is checked with
    :func:`~bids_fmrilm.descriptors.text.pending_level`: once a sentence names a guided feature
    and the model's next token would begin a level word, the target level phrase is forced token
    by token instead, with its z-score and the sentence's full stop where ``numbers`` gives one
    (``"lower than average (z=-1.4)."``). The model keeps choosing the sentence, the features and
    what follows.
    One sequence at a time (``generate_descriptions`` decodes runs one by one).
    """

    def __init__(self, tokenizer, levels: dict[str, str], numbers: dict[str, float] | None = None):
        self.tokenizer, self.levels, self.numbers = tokenizer, dict(levels), dict(numbers or {})

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        text = self.tokenizer.decode(input_ids[0], skip_special_tokens=True)
        pending = pending_level(text, self.levels, self.numbers)
        if pending is None:
            return scores
        phrase, begun = pending
        if begun:
            rest = phrase[begun:]
        else:
            nxt = self.tokenizer.decode([int(scores[0].argmax())])
            word = nxt.strip().lower()
            starts_word = nxt[:1].isspace() or not text or text[-1] in " :("
            if not (starts_word and len(word) >= 2 and any(w.startswith(word) or word.startswith(w) for w in _LEVEL_WORDS)):
                return scores
            rest = (" " if nxt[:1].isspace() else "") + phrase
        if not rest:
            return scores
        forced = self.tokenizer.encode(rest, add_special_tokens=False)[0]
        if int(scores[0].argmax()) == forced:  # the model says it anyway
            return scores
        out = torch.full_like(scores, float("-inf"))
        out[:, forced] = 0.0
        return out


def _descriptor_calibration(task: Task, calibration: dict | None, readouts: np.ndarray | None,
                            readout_names: Sequence[str] | None) -> tuple[str | None, dict | None, np.ndarray | None]:
    """(feature key, the task's calibration where it applies, its level map's z estimates) of a
    descriptor task; the key is None for any other task, the rest None where missing."""
    from .calibration import applies, level_z

    kind, _, key = task.source.partition(":")
    if kind != "descriptor":
        return None, None, None
    cal = (calibration or {}).get(task.name)
    if not applies(cal, task.answers):
        return key, None, None
    return key, cal, level_z(cal, readouts, readout_names)


def description_levels(tasks: Sequence[Task], probas: Sequence[np.ndarray], calibration: dict | None = None,
                       readouts: np.ndarray | None = None, readout_names: Sequence[str] | None = None
                       ) -> list[dict[str, str]]:
    """Per run, the level of each descriptor the model's answers state: ``{feature key: level}``.

    ``probas`` are :func:`score_tasks` outputs of ``tasks`` (calibrated). A calibration is fitted
    class-balanced, so its probabilities assume equal levels; the stated level is the most probable
    one under the training runs' level frequencies (its ``class_counts``), the choice that is most
    often right, as a description should be. With the runs' ``readouts`` (n_runs, S) and the
    readout's value names, a calibration's ``level_map``
    (:func:`~bids_fmrilm.model.calibration.fit_level_map`) turns "lower" or "higher" into
    "markedly lower" or "markedly higher" where its z estimate is beyond
    :data:`~bids_fmrilm.descriptors.text.MARKED_Z` on the same side.
    """
    from ..descriptors.text import MARKED_Z

    n = len(probas[0]) if len(probas) else 0
    out: list[dict[str, str]] = [{} for _ in range(n)]
    for task, p in zip(tasks, probas):
        key, cal, z = _descriptor_calibration(task, calibration, readouts, readout_names)
        if key is None or list(task.answers) != ["lower", "typical", "higher"]:
            continue
        prior = np.asarray(cal["class_counts"], np.float64) + 1.0 if cal and cal.get("class_counts") \
            else np.ones(len(task.answers))
        for r, a in enumerate((np.asarray(p) * prior).argmax(1)):
            level = task.answers[int(a)]
            if z is not None and abs(z[r]) >= MARKED_Z and level == ("higher" if z[r] > 0 else "lower"):
                level = f"markedly_{level}"
            out[r][key] = level
    return out


def description_numbers(tasks: Sequence[Task], levels: Sequence[dict[str, str]], calibration: dict | None = None,
                        readouts: np.ndarray | None = None, readout_names: Sequence[str] | None = None
                        ) -> list[dict[str, float]]:
    """Per run, the z-score a description states beside each level of ``levels``
    (:func:`description_levels`): the calibration's ``level_map`` estimate
    (:func:`~bids_fmrilm.model.calibration.level_z`) moved into the stated level's range
    (:func:`~bids_fmrilm.descriptors.text.z_within_level`), so that "markedly lower" is never
    followed by z=-1.3. A feature without a level map gets no number."""
    from ..descriptors.text import z_within_level

    out: list[dict[str, float]] = [{} for _ in levels]
    for task in tasks:
        key, _, z = _descriptor_calibration(task, calibration, readouts, readout_names)
        if z is None:
            continue
        for r, run in enumerate(levels):
            if key in run and np.isfinite(z[r]):
                out[r][key] = z_within_level(z[r], run[key])
    return out


def model_levels(fm: FMRILM, tasks: Sequence[Task], probas: Sequence[np.ndarray], blocks: Sequence[FMRIBlock]
                 ) -> tuple[list[dict[str, str]], list[dict[str, float]]]:
    """:func:`description_levels` and :func:`description_numbers` of ``blocks`` scored by ``fm``:
    its calibration, the blocks' readouts and the readout's value names."""
    cal, readouts, names = getattr(fm, "calibration", None), block_readouts(blocks), getattr(fm.readout, "names", None)
    levels = description_levels(tasks, probas, cal, readouts, names)
    return levels, description_numbers(tasks, levels, cal, readouts, names)


@torch.no_grad()
def next_patch_logits(fm: FMRILM, blocks: Sequence[FMRIBlock], batch_size: int = 16,
                      include_last: bool = False) -> list[torch.Tensor]:
    """Teacher-forced next-patch logits (n-1, R, K) for each block (patch p predicts p+1); with
    ``include_last`` (n, R, K), the last row forecasting the patch after the block."""
    fm.eval()
    out: list[torch.Tensor] = [None] * len(blocks)  # type: ignore[list-item]
    for chunk in _chunks(len(blocks), batch_size):
        built = fm.build([describe_segments(i) for i in chunk], list(blocks))
        for j, logits in fm.fmri_logits(fm.hidden(built), built, list(blocks), include_last):
            out[j] = logits.float().cpu()
    return out

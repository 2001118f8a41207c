"""Instruction tasks, prompts and constrained answers.

A :class:`Task` asks one question about a run and allows a fixed set of answer strings; the task
list (questions, answers and how labels map to answers) is saved in every checkpoint, so a
prediction is always a probability over that checkpoint's answers.

A prompt is a list of *segments*: text (optionally a training target) and fMRI blocks. The model
turns each fMRI block into ``<fmri>`` + projected patch slots + run summary + ``</fmri>``.

    <fmri>...</fmri>
    Question: What is the participant's sex?
    Options: female, male.
    Answer: male

Few-shot prompts (:func:`few_shot_segments`) stack solved examples before the query.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..descriptors.text import feature_subject, level_of


@dataclass(frozen=True)
class Task:
    """One question with allowed answers.

    Parameters
    ----------
    name : str
        Identifier (``sex``, ``age_group``, ``diagnosis``, ``desc:<feature>``).
    question : str
    answers : tuple of str
        The allowed answer strings, in a fixed order (the order of probability columns).
    source : str
        ``phenotype:<column>`` or ``descriptor:<feature key>``.
    value_map : dict
        For phenotype tasks: label value (lower-cased string) -> answer.
    bins : tuple of float
        For numeric phenotype tasks: upper bounds (exclusive) of all answers but the last.
    """

    name: str
    question: str
    answers: tuple[str, ...]
    source: str
    value_map: Mapping[str, str] = field(default_factory=dict)
    bins: tuple[float, ...] = ()

    def answer_for(self, phenotype: Mapping[str, Any] | None, z: Mapping[str, Any] | None) -> str | None:
        """The correct answer for a run, or None when its label is missing or unmapped."""
        kind, _, key = self.source.partition(":")
        if kind == "descriptor":
            level = level_of((z or {}).get(key))
            return {"markedly_lower": "lower", "lower": "lower", "typical": "typical", "higher": "higher",
                    "markedly_higher": "higher"}.get(level)
        value = (phenotype or {}).get(key)
        if value is None or (isinstance(value, float) and value != value):
            return None
        if self.bins:
            try:
                v = float(value)
            except (TypeError, ValueError):
                return None
            for bound, ans in zip(self.bins, self.answers):
                if v < bound:
                    return ans
            return self.answers[-1]
        return self.value_map.get(str(value).strip().lower())

    def prompt_text(self) -> str:
        return f"Question: {self.question}\nOptions: {', '.join(self.answers)}.\nAnswer:"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["answers"], d["bins"], d["value_map"] = list(self.answers), list(self.bins), dict(self.value_map)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Task":
        return cls(name=d["name"], question=d["question"], answers=tuple(d["answers"]), source=d["source"],
                   value_map=dict(d.get("value_map") or {}), bins=tuple(d.get("bins") or ()))


SEX = Task("sex", "What is the participant's sex?", ("female", "male"), "phenotype:sex",
           {"f": "female", "female": "female", "2": "female", "m": "male", "male": "male", "1": "male"})
AGE_GROUP = Task("age_group", "Which age group does the participant belong to?", ("child", "adolescent", "adult"),
                 "phenotype:age", bins=(12.0, 18.0))
DIAGNOSIS = Task("diagnosis", "Does the participant have an autism spectrum diagnosis or are they a typical control?",
                 ("autism", "control"), "phenotype:diagnosis",
                 {"asd": "autism", "autism": "autism", "1": "autism", "td": "control", "control": "control",
                  "tdc": "control", "2": "control"})


def descriptor_task(key: str) -> Task:
    """Three-way question on a descriptor's level (z <= -1 lower, >= 1 higher, else typical)."""
    return Task(f"desc:{key}", f"Is the {feature_subject(key)} lower than average, typical, or higher than average?",
                ("lower", "typical", "higher"), f"descriptor:{key}")


def default_tasks(descriptor_keys: Sequence[str]) -> list[Task]:
    """Sex, age group, diagnosis and one question per descriptor key."""
    return [SEX, AGE_GROUP, DIAGNOSIS, *(descriptor_task(k) for k in descriptor_keys)]


def label_task(name: str, answers: Sequence[str], question: str | None = None) -> Task:
    """A task on a user's own label column (group level), answers = the label's classes."""
    answers = tuple(str(a) for a in answers)
    q = question or f"What is the participant's {name.replace('_', ' ')}?"
    return Task(f"label:{name}", q, answers, f"phenotype:{name}", {a.lower(): a for a in answers})


# ----------------------------------------------------------------------------------- segments
FMRI = "fmri"
TEXT = "text"
BRANCH = "branch"  # starts a branch that sees the shared prefix but not the branches before it


def instruction_segments(task: Task, run_index: int, answer: str | None = None) -> list[tuple]:
    """Segments of one instruction: fMRI block, question with options, and the answer (target)."""
    segs: list[tuple] = [(FMRI, run_index), (TEXT, "\n" + task.prompt_text(), False)]
    if answer is not None:
        segs.append((TEXT, " " + answer, True))
    return segs


def multi_instruction_segments(run_index: int, qa: Sequence[tuple[Task, str | None]]) -> list[tuple]:
    """One fMRI block and several questions, each in its own branch (see
    :meth:`~bids_fmrilm.model.fmrilm.FMRILM.build`): every question sees the block but no other
    question or answer, exactly as when asked alone, for the cost of one pass over the block.
    An answer of None leaves the question unanswered (scoring)."""
    segs: list[tuple] = [(FMRI, run_index)]
    for task, answer in qa:
        segs.append((BRANCH,))
        segs += instruction_segments(task, run_index, answer)[1:]
    return segs


def describe_segments(run_index: int, text: str | None = None) -> list[tuple]:
    """fMRI block then ``Description:``; with ``text`` the description is the target."""
    segs: list[tuple] = [(FMRI, run_index), (TEXT, "\nDescription:", False)]
    if text is not None:
        segs.append((TEXT, " " + text, True))
    return segs


def text_segments(text: str) -> list[tuple]:
    """A text-only example (language modelling on the descriptor corpus)."""
    return [(TEXT, "Description: " + text, True)]


def few_shot_segments(task: Task, shots: Sequence[tuple[int, str]], query_index: int) -> list[tuple]:
    """Solved examples ``(run_index, answer)`` followed by the query run's instruction."""
    segs: list[tuple] = []
    for idx, ans in shots:
        segs += instruction_segments(task, idx, None)
        segs.append((TEXT, f" {ans}\n\n", False))
    return segs + instruction_segments(task, query_index, None)

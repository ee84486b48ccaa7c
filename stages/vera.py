"""VERA (CVPR 2025) for roadwork: guiding questions, the segment prompt, and learning them.

Scoring: the prompt shows a segment's key frames, lists the guiding questions for the
model to consider, and asks for a yes/no conclusion; the anomaly score is P(yes) read
from the first answer token (``VlmBackend.p_yes``), graded where VERA's official code
keeps a hard 0/1.

Learning (verbalized, no weights): a learner pass scores a batch of labelled segments
with the current questions; an optimizer prompt shows the model those predictions, the
targets and the questions and asks for at most five new questions (a JSON answer); every
batch rewrites the set, and the set with the best validation accuracy is kept and saved
as a JSON file that the vera worker loads.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field

from stages.vlm.base import Prompt, VlmBackend, VlmImage, VlmOutputError, thin
from stream.errors import InputError

#: Roadwork guiding questions shipped as the default set.
DEFAULT_QUESTIONS: tuple[str, ...] = (
    "Are there traffic cones, drums, barrels, barricades or tubular markers on or beside the road?",
    "Is a lane closed, narrowed or shifted by temporary barriers or markings?",
    "Are there construction workers, work vehicles or heavy equipment near the road?",
    "Are there temporary orange signs, arrow boards or message boards warning of work ahead?",
    "Is the road surface dug up, being paved or fenced off?",
)

#: VERA starts learning from two generic questions.
GENERIC_QUESTIONS: tuple[str, ...] = (
    "Is there anything unusual on or beside the road?",
    "Does anything in the scene make drivers change how they drive?",
)

MAX_QUESTIONS = 5


@dataclass(frozen=True)
class QuestionSet:
    """A list of guiding questions; ``id`` names the set in every score made with it."""

    questions: tuple[str, ...]
    accuracy: float | None = None
    source: str = "default"

    @property
    def id(self) -> str:
        """A short digest of the questions (stable across processes)."""
        text = "\n".join(self.questions)
        return "q" + hashlib.blake2b(text.encode(), digest_size=5).hexdigest()

    def save(self, path: str | Path) -> None:
        """Write the set as JSON (``questions``, ``id``, ``accuracy``, ``source``)."""
        data = {"id": self.id, "questions": list(self.questions), "accuracy": self.accuracy, "source": self.source}
        Path(path).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> QuestionSet:
        """Read a set written by ``save`` (or a plain JSON list of questions).

        Raises:
            InputError: the file is missing, not JSON, or holds no questions; the message names it.
        """
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            message = f"questions file {path}: cannot be read as JSON: {exc}"
            raise InputError(message) from exc
        raw = data.get("questions") if isinstance(data, dict) else data
        questions = clean_questions(raw if isinstance(raw, list) else [])
        if not questions:
            message = f"questions file {path}: expected a non-empty list of questions"
            raise InputError(message)
        accuracy = data.get("accuracy") if isinstance(data, dict) else None
        return cls(questions, accuracy, str(path))


def default_questions() -> QuestionSet:
    """The shipped roadwork question set."""
    return QuestionSet(DEFAULT_QUESTIONS)


def load_questions(path: str | None) -> QuestionSet:
    """The set in ``path``, or the default set when no path is given."""
    return QuestionSet.load(path) if path else default_questions()


def clean_questions(raw: Sequence[object]) -> tuple[str, ...]:
    """Non-empty, de-duplicated question strings, at most ``MAX_QUESTIONS``."""
    seen: list[str] = []
    for item in raw:
        text = str(item).strip()
        if text and text.lower() not in {s.lower() for s in seen}:
            seen.append(text)
    return tuple(seen[:MAX_QUESTIONS])


def vera_prompt(questions: Sequence[str]) -> str:
    """The scoring prompt: consider the questions, then answer yes or no."""
    listed = "\n".join(f"{i}. {q}" for i, q in enumerate(questions, 1))
    return (
        "The images are key frames, in time order, from a car's camera during one segment of a drive.\n"
        f"Consider these questions about the frames:\n{listed}\n"
        "Based on your answers, is there roadwork (a construction or work zone) in this segment? "
        "Answer yes or no."
    )


async def score_segments(
    backend: VlmBackend, questions: QuestionSet, segments: Sequence[Sequence[VlmImage]], *, max_images: int = 8
) -> list[float]:
    """P(yes) of the roadwork conclusion for each segment's images (one batched call).

    Parameters:
        backend: the VLM.
        questions: the guiding questions.
        segments: each segment's labelled key frames.
        max_images: images per prompt at most (VERA uses 8); extra ones thinned evenly.
    """
    text = vera_prompt(questions.questions)
    prompts = [Prompt(text, tuple(thin(images, max_images))) for images in segments]
    return await backend.p_yes_many(prompts)


# -- learning the questions ----------------------------------------------------------------


@dataclass(frozen=True)
class LabelledSegment:
    """A segment's images and whether it shows roadwork."""

    key: str
    images: tuple[VlmImage, ...]
    label: bool


class ProposedQuestions(BaseModel):
    """The optimizer's JSON answer."""

    questions: list[str] = Field(min_length=1, max_length=MAX_QUESTIONS)


@dataclass
class LearnStep:
    """One optimizer step, for progress reports and the history."""

    step: int
    questions: tuple[str, ...]
    train_accuracy: float
    val_accuracy: float
    accepted: bool  # the optimizer's answer validated
    best: bool  # this set is the best so far


@dataclass
class LearnResult:
    """The best question set and how learning went."""

    best: QuestionSet
    history: list[LearnStep] = field(default_factory=list)


def accuracy(scores: Sequence[float], labels: Sequence[bool], threshold: float = 0.5) -> float:
    """Share of segments whose ``score > threshold`` matches the label."""
    if not labels:
        return 0.0
    return sum((s > threshold) == y for s, y in zip(scores, labels, strict=True)) / len(labels)


def brier(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Mean squared error of the scores against the labels (ties between equal accuracies)."""
    if not labels:
        return 0.0
    return sum((s - float(y)) ** 2 for s, y in zip(scores, labels, strict=True)) / len(labels)


def optimizer_prompt(
    questions: Sequence[str], items: Sequence[LabelledSegment], scores: Sequence[float], threshold: float = 0.5
) -> str:
    """The optimizer's prompt: current questions, each prediction against its target."""
    listed = "\n".join(f"{i}. {q}" for i, q in enumerate(questions, 1))
    rows = "\n".join(
        f"- segment {item.key}: predicted {'roadwork' if s > threshold else 'no roadwork'} "
        f"(P={s:.2f}), truth: {'roadwork' if item.label else 'no roadwork'}"
        for item, s in zip(items, scores, strict=True)
    )
    return (
        "A vision-language model looks at key frames of road segments and decides whether each shows "
        "roadwork, after considering these guiding questions:\n"
        f"{listed}\n\nIts predictions on a batch, against the truth:\n{rows}\n\n"
        f"Write at most {MAX_QUESTIONS} new guiding questions, each answerable from the images, that "
        "would lead the model to the right answer on segments like these (fix its mistakes, keep what "
        'worked). Answer as JSON: {"questions": ["...", "..."]}.'
    )


ProgressFn = Callable[[LearnStep, int], None]


async def learn_questions(
    backend: VlmBackend,
    train: Sequence[LabelledSegment],
    val: Sequence[LabelledSegment],
    *,
    initial: Sequence[str] = GENERIC_QUESTIONS,
    epochs: int = 1,
    batch_size: int = 8,
    threshold: float = 0.5,
    max_images: int = 8,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> LearnResult:
    """VERA's verbalized learning of guiding questions.

    Parameters:
        backend: the frozen VLM, both learner and optimizer.
        train: labelled segments the optimizer sees, in batches.
        val: labelled segments that choose the best set.
        initial: the starting questions.
        epochs: passes over ``train``.
        batch_size: segments per learner pass / optimizer step.
        threshold: P(yes) above which a prediction is roadwork.
        max_images: images per prompt.
        seed: order of the training batches.
        progress: called after each step with the step and the total number of steps.

    Returns:
        The best set by validation accuracy (ties: lower Brier score, then the earlier
        set) and the history of steps.
    """
    order = list(train)
    batches_per_epoch = max(1, -(-len(order) // max(1, batch_size)))
    total = epochs * batches_per_epoch
    current = QuestionSet(clean_questions(list(initial)), source="initial")
    best_key = await _validate(backend, current, val, threshold, max_images)
    best = _scored(current, best_key)
    history: list[LearnStep] = []
    rng = random.Random(seed)
    for _epoch in range(epochs):
        rng.shuffle(order)
        for start in range(0, len(order), max(1, batch_size)):
            batch = order[start : start + batch_size]
            scores = await score_segments(backend, current, [b.images for b in batch], max_images=max_images)
            train_acc = accuracy(scores, [b.label for b in batch], threshold)
            proposed = await _propose(backend, current, batch, scores, threshold)
            accepted = proposed is not None
            current = proposed or current
            key = await _validate(backend, current, val, threshold, max_images)
            improved = key > best_key
            if improved:
                best_key, best = key, _scored(current, key)
            step = LearnStep(len(history) + 1, current.questions, train_acc, key[0], accepted, improved)
            history.append(step)
            if progress:
                progress(step, total)
    return LearnResult(best, history)


def _scored(questions: QuestionSet, key: tuple[float, float]) -> QuestionSet:
    return QuestionSet(questions.questions, key[0], "learned")


async def _validate(
    backend: VlmBackend, questions: QuestionSet, val: Sequence[LabelledSegment], threshold: float, max_images: int
) -> tuple[float, float]:
    """(accuracy, -Brier) on the validation split: larger is better."""
    scores = await score_segments(backend, questions, [v.images for v in val], max_images=max_images)
    labels = [v.label for v in val]
    return accuracy(scores, labels, threshold), -brier(scores, labels)


async def _propose(
    backend: VlmBackend,
    current: QuestionSet,
    batch: Sequence[LabelledSegment],
    scores: Sequence[float],
    threshold: float,
) -> QuestionSet | None:
    prompt = optimizer_prompt(current.questions, batch, scores, threshold)
    try:
        answer = await backend.answer_json(prompt, [], ProposedQuestions)
    except VlmOutputError:
        return None  # the optimizer wrote no usable JSON: keep the current questions
    questions = clean_questions(answer.questions)
    return QuestionSet(questions, source="proposed") if questions else None


def split_train_val(
    items: Sequence[LabelledSegment], val_fraction: float = 0.3, seed: int = 0
) -> tuple[list[LabelledSegment], list[LabelledSegment]]:
    """A seeded split that keeps both labels in the validation part where it can."""
    rng = random.Random(seed)
    train: list[LabelledSegment] = []
    val: list[LabelledSegment] = []
    for label in (True, False):
        group = [i for i in items if i.label == label]
        rng.shuffle(group)
        cut = round(len(group) * val_fraction) if len(group) > 1 else 0
        val.extend(group[:cut])
        train.extend(group[cut:])
    return train, val

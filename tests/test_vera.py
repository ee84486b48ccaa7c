"""VERA scoring and the verbalized learning of guiding questions, on the tiny VLM."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
from vlm_tiny import fixture_segment

from stages.vera import (
    DEFAULT_QUESTIONS,
    GENERIC_QUESTIONS,
    MAX_QUESTIONS,
    LabelledSegment,
    QuestionSet,
    learn_questions,
    load_questions,
    score_segments,
    split_train_val,
    vera_prompt,
)
from stages.vlm.base import VlmImage
from stages.vlm.transformers_backend import TransformersBackend
from stream.errors import InputError


@pytest.fixture(scope="module")
def backend(tiny_vlm_path) -> TransformersBackend:
    return TransformersBackend(model=str(tiny_vlm_path), batch_size=4, max_new_tokens=16, json_attempts=2)


def labelled(n: int) -> list[LabelledSegment]:
    items = []
    for i in range(n):
        segment, blobs = fixture_segment("d1", "front", i, frames=2, roadwork=i % 2 == 0)
        images = tuple(VlmImage(blobs[kf.blob_key], f"front t={kf.t:.1f}s") for kf in segment.key_frames)
        items.append(LabelledSegment(f"d1/front/{i}", images, i % 2 == 0))
    return items


def test_prompt_lists_every_question_and_asks_yes_or_no():
    prompt = vera_prompt(DEFAULT_QUESTIONS)
    assert all(f"{i}. {q}" in prompt for i, q in enumerate(DEFAULT_QUESTIONS, 1))
    assert prompt.endswith("Answer yes or no.")


def test_question_set_round_trips_through_its_file(tmp_path):
    path = tmp_path / "q.json"
    QuestionSet(("Are there cones?", "Is a lane closed?"), 0.75, "learned").save(path)
    loaded = load_questions(str(path))
    assert loaded.questions == ("Are there cones?", "Is a lane closed?") and loaded.accuracy == 0.75
    assert loaded.id == QuestionSet(("Are there cones?", "Is a lane closed?")).id
    assert load_questions(None).questions == DEFAULT_QUESTIONS


def test_bad_questions_file_is_an_input_error(tmp_path):
    path = tmp_path / "q.json"
    path.write_text('{"questions": []}')
    with pytest.raises(InputError, match="q.json"):
        QuestionSet.load(path)


async def test_segment_scores_are_probabilities(backend):
    items = labelled(3)
    scores = await score_segments(backend, QuestionSet(DEFAULT_QUESTIONS), [i.images for i in items])
    assert len(scores) == 3 and all(0.0 < s < 1.0 for s in scores)


async def test_learning_loop_runs_end_to_end_on_the_tiny_model(backend, tmp_path):
    # Given six labelled fixture segments split into train and validation
    train, val = split_train_val(labelled(6), val_fraction=0.34)
    steps = []
    # When VERA's loop runs one epoch (the random optimizer writes no valid JSON)
    result = await learn_questions(backend, train, val, batch_size=2, progress=lambda s, t: steps.append((s.step, t)))
    result.best.save(tmp_path / "q.json")
    # Then every batch made a step, none was accepted, and the saved set loads back
    assert steps == [(1, 2), (2, 2)]
    assert not any(step.accepted for step in result.history)
    assert 0.0 <= result.best.accuracy <= 1.0
    assert QuestionSet.load(tmp_path / "q.json").questions == result.best.questions


async def test_proposed_questions_replace_the_set_and_the_best_is_kept(tiny_vlm_path):
    # Given the tiny model as learner, and an optimizer whose proposals are scripted JSON
    too_many = {"questions": [f"Question {i}?" for i in range(7)]}
    proposals = [{"questions": ["Are there orange cones?", "Is a lane closed?"]}] + [too_many] * 3

    class ScriptedOptimizer(TransformersBackend):
        prompts: ClassVar[list[str]] = []

        async def generate_json_text(self, prompts, schema, *, max_tokens, temperature):
            self.prompts.append(prompts[0].text)
            return [json.dumps(proposals.pop(0))]

    backend = ScriptedOptimizer(model=str(tiny_vlm_path), batch_size=4)
    train, val = split_train_val(labelled(6), val_fraction=0.34)
    # When the loop runs
    result = await learn_questions(backend, train, val, batch_size=2)
    # Then the optimizer saw predictions against truth, its first set was adopted, and a
    # proposal over five questions was rejected (keeping the set before it)
    assert "truth:" in backend.prompts[0] and "predicted" in backend.prompts[0]
    assert result.history[0].accepted and result.history[0].questions == ("Are there orange cones?", "Is a lane closed?")
    assert not result.history[1].accepted and len(result.history[1].questions) <= MAX_QUESTIONS
    assert len(backend.prompts) == 1 + 3  # the bad proposal was retried before giving up
    assert result.best.questions in {GENERIC_QUESTIONS} | {s.questions for s in result.history}


def test_split_keeps_both_labels_in_validation():
    train, val = split_train_val(labelled(6), val_fraction=0.34)
    assert {v.label for v in val} == {True, False} and len(train) + len(val) == 6


def test_learn_questions_command_saves_a_loadable_set(tiny_vlm_path, tmp_path, monkeypatch):
    import click
    from click.testing import CliRunner

    from workers.cli.vlm import register

    # Given a labels file: drive-level labels, segments of fixture frames on disk
    lines = [json.dumps({"drive": "d1", "label": True}), json.dumps({"drive": "d2", "label": False})]
    for i, item in enumerate(labelled(4)):
        names = []
        for j, image in enumerate(item.images):
            (tmp_path / f"s{i}_{j}.jpg").write_bytes(image.data)
            names.append(f"s{i}_{j}.jpg")
        lines.append(json.dumps({"drive": "d1" if item.label else "d2", "id": item.key, "images": names}))
    (tmp_path / "labels.jsonl").write_text("\n".join(lines))
    monkeypatch.setenv("ROADSTREAM_VLM__MAX_NEW_TOKENS", "8")
    monkeypatch.setenv("ROADSTREAM_VLM__JSON_ATTEMPTS", "1")
    cli = click.Group()
    register(cli)
    # When the command runs with the tiny model
    out = tmp_path / "q.json"
    args = ["learn-questions", "--labels", str(tmp_path / "labels.jsonl"), "--out", str(out), "--batch-size", "2",
            "--val-fraction", "0.5", "--backend", "transformers", "--model", str(tiny_vlm_path)]
    result = CliRunner().invoke(cli, args)
    # Then it reported its steps and saved a set the worker can load
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["steps"] == 1
    assert load_questions(str(out)).questions

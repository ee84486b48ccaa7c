"""The transformers backend on a tiny random Qwen2-VL, through the real loading and inference path."""

from __future__ import annotations

import math
from typing import ClassVar

import pytest
from pydantic import BaseModel
from vlm_tiny import jpeg

from stages.vlm.base import Prompt, VlmBackend, VlmImage, VlmOutputError, make_backend, yes_probability
from stages.vlm.transformers_backend import TransformersBackend
from stream.errors import ConfigError, InputError, ModelError
from stream.schemas import VlmAnswerBody
from stream.settings import VlmSettings


@pytest.fixture(scope="module")
def backend(tiny_vlm_path) -> TransformersBackend:
    return TransformersBackend(model=str(tiny_vlm_path), batch_size=3, max_new_tokens=24)


def images(n: int) -> tuple[VlmImage, ...]:
    return tuple(VlmImage(jpeg((40 * i, 100, 200 - 30 * i)), f"cam{i}") for i in range(n))


async def test_p_yes_is_a_probability(backend):
    # Given a question over two labelled images
    # When scored
    score = await backend.p_yes("Is there roadwork? Answer yes or no.", images(2))
    # Then it is a probability, graded rather than hard 0/1
    assert 0.0 < score < 1.0


async def test_batched_scores_match_one_by_one(backend):
    # Given five prompts with different image counts (so two batches of up to three, padded)
    prompts = [Prompt(f"Question {i}: is there roadwork? yes or no", images(1 + i % 3)) for i in range(5)]
    # When scored in one batched call and then one at a time
    batched = await backend.p_yes_many(prompts)
    single = [await backend.p_yes(p.text, p.images) for p in prompts]
    # Then padding and batching change nothing
    assert batched == pytest.approx(single, abs=1e-4)


async def test_scores_depend_on_the_images(backend):
    # Given the same question over different images
    a = await backend.p_yes("Is there roadwork? yes or no", images(1))
    b = await backend.p_yes("Is there roadwork? yes or no", images(3))
    # Then the model saw them (the scores differ)
    assert a != b


async def test_yes_no_variants_come_from_the_vocabulary(backend):
    # Given the first-token log-probabilities the backend reads
    (logprobs,) = await backend.first_token_logprobs([Prompt("yes or no?", images(1))])
    # Then they hold several yes and no variants and are real log-probabilities
    words = {tok.strip("Ġ").lower() for tok in logprobs}
    assert {"yes", "no"} <= words
    assert all(lp < 0 for lp in logprobs.values())
    assert 0 < sum(math.exp(lp) for lp in logprobs.values()) < 1


async def test_invalid_json_is_retried_then_raised_with_the_text(tiny_vlm_path):
    # Given the random model (it never writes valid JSON) and a count of generations
    class Counting(TransformersBackend):
        calls: ClassVar[list[float]] = []

        async def generate_json_text(self, prompts, schema, *, max_tokens, temperature):
            self.calls.append(temperature)
            return await super().generate_json_text(prompts, schema, max_tokens=max_tokens, temperature=temperature)

    backend = Counting(model=str(tiny_vlm_path), json_attempts=3, max_new_tokens=16)
    # When asked for a structured answer
    with pytest.raises(VlmOutputError) as caught:
        await backend.answer_json("Is there roadwork?", images(1), VlmAnswerBody)
    # Then it tried three times (greedy, then sampled) and kept the model's text
    assert backend.calls == [0.0, 0.7, 0.7]
    assert caught.value.text
    assert repr(caught.value.text[:20])[1:-1] in str(caught.value)
    assert isinstance(caught.value, InputError)


class Scripted(VlmBackend):
    """Answers from a script, to test the base class's validation loop."""

    def __init__(self, answers: list[str]) -> None:
        super().__init__(model="scripted", json_attempts=3)
        self.answers = answers

    async def first_token_logprobs(self, prompts):
        return [{"Yes": -0.1, "ĠNo": -2.5} for _ in prompts]

    async def generate_json_text(self, prompts, schema, *, max_tokens, temperature):
        return [self.answers.pop(0)]


async def test_answer_validates_after_a_bad_first_try():
    # Given a model that first writes prose, then fenced JSON
    good = '```json\n{"roadwork": true, "confidence": 0.8, "objects": [{"type": "cone", "cameras": ["front"]}]}\n```'
    backend = Scripted(["I think there are cones", good])
    # When asked
    answer = await backend.answer_json("roadwork?", [], VlmAnswerBody)
    # Then the second try validates
    assert answer.roadwork is True and answer.objects[0].cameras == ["front"]


async def test_answer_outside_the_schema_is_rejected():
    class Narrow(BaseModel):
        confidence: float

    backend = Scripted(['{"confidence": "high"}'] * 3)
    with pytest.raises(VlmOutputError, match="high"):
        await backend.answer_json("how sure?", [], Narrow)


def test_yes_probability_normalises_over_variants():
    # Given yes and no variants of the first token
    p = yes_probability({"Yes": math.log(0.3), "Ġyes": math.log(0.3), "No": math.log(0.2), "maybe": math.log(0.1)})
    # Then P(yes) sums the yes variants against the no ones
    assert p == pytest.approx(0.6 / 0.8)


def test_yes_probability_bounds_a_missing_side_by_the_smallest_listed():
    p = yes_probability({"yes": math.log(0.5), "the": math.log(0.1)})
    assert p == pytest.approx(0.5 / 0.6)
    assert yes_probability({"the": -1.0}) == 0.5


async def test_undecodable_image_is_an_input_error(backend):
    with pytest.raises(InputError, match="front"):
        await backend.p_yes("yes or no?", [VlmImage(b"not a jpeg", "front")])


async def test_missing_model_is_a_model_error(tmp_path):
    backend = TransformersBackend(model=str(tmp_path / "nowhere"))
    with pytest.raises(ModelError, match="nowhere"):
        await backend.load()


def test_factory_builds_the_configured_backend(tiny_vlm_path):
    made = make_backend(VlmSettings(backend="transformers", model=str(tiny_vlm_path)))
    assert isinstance(made, TransformersBackend)
    with pytest.raises(ConfigError, match="no VLM backend"):
        make_backend(VlmSettings())
    with pytest.raises(ConfigError, match="unknown"):
        make_backend(VlmSettings(backend="llama", model="x"))

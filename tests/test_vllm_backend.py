"""The vLLM backend's request building and response parsing, without vLLM installed."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from vlm_tiny import jpeg

from stages.vlm.base import Prompt, VlmImage, make_backend, yes_probability
from stages.vlm.vllm_backend import (
    EXTRA,
    build_request,
    json_sampling,
    make_sampling_params,
    parse_first_logprobs,
    parse_text,
    yes_no_sampling,
)
from stream.errors import ConfigError, InputError
from stream.schemas import VlmAnswerBody
from stream.settings import VlmSettings

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def render(tiny_vlm_path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_vlm_path)
    return lambda messages: processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def images(n: int) -> tuple[VlmImage, ...]:
    return tuple(VlmImage(jpeg((20 * i, 80, 90)), f"cam{i}") for i in range(n))


def test_request_has_one_placeholder_and_label_per_image(render):
    # Given a prompt over three labelled images
    request = build_request(Prompt("roadwork?", images(3)), render, max_images=8)
    # Then the chat prompt holds three image placeholders, each after its label, and three PIL images
    assert request["prompt"].count("<|image_pad|>") == 3
    assert request["prompt"].index("Camera cam1:") < request["prompt"].index("Camera cam2:")
    assert [im.size for im in request["multi_modal_data"]["image"]] == [(64, 48)] * 3
    assert request["prompt"].endswith("<|im_start|>assistant\n")


def test_images_beyond_the_limit_are_thinned_evenly(render):
    request = build_request(Prompt("roadwork?", images(7)), render, max_images=3)
    assert request["prompt"].count("<|image_pad|>") == 3
    assert "Camera cam0:" in request["prompt"] and "Camera cam6:" in request["prompt"]
    assert "Camera cam1:" not in request["prompt"]


def test_text_only_request_has_no_multimodal_data(render):
    assert "multi_modal_data" not in build_request(Prompt("propose questions"), render, max_images=8)


def test_sampling_asks_for_one_token_with_logprobs():
    assert yes_no_sampling(20) == {"max_tokens": 1, "temperature": 0.0, "logprobs": 20}


@dataclass
class FakeParams:
    kwargs: dict = field(default_factory=dict)


def fake_module(new_api: bool) -> SimpleNamespace:
    module = SimpleNamespace(SamplingParams=lambda **kw: FakeParams(kw))
    if new_api:
        module.StructuredOutputsParams = lambda **kw: ("structured", kw)
    else:
        module.GuidedDecodingParams = lambda **kw: ("guided", kw)
    return module


@pytest.mark.parametrize(("new_api", "field_name"), [(True, "structured_outputs"), (False, "guided_decoding")])
def test_json_sampling_uses_the_installed_structured_output_api(new_api, field_name):
    # Given the JSON schema of the answer
    schema = VlmAnswerBody.model_json_schema()
    # When sampling parameters are made for a newer or an older vLLM
    params = make_sampling_params(fake_module(new_api), json_sampling(schema, max_tokens=64, temperature=0.0))
    # Then the schema goes to that version's field
    kind, arguments = params.kwargs[field_name]
    assert kind == ("structured" if new_api else "guided")
    assert arguments == {"json": schema} and params.kwargs["max_tokens"] == 64


def output(logprobs):
    logprob = lambda lp, text: SimpleNamespace(logprob=lp, rank=1, decoded_token=text)
    first = {i: logprob(lp, text) for i, (text, lp) in enumerate(logprobs)} if logprobs is not None else None
    completion = SimpleNamespace(text='{"roadwork": false}', logprobs=[first] if first else None, token_ids=[0])
    return SimpleNamespace(request_id="7", outputs=[completion])


def test_first_token_logprobs_parse_into_p_yes():
    # Given a RequestOutput whose first token's top logprobs hold yes and no variants
    parsed = parse_first_logprobs(output([("Yes", math.log(0.6)), (" yes", math.log(0.1)), ("No", math.log(0.3))]))
    # Then P(yes) adds the yes variants
    assert yes_probability(parsed) == pytest.approx(0.7)


def test_two_ids_with_one_text_add_their_mass():
    parsed = parse_first_logprobs(output([("yes", math.log(0.25)), ("yes", math.log(0.25)), ("no", math.log(0.5))]))
    assert math.exp(parsed["yes"]) == pytest.approx(0.5)


def test_output_without_logprobs_is_an_input_error():
    with pytest.raises(InputError, match="no logprobs"):
        parse_first_logprobs(output(None))


def test_text_is_read_from_the_first_completion():
    assert parse_text(output([("a", -1.0)])) == '{"roadwork": false}'


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_missing_vllm_names_the_extra():
    # Given no vLLM installed
    # When the vllm backend is configured
    with pytest.raises(ConfigError) as caught:
        make_backend(VlmSettings(backend="vllm", model="Qwen/Qwen2.5-VL-3B-Instruct"))
    # Then the message says what to install
    assert EXTRA in str(caught.value) and "roadstream[vllm]" in str(caught.value)

"""The offline vLLM backend: ``vllm.LLM.generate`` in process, on the GPU.

Request building (prompt text from the processor's chat template plus
``multi_modal_data``), sampling parameters and response parsing are plain functions over
plain data, so they are tested without vLLM; only ``VllmBackend`` touches the engine, and
its import of vllm fails with a message naming the extra to install.
"""

from __future__ import annotations

import asyncio
import importlib
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

from stages.vlm.base import Prompt, VlmBackend, hf_messages, thin
from stream.errors import ConfigError, InputError

#: What to install for this backend.
EXTRA = "roadstream[vllm]"

Render = Callable[[list[dict[str, Any]]], str]


def import_vllm() -> Any:
    """Import vllm, or say how to get it.

    Raises:
        ConfigError: vllm is not installed; the message names the extra.
    """
    try:
        return importlib.import_module("vllm")
    except ImportError as exc:
        message = (
            f"the vllm VLM backend needs vLLM, which is not installed ({exc}): "
            f"pip install '{EXTRA}' (on a CUDA machine), or set vlm.backend to transformers or openai"
        )
        raise ConfigError(message) from exc


def build_request(prompt: Prompt, render: Render, max_images: int) -> dict[str, Any]:
    """One ``LLM.generate`` input: the rendered chat prompt and its images.

    Parameters:
        prompt: labelled images and text.
        render: the processor's chat template (messages -> prompt text with image
            placeholders), e.g. ``processor.apply_chat_template(..., tokenize=False)``.
        max_images: ``limit_mm_per_prompt``; extra images are thinned evenly.

    Returns:
        ``{"prompt": str, "multi_modal_data": {"image": [PIL images]}}`` (no
        ``multi_modal_data`` for a text-only prompt).
    """
    images = tuple(thin(prompt.images, max_images))
    request: dict[str, Any] = {"prompt": render(hf_messages(Prompt(prompt.text, images)))}
    if images:
        request["multi_modal_data"] = {"image": [image.pil() for image in images]}
    return request


def yes_no_sampling(top_logprobs: int) -> dict[str, Any]:
    """Sampling arguments for one greedy token with its top log-probabilities."""
    return {"max_tokens": 1, "temperature": 0.0, "logprobs": top_logprobs}


def json_sampling(schema: dict[str, Any], *, max_tokens: int, temperature: float) -> dict[str, Any]:
    """Sampling arguments for a JSON answer under structured output."""
    return {"max_tokens": max_tokens, "temperature": temperature, "structured_outputs": {"json": schema}}


def make_sampling_params(sampling_module: Any, arguments: dict[str, Any]) -> Any:
    """``SamplingParams`` from plain arguments, for the installed vLLM's API.

    Newer vLLM takes ``structured_outputs=StructuredOutputsParams(json=…)``; older takes
    ``guided_decoding=GuidedDecodingParams(json=…)``.

    Parameters:
        sampling_module: ``vllm.sampling_params`` (or a stand-in with the same names).
        arguments: from ``yes_no_sampling`` or ``json_sampling``.
    """
    arguments = dict(arguments)
    structured = arguments.pop("structured_outputs", None)
    if structured is not None:
        new_api = getattr(sampling_module, "StructuredOutputsParams", None)
        if new_api is not None:
            arguments["structured_outputs"] = new_api(**structured)
        else:
            arguments["guided_decoding"] = sampling_module.GuidedDecodingParams(**structured)
    return sampling_module.SamplingParams(**arguments)


def parse_first_logprobs(output: Any) -> dict[str, float]:
    """token text -> log-probability of the first generated token of a ``RequestOutput``.

    Tokens that decode to the same text (two ids for ``yes``) have their mass added.

    Raises:
        InputError: the output carries no log-probabilities.
    """
    completion = output.outputs[0]
    if not completion.logprobs:
        message = f"vLLM output for request {getattr(output, 'request_id', '?')} has no logprobs"
        raise InputError(message)
    found: dict[str, float] = {}
    for token_id, logprob in completion.logprobs[0].items():
        text = logprob.decoded_token if logprob.decoded_token is not None else str(token_id)
        previous = found.get(text)
        found[text] = logprob.logprob if previous is None else _logaddexp(previous, logprob.logprob)
    return found


def parse_text(output: Any) -> str:
    """The generated text of a ``RequestOutput``."""
    return output.outputs[0].text


def _logaddexp(a: float, b: float) -> float:
    high = max(a, b)
    return high + math.log(math.exp(a - high) + math.exp(b - high))


class VllmBackend(VlmBackend):
    """A vLLM offline engine in this process.

    Parameters:
        model: a model vLLM serves (Qwen2.5-VL-3B-Instruct, InternVL3-1B …).
        max_images: ``limit_mm_per_prompt`` for images.
        top_logprobs: first-token alternatives read for P(yes) (vLLM's default cap is 20).
        engine_args: further ``vllm.LLM`` keyword arguments.
        **kwargs: see ``VlmBackend``.
    """

    def __init__(
        self,
        *,
        model: str,
        max_images: int = 8,
        top_logprobs: int = 20,
        engine_args: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model=model, **kwargs)
        self.max_images = max_images
        self.top_logprobs = top_logprobs
        self.engine_args = dict(engine_args or {})
        self._vllm = import_vllm()
        self._llm: Any = None
        self._render: Render | None = None
        self._lock = threading.Lock()
        self._load_lock = asyncio.Lock()

    async def load(self) -> None:
        """Start the engine now (otherwise on first use)."""
        async with self._load_lock:
            if self._llm is None:
                await asyncio.to_thread(self._load_sync)

    def _load_sync(self) -> None:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(self.model)
        self._render = lambda messages: processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        arguments = {"limit_mm_per_prompt": {"image": self.max_images}, "max_logprobs": max(20, self.top_logprobs)}
        self._llm = self._vllm.LLM(model=self.model, **{**arguments, **self.engine_args})

    async def first_token_logprobs(self, prompts: Sequence[Prompt]) -> list[dict[str, float]]:
        """Top first-token log-probabilities, all prompts in one engine call."""
        outputs = await self._generate(prompts, yes_no_sampling(self.top_logprobs))
        return [parse_first_logprobs(o) for o in outputs]

    async def generate_json_text(
        self, prompts: Sequence[Prompt], schema: dict[str, Any], *, max_tokens: int, temperature: float
    ) -> list[str]:
        """JSON answers under vLLM's structured output."""
        arguments = json_sampling(schema, max_tokens=max_tokens, temperature=temperature)
        return [parse_text(o) for o in await self._generate(prompts, arguments)]

    async def _generate(self, prompts: Sequence[Prompt], arguments: dict[str, Any]) -> list[Any]:
        await self.load()
        return await asyncio.to_thread(self._generate_sync, list(prompts), arguments)

    def _generate_sync(self, prompts: list[Prompt], arguments: dict[str, Any]) -> list[Any]:
        assert self._render is not None
        requests = [build_request(p, self._render, self.max_images) for p in prompts]
        params = make_sampling_params(importlib.import_module("vllm.sampling_params"), arguments)
        with self._lock:
            return self._llm.generate(requests, params, use_tqdm=False)

    async def close(self) -> None:
        """Drop the engine."""
        self._llm = None

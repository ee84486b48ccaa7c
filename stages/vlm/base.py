"""One interface over vision-language models: P(yes) of a question, and a JSON answer.

Backends (``transformers_backend``, ``openai_backend``, ``vllm_backend``) provide two
primitives — the first answer token's log-probabilities, and plain text generation — and
this base class builds the two calls every stage uses on top of them, once:

* ``p_yes``: the yes/no variants of the first answer token (``yes``, ``Yes``, `` YES``…)
  are summed on each side and normalised, so the score is graded rather than VERA's
  hard 0/1 of the answer text;
* ``answer_json``: generate, pull the JSON object out of the text, validate it against a
  pydantic schema; retry with sampling on failure, then raise ``VlmOutputError`` carrying
  the model's last text so the stage can dead-letter it.

Images are JPEG bytes labelled by the caller (camera names); each prompt shows the label
just before its image.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from stream.errors import ConfigError, InputError

if TYPE_CHECKING:
    from PIL.Image import Image

    from stream.settings import VlmSettings

T = TypeVar("T", bound=BaseModel)

YES = "yes"
NO = "no"
#: Characters a tokenizer puts on a token for a leading space (byte-level BPE, SentencePiece).
_SPACE_MARKS = "Ġ▁ \t\n"


class VlmOutputError(InputError):
    """The model's output did not validate, after every attempt; ``text`` is what it wrote."""

    def __init__(self, message: str, text: str) -> None:
        super().__init__(message)
        self.text = text


@dataclass(frozen=True)
class VlmImage:
    """One encoded image (JPEG or PNG bytes) and the label shown before it (a camera)."""

    data: bytes
    label: str | None = None

    def pil(self) -> Image:
        """Decode to an RGB PIL image.

        Raises:
            InputError: the bytes are not an image PIL can read; the message names the label.
        """
        from PIL import Image, UnidentifiedImageError

        try:
            image = Image.open(io.BytesIO(self.data))
            return image.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            message = f"image {self.label or '?'}: not a decodable image ({len(self.data)} bytes): {exc}"
            raise InputError(message) from exc


@dataclass(frozen=True)
class Prompt:
    """A user turn: labelled images first, then the text."""

    text: str
    images: tuple[VlmImage, ...] = field(default_factory=tuple)


def thin(items: Sequence[Any], limit: int) -> list[Any]:
    """At most ``limit`` items, evenly spaced, first and last kept (all when ``limit`` <= 0)."""
    if limit <= 0 or len(items) <= limit:
        return list(items)
    if limit == 1:
        return [items[len(items) // 2]]
    step = (len(items) - 1) / (limit - 1)
    return [items[round(i * step)] for i in range(limit)]


def label_text(label: str) -> str:
    """The text shown just before a labelled image."""
    return f"Camera {label}:"


def hf_messages(prompt: Prompt) -> list[dict[str, Any]]:
    """The prompt as a Hugging Face chat (content parts; images as ``{"type": "image"}``)."""
    parts: list[dict[str, Any]] = []
    for image in prompt.images:
        if image.label:
            parts.append({"type": "text", "text": label_text(image.label)})
        parts.append({"type": "image"})
    parts.append({"type": "text", "text": prompt.text})
    return [{"role": "user", "content": parts}]


def normalise_token(token: str) -> str:
    """A token's text without leading-space marks, punctuation around it, or case."""
    return token.strip(_SPACE_MARKS).strip(".,:;!\"'").lower()


def yes_probability(logprobs: Mapping[str, float]) -> float:
    """P(yes) from first-token log-probabilities, normalised over the yes and no variants.

    Parameters:
        logprobs: token text -> log-probability (a top-k list, or the variants' own).

    Returns:
        ``P(yes variants) / (P(yes variants) + P(no variants))``. When one side is missing
        from a top-k list, its mass is bounded by the smallest listed probability (every
        unlisted token is at most that likely); when both are missing, 0.5.
    """
    yes = [lp for tok, lp in logprobs.items() if normalise_token(tok) == YES]
    no = [lp for tok, lp in logprobs.items() if normalise_token(tok) == NO]
    if not yes and not no:
        return 0.5
    floor = min(logprobs.values())
    p_yes = sum(math.exp(lp) for lp in yes) if yes else math.exp(floor)
    p_no = sum(math.exp(lp) for lp in no) if no else math.exp(floor)
    return min(1.0, max(0.0, p_yes / (p_yes + p_no)))


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def extract_json(text: str) -> str:
    """The JSON object in a model's text: inside a code fence, or from the first ``{`` to the last ``}``."""
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1)
    start, end = text.find("{"), text.rfind("}")
    return text[start : end + 1] if 0 <= start < end else text.strip()


def validate_json(text: str, schema: type[T]) -> T:
    """Parse and validate a model's JSON answer.

    Raises:
        ValueError: not JSON, or it does not match the schema (pydantic's message).
    """
    return schema.model_validate_json(extract_json(text))


def json_instruction(prompt: str, schema: type[BaseModel]) -> str:
    """The prompt with the schema spelled out, for backends that cannot constrain decoding."""
    return f"{prompt}\nAnswer with one JSON object only, matching this JSON schema:\n{json.dumps(schema.model_json_schema())}"


class VlmBackend(ABC):
    """A vision-language model behind two calls; subclasses supply the primitives.

    Parameters:
        model: the model's name or path (reported with each output).
        json_attempts: generations tried before ``answer_json`` gives up.
        max_new_tokens: generation length bound for JSON answers.
        retry_temperature: sampling temperature of the retries (the first try is greedy,
            so a retry at temperature 0 would write the same text again).
    """

    def __init__(
        self,
        *,
        model: str,
        json_attempts: int = 3,
        max_new_tokens: int = 256,
        retry_temperature: float = 0.7,
    ) -> None:
        self.model = model
        self.json_attempts = max(1, json_attempts)
        self.max_new_tokens = max_new_tokens
        self.retry_temperature = retry_temperature

    # -- primitives ------------------------------------------------------------------

    @abstractmethod
    async def first_token_logprobs(self, prompts: Sequence[Prompt]) -> list[dict[str, float]]:
        """Log-probabilities of candidate first answer tokens, one mapping per prompt.

        Returns:
            token text -> log-probability; must include the yes/no variants when the
            backend can see them (a top-k list may not).
        """

    @abstractmethod
    async def generate_json_text(
        self, prompts: Sequence[Prompt], schema: dict[str, Any], *, max_tokens: int, temperature: float
    ) -> list[str]:
        """Generate answers that should be JSON matching ``schema`` (constrained if the backend can)."""

    async def close(self) -> None:
        """Release the model or connections."""

    # -- the two calls ---------------------------------------------------------------

    async def p_yes(self, question: str, images: Sequence[VlmImage] = ()) -> float:
        """Probability that the answer to ``question`` over ``images`` is yes.

        Parameters:
            question: the full prompt text, ending with the yes/no question.
            images: labelled images shown before it.

        Returns:
            A probability in [0, 1].
        """
        (score,) = await self.p_yes_many([Prompt(question, tuple(images))])
        return score

    async def p_yes_many(self, prompts: Sequence[Prompt]) -> list[float]:
        """``p_yes`` of several prompts; batched where the backend batches."""
        if not prompts:
            return []
        return [yes_probability(lp) for lp in await self.first_token_logprobs(prompts)]

    async def answer_json(self, prompt: str, images: Sequence[VlmImage], schema: type[T]) -> T:
        """A structured answer validated against ``schema``.

        Parameters:
            prompt: the question; the JSON schema is added to it.
            images: labelled images shown before it.
            schema: the pydantic model the answer must validate against.

        Returns:
            The validated answer.

        Raises:
            VlmOutputError: no attempt validated; carries the model's last text.
        """
        request = Prompt(json_instruction(prompt, schema), tuple(images))
        text, problem = "", ""
        for attempt in range(self.json_attempts):
            temperature = 0.0 if attempt == 0 else self.retry_temperature
            (text,) = await self.generate_json_text(
                [request], schema.model_json_schema(), max_tokens=self.max_new_tokens, temperature=temperature
            )
            try:
                return validate_json(text, schema)
            except (ValidationError, ValueError) as exc:
                problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        message = (
            f"{self.model}: answer did not validate as {schema.__name__} after "
            f"{self.json_attempts} attempts ({problem}); model wrote: {text[:2000]!r}"
        )
        raise VlmOutputError(message, text)


async def gather_bounded(coros: Sequence[Any], limit: int) -> list[Any]:
    """Await coroutines concurrently, at most ``limit`` at a time, results in order."""
    semaphore = asyncio.Semaphore(max(1, limit))

    async def one(coro: Any) -> Any:
        async with semaphore:
            return await coro

    return list(await asyncio.gather(*(one(c) for c in coros)))


async def loaded_backend(backend: VlmBackend | None, settings: VlmSettings) -> VlmBackend:
    """``backend``, or the one ``settings`` names (``make_backend``), with its model loaded
    now (a backend with a ``load`` coroutine) rather than on the first batch.

    Raises:
        ConfigError: as ``make_backend``, when ``backend`` is ``None``.
    """
    backend = backend if backend is not None else make_backend(settings)
    load = getattr(backend, "load", None)
    if load is not None:
        await load()
    return backend


def make_backend(settings: VlmSettings) -> VlmBackend:
    """The backend that ``settings.backend`` names, configured from ``settings``.

    Raises:
        ConfigError: no backend configured, an unknown one, or no model named.
    """
    kind = settings.backend.strip().lower()
    if not kind:
        message = "no VLM backend configured: set vlm.backend (ROADSTREAM_VLM__BACKEND) to transformers, vllm or openai"
        raise ConfigError(message)
    if not settings.model:
        message = f"vlm.model is empty: name the model for the {kind} backend (ROADSTREAM_VLM__MODEL)"
        raise ConfigError(message)
    common = {
        "model": settings.model,
        "json_attempts": settings.json_attempts,
        "max_new_tokens": settings.max_new_tokens,
    }
    if kind == "transformers":
        from stages.vlm.transformers_backend import TransformersBackend

        return TransformersBackend(
            processor=settings.processor or None,
            device=settings.device,
            dtype=settings.dtype,
            batch_size=settings.batch_size,
            **common,
        )
    if kind == "openai":
        from stages.vlm.openai_backend import OpenAIBackend

        if not settings.base_url:
            message = "vlm.base_url is empty: the openai backend needs the server's URL, e.g. http://host:8000/v1"
            raise ConfigError(message)
        return OpenAIBackend(
            base_url=settings.base_url,
            api_key=settings.api_key,
            max_concurrency=settings.max_concurrency,
            timeout_s=settings.timeout_s,
            max_retries=settings.max_retries,
            top_logprobs=settings.top_logprobs,
            **common,
        )
    if kind == "vllm":
        from stages.vlm.vllm_backend import VllmBackend

        return VllmBackend(
            max_images=settings.max_images,
            top_logprobs=settings.top_logprobs,
            engine_args=settings.engine_args,
            **common,
        )
    message = f"unknown vlm.backend {settings.backend!r}: expected transformers, vllm or openai"
    raise ConfigError(message)

"""The HTTP backend: an OpenAI-compatible chat-completions server such as ``vllm serve``.

P(yes) asks for one token with ``logprobs`` and ``top_logprobs`` and reads the yes/no
variants among them; JSON answers ask for ``response_format`` ``json_schema`` so a server
with structured output (vLLM) constrains decoding. Requests run concurrently up to
``max_concurrency``, each under a timeout, and failed ones (connection errors, timeouts,
429 and 5xx) are retried with exponential backoff; a 4xx other than 429 is a bad request
and is not.
"""

from __future__ import annotations

import asyncio
import base64
import random
from collections.abc import Sequence
from typing import Any

import httpx

from stages.vlm.base import Prompt, VlmBackend, gather_bounded, label_text
from stream.errors import InputError, RoadstreamError

#: Statuses that say this request itself is bad: dead-letter it, do not retry.
BAD_REQUEST_STATUSES = frozenset({400, 413, 422})


class BackendUnavailable(RoadstreamError):
    """The server could not answer after every retry; the entry should be retried later."""


def data_url(data: bytes) -> str:
    """An image as a ``data:`` URL (JPEG or PNG, told by its magic bytes)."""
    mime = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def openai_messages(prompt: Prompt) -> list[dict[str, Any]]:
    """The prompt as OpenAI chat messages: each image's label as text just before it."""
    parts: list[dict[str, Any]] = []
    for image in prompt.images:
        if image.label:
            parts.append({"type": "text", "text": label_text(image.label)})
        parts.append({"type": "image_url", "image_url": {"url": data_url(image.data)}})
    parts.append({"type": "text", "text": prompt.text})
    return [{"role": "user", "content": parts}]


def yes_no_request(model: str, prompt: Prompt, top_logprobs: int) -> dict[str, Any]:
    """Request body for the first answer token's top log-probabilities."""
    return {
        "model": model,
        "messages": openai_messages(prompt),
        "max_tokens": 1,
        "temperature": 0.0,
        "logprobs": True,
        "top_logprobs": top_logprobs,
    }


def json_request(
    model: str, prompt: Prompt, schema: dict[str, Any], *, max_tokens: int, temperature: float
) -> dict[str, Any]:
    """Request body for a JSON answer constrained by ``schema``."""
    return {
        "model": model,
        "messages": openai_messages(prompt),
        "max_tokens": max_tokens,
        "temperature": temperature,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": schema.get("title", "answer"), "schema": schema, "strict": True},
        },
    }


def parse_top_logprobs(body: dict[str, Any]) -> dict[str, float]:
    """token -> logprob of the first generated token, from a chat-completions response.

    Raises:
        InputError: the response has no log-probabilities (the server ignored them).
    """
    try:
        first = body["choices"][0]["logprobs"]["content"][0]
    except (KeyError, IndexError, TypeError) as exc:
        message = f"server response has no logprobs for the first token: {str(body)[:300]}"
        raise InputError(message) from exc
    found = {item["token"]: float(item["logprob"]) for item in first.get("top_logprobs") or []}
    found.setdefault(first["token"], float(first["logprob"]))
    return found


def parse_text(body: dict[str, Any]) -> str:
    """The first choice's message text."""
    try:
        return body["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError) as exc:
        message = f"server response has no message: {str(body)[:300]}"
        raise InputError(message) from exc


class OpenAIBackend(VlmBackend):
    """A client of an OpenAI-compatible server.

    Parameters:
        model: the served model's name (``--served-model-name`` of ``vllm serve``).
        base_url: the API root, e.g. ``http://gpu-host:8000/v1``.
        api_key: sent as a bearer token when set.
        max_concurrency: requests in flight at most.
        timeout_s: time bound of one request.
        max_retries: extra tries of a failed request.
        backoff_s: first backoff; doubles each retry, with jitter.
        top_logprobs: how many first-token alternatives to ask for.
        client: a ready ``httpx.AsyncClient`` (tests); made here otherwise.
        **kwargs: see ``VlmBackend``.
    """

    def __init__(
        self,
        *,
        model: str,
        base_url: str,
        api_key: str = "",
        max_concurrency: int = 4,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        top_logprobs: int = 20,
        client: httpx.AsyncClient | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model=model, **kwargs)
        self.base_url = base_url.rstrip("/")
        self.max_retries = max(0, max_retries)
        self.backoff_s = backoff_s
        self.top_logprobs = top_logprobs
        self.max_concurrency = max(1, max_concurrency)
        self._semaphore = asyncio.Semaphore(self.max_concurrency)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=self.max_concurrency)
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s), headers=headers, limits=limits
        )

    async def first_token_logprobs(self, prompts: Sequence[Prompt]) -> list[dict[str, float]]:
        """Top log-probabilities of the first token, one request per prompt, concurrently."""
        bodies = [yes_no_request(self.model, p, self.top_logprobs) for p in prompts]
        replies = await gather_bounded([self.chat(b) for b in bodies], self.max_concurrency)
        return [parse_top_logprobs(r) for r in replies]

    async def generate_json_text(
        self, prompts: Sequence[Prompt], schema: dict[str, Any], *, max_tokens: int, temperature: float
    ) -> list[str]:
        """JSON answers under the server's structured output."""
        bodies = [json_request(self.model, p, schema, max_tokens=max_tokens, temperature=temperature) for p in prompts]
        replies = await gather_bounded([self.chat(b) for b in bodies], self.max_concurrency)
        return [parse_text(r) for r in replies]

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST one chat completion, with the concurrency bound and retries.

        Raises:
            InputError: the server called the request itself bad (400, 413, 422).
            BackendUnavailable: no answer after every retry (timeouts, connection
                errors, other statuses); the message says what the last failure was.
        """
        url = f"{self.base_url}/chat/completions"
        problem = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random()))
            try:
                async with self._semaphore:
                    response = await self._client.post(url, json=body)
            except httpx.TimeoutException as exc:
                problem = f"timed out ({type(exc).__name__})"
                continue
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code in BAD_REQUEST_STATUSES:
                message = f"{url}: HTTP {response.status_code}: {response.text[:500]}"
                raise InputError(message)
            if response.status_code >= 400:
                # Rate limits, server failures, and a wrong URL or key: none is the entry's fault.
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            return response.json()
        message = f"{url}: no answer after {self.max_retries + 1} tries; last: {problem}"
        raise BackendUnavailable(message)

    async def close(self) -> None:
        """Close the HTTP connections."""
        await self._client.aclose()

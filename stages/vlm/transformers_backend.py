"""The in-process backend: a transformers image-text-to-text model (Qwen2-VL, Qwen2.5-VL …).

P(yes) comes from the logits of the next token after the chat template's assistant
prefix, read at the ids of every yes/no variant of the vocabulary; JSON answers are
generated and validated by the base class. Model calls run in a worker thread (one at a
time: a model is not re-entrant) so the event loop keeps serving the broker, and prompts
are padded into batches of ``batch_size``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

from stages.vlm.base import NO, YES, Prompt, VlmBackend, hf_messages, normalise_token
from stream.errors import ModelError


class TransformersBackend(VlmBackend):
    """A transformers model loaded with ``AutoModelForImageTextToText.from_pretrained``.

    Parameters:
        model: a local folder or hub name (nothing is downloaded if it is not cached).
        processor: the processor's name or path, when not the model's.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        dtype: ``auto`` or a torch dtype name.
        batch_size: prompts per forward pass.
        **kwargs: see ``VlmBackend``.
    """

    def __init__(
        self,
        *,
        model: str,
        processor: str | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(model=model, **kwargs)
        self.processor_name = processor or model
        self.device = device
        self.dtype = dtype
        self.batch_size = max(1, batch_size)
        self._model: Any = None
        self._processor: Any = None
        self._variants: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._load_lock = asyncio.Lock()

    # -- loading -----------------------------------------------------------------------

    async def load(self) -> None:
        """Load the model and processor now (otherwise on first use).

        Raises:
            ModelError: the model or processor cannot be loaded; the message names it.
        """
        async with self._load_lock:
            if self._model is None:
                await asyncio.to_thread(self._load_sync)

    def _load_sync(self) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        dtype = "auto" if self.dtype == "auto" else getattr(torch, self.dtype)
        device = _resolve_device(self.device)
        try:
            processor = AutoProcessor.from_pretrained(self.processor_name)
            model = AutoModelForImageTextToText.from_pretrained(self.model, dtype=dtype)
        except (OSError, ValueError, KeyError) as exc:
            message = f"VLM {self.model!r} (processor {self.processor_name!r}) cannot be loaded: {exc}"
            raise ModelError(message) from exc
        self._processor = processor
        self._model = model.to(device).eval()
        # Left padding keeps every prompt's last token in the last column of a batch.
        processor.tokenizer.padding_side = "left"
        self._variants = _yes_no_ids(processor.tokenizer)
        if not self._variants[YES] or not self._variants[NO]:
            message = f"VLM {self.model!r}: the tokenizer has no single token for yes or no"
            raise ModelError(message)

    # -- primitives ----------------------------------------------------------------------

    async def first_token_logprobs(self, prompts: Sequence[Prompt]) -> list[dict[str, float]]:
        """Log-probabilities of the yes/no variant tokens as the first answer token."""
        await self.load()
        rows = await asyncio.to_thread(self._next_token_logprobs, list(prompts))
        tokenizer = self._processor.tokenizer
        ids = self._variants[YES] + self._variants[NO]
        names = tokenizer.convert_ids_to_tokens(ids)
        return [{name: float(row[i]) for name, i in zip(names, ids, strict=True)} for row in rows]

    async def top_logprobs(self, prompt: Prompt, k: int) -> list[tuple[str, float]]:
        """The ``k`` likeliest first answer tokens (decoded text) with their log-probabilities."""
        await self.load()
        (row,) = await asyncio.to_thread(self._next_token_logprobs, [prompt])
        values, ids = row.topk(min(k, row.shape[-1]))
        tokenizer = self._processor.tokenizer
        return [(tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, ids, strict=True)]

    async def generate(self, prompts: Sequence[Prompt], *, max_tokens: int, temperature: float = 0.0) -> list[str]:
        """Generate a text answer for each prompt (greedy at temperature 0)."""
        await self.load()
        return await asyncio.to_thread(self._generate_sync, list(prompts), max_tokens, temperature)

    async def generate_json_text(
        self, prompts: Sequence[Prompt], schema: dict[str, Any], *, max_tokens: int, temperature: float
    ) -> list[str]:
        """Unconstrained generation; the schema is already spelled out in the prompt."""
        return await self.generate(prompts, max_tokens=max_tokens, temperature=temperature)

    async def close(self) -> None:
        """Drop the model so its memory can be freed."""
        self._model = None
        self._processor = None

    # -- model calls (in a worker thread) -------------------------------------------------

    def _inputs(self, prompts: list[Prompt]) -> Any:
        processor = self._processor
        texts = [processor.apply_chat_template(hf_messages(p), add_generation_prompt=True) for p in prompts]
        images = [[image.pil() for image in p.images] for p in prompts]
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if any(images):
            kwargs["images"] = [imgs for imgs in images if imgs]
        return processor(**kwargs).to(self._model.device)

    def _next_token_logprobs(self, prompts: list[Prompt]) -> list[Any]:
        import torch

        rows: list[Any] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            with self._lock, torch.inference_mode():
                inputs = self._inputs(chunk)
                logits = self._model(**inputs, logits_to_keep=1).logits[:, -1, :]
                rows.extend(torch.log_softmax(logits.float(), dim=-1).cpu())
        return rows

    def _generate_sync(self, prompts: list[Prompt], max_tokens: int, temperature: float) -> list[str]:
        import torch

        texts: list[str] = []
        sample = temperature > 0
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            with self._lock, torch.inference_mode():
                inputs = self._inputs(chunk)
                out = self._model.generate(
                    **inputs,
                    max_new_tokens=max_tokens,
                    do_sample=sample,
                    temperature=temperature if sample else None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=self._processor.tokenizer.pad_token_id,
                )
            new = out[:, inputs["input_ids"].shape[1] :]
            texts.extend(self._processor.batch_decode(new, skip_special_tokens=True))
        return texts


def _yes_no_ids(tokenizer: Any) -> dict[str, list[int]]:
    """Ids of every vocabulary token that reads as yes or no (``yes``, ``ĠYes``, ``▁NO`` …)."""
    found: dict[str, list[int]] = {YES: [], NO: []}
    for token, index in tokenizer.get_vocab().items():
        word = normalise_token(tokenizer.convert_tokens_to_string([token]))
        if word in found:
            found[word].append(index)
    return found


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"

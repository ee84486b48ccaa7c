"""The vlm worker's handler: escalated windows in, structured JSON answers out.

For each escalation the key frames of its cameras are fetched (the whole batch in one
``get_many``), each image labelled with its camera, and the model is asked for a JSON
answer that validates against ``stream.schemas.VlmAnswerBody``. The backend retries an
answer that does not validate; when no attempt does, the escalation is dead-lettered with
the model's text (an ``InputError``). Escalations are answered concurrently, at most
``vlm.max_concurrency`` at a time; the answer goes to the drive's fuse partition.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from stages.vlm.base import VlmBackend, VlmImage, loaded_backend
from stages.vlm.escalation import escalation_prompt, select_frames
from stream import names
from stream.errors import InputError
from stream.ids import output_key
from stream.schemas import Escalation, VlmAnswer, VlmAnswerBody
from stream.settings import Settings
from workers.handler import BatchResult, Delivery, Handler, Output
from workers.handlers.vera import Key, _key, fetch_images

if TYPE_CHECKING:
    from brokers.blobs import BlobStore


class VlmHandler(Handler):
    """Answers escalations with a structured VLM answer.

    Parameters:
        settings: all settings (``vlm`` for the backend, ``broker`` for partitions).
        blobs: the frame blob store.
        backend: a ready backend (tests); made from ``settings.vlm`` otherwise.
    """

    group = names.VLM
    inputs = (names.ESCALATIONS,)
    partitioned = False
    accepts = (Escalation,)

    def __init__(self, settings: Settings, blobs: BlobStore, *, backend: VlmBackend | None = None) -> None:
        self.settings = settings
        self.blobs = blobs
        self.backend = backend

    async def start(self) -> None:
        """Make the backend and load its model."""
        self.backend = await loaded_backend(self.backend, self.settings.vlm)

    async def prepare(self, batch: list[Delivery]) -> dict[Key, list[VlmImage] | InputError]:
        """Fetch the key frames of the batch's escalations in one ``get_many``: per
        delivery, its images or the error."""
        limit = self.settings.vlm.max_images
        wanted = {
            _key(d): [(f.blob_key, f.camera) for f in select_frames(d.message.frames, limit)]
            for d in batch
            if isinstance(d.message, Escalation)
        }
        return await fetch_images(self.blobs, wanted)

    async def handle(
        self, batch: list[Delivery], prepared: dict[Key, list[VlmImage] | InputError] | None = None
    ) -> BatchResult:
        """Answer each escalation; a failure stays with its own delivery."""
        prepared = prepared if prepared is not None else await self.prepare(batch)
        semaphore = asyncio.Semaphore(max(1, self.settings.vlm.max_concurrency))

        async def one(delivery: Delivery) -> Output:
            images = prepared[_key(delivery)]
            if isinstance(images, Exception):
                raise images
            async with semaphore:
                return await self._answer(delivery.message, images)

        outcomes = await asyncio.gather(*(one(d) for d in batch), return_exceptions=True)
        result = BatchResult()
        for delivery, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Output):
                result.outputs.append(outcome)
            else:
                result.failed.append((delivery, outcome))
        return result

    async def stop(self) -> None:
        """Release the backend."""
        if self.backend is not None:
            await self.backend.close()

    async def _answer(self, escalation: Escalation, images: list[VlmImage]) -> Output:
        assert self.backend is not None
        started = time.perf_counter()
        body = await self.backend.answer_json(escalation_prompt(escalation), images, VlmAnswerBody)
        message = VlmAnswer(
            drive_id=escalation.drive_id,
            window=escalation.window,
            answer=body,
            model=self.backend.model,
            latency_ms=(time.perf_counter() - started) * 1000,
        )
        partition = names.drive_partition(escalation.drive_id, self.settings.broker.fuse_partitions)
        return Output(names.ANSWERS, message, output_key(names.VLM, escalation.drive_id, escalation.window), partition)


def build(settings: Settings, blobs: BlobStore) -> VlmHandler:
    """The registry's builder for ``roadstream worker vlm``."""
    return VlmHandler(settings, blobs)

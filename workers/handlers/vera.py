"""The vera worker's handler: segments in, VERA anomaly scores out to the drive's fuse partition.

Stateless: ``prepare`` fetches the key-frame blobs of a whole batch in one ``get_many``
(while the previous batch is being scored), ``handle`` scores the batch in chunks of
``vlm.batch_size`` prompts, at most ``vlm.max_concurrency`` chunks in flight, and returns
one ``AnomalyScore`` per segment with a dedupe key made of (drive, camera, index), so a
redelivered segment never yields a second score. A segment whose frames expired or do not
decode is dead-lettered (``InputError``); a backend that cannot answer leaves the segment
pending for redelivery.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from stages.vera import QuestionSet, load_questions, score_segments
from stages.vlm.base import VlmBackend, VlmImage, loaded_backend
from stream import names
from stream.errors import InputError
from stream.ids import output_key
from stream.schemas import AnomalyScore, Segment
from stream.settings import Settings
from workers.handler import BatchResult, Delivery, Handler, Output

if TYPE_CHECKING:
    from brokers.blobs import BlobStore

Key = tuple[str, str]


def _key(delivery: Delivery) -> Key:
    return delivery.entry.stream, delivery.entry.id


async def fetch_images(
    blobs: BlobStore, wanted: dict[Key, list[tuple[str, str]]]
) -> dict[Key, list[VlmImage] | InputError]:
    """Fetch every blob of a batch in one round trip.

    Parameters:
        blobs: the blob store.
        wanted: per delivery, (blob key, label) of each image in order.

    Returns:
        Per delivery, its labelled images, or an ``InputError`` naming the missing blobs.
    """
    keys = [blob for pairs in wanted.values() for blob, _ in pairs]
    found = dict(zip(keys, await blobs.get_many(keys), strict=True)) if keys else {}
    images: dict[Key, list[VlmImage] | InputError] = {}
    for key, pairs in wanted.items():
        missing = [blob for blob, _ in pairs if found.get(blob) is None]
        if missing:
            message = f"entry {key[1]} of {key[0]}: frame blobs expired or missing: {', '.join(missing[:5])}"
            images[key] = InputError(message)
        else:
            images[key] = [VlmImage(found[blob], label) for blob, label in pairs]
    return images


class VeraHandler(Handler):
    """Scores segments with VERA's guiding questions.

    Parameters:
        settings: all settings (``vlm`` for the backend and questions, ``broker`` for partitions).
        blobs: the frame blob store.
        backend: a ready backend (tests, benchmarks); made from ``settings.vlm`` otherwise.
        questions: a question set; loaded from ``settings.vlm.questions`` (or the default) otherwise.
    """

    group = names.VERA
    inputs = (names.SEGMENTS,)
    partitioned = False
    accepts = (Segment,)

    def __init__(
        self,
        settings: Settings,
        blobs: BlobStore,
        *,
        backend: VlmBackend | None = None,
        questions: QuestionSet | None = None,
    ) -> None:
        self.settings = settings
        self.blobs = blobs
        self.backend = backend
        self.questions = questions

    async def start(self) -> None:
        """Make the backend and load the questions; load the model now rather than on the first batch."""
        if self.questions is None:
            self.questions = load_questions(self.settings.vlm.questions or None)
        self.backend = await loaded_backend(self.backend, self.settings.vlm)

    async def prepare(self, batch: list[Delivery]) -> dict[Key, list[VlmImage] | InputError]:
        """Fetch the batch's key frames in one ``get_many``: per delivery, its images or the error."""
        wanted = {_key(d): self._frames(d.message) for d in batch if isinstance(d.message, Segment)}
        return await fetch_images(self.blobs, wanted)

    async def handle(
        self, batch: list[Delivery], prepared: dict[Key, list[VlmImage] | InputError] | None = None
    ) -> BatchResult:
        """Score each segment; one output per segment, failures per delivery."""
        images = prepared if prepared is not None else await self.prepare(batch)
        result = BatchResult()
        ready = []
        for delivery in batch:
            got = images[_key(delivery)]
            if isinstance(got, BaseException):
                result.failed.append((delivery, got))
            else:
                ready.append((delivery, got))
        for (delivery, _), score in zip(ready, await self._score([imgs for _, imgs in ready]), strict=True):
            if isinstance(score, BaseException):
                result.failed.append((delivery, score))
            else:
                result.outputs.append(self._output(delivery.message, score))
        return result

    async def stop(self) -> None:
        """Release the backend."""
        if self.backend is not None:
            await self.backend.close()

    # -- helpers -----------------------------------------------------------------------

    def _frames(self, segment: Segment) -> list[tuple[str, str]]:
        return [(kf.blob_key, f"{segment.camera} t={kf.t:.1f}s") for kf in segment.key_frames]

    async def _score(self, segments: Sequence[list[VlmImage]]) -> list[float | BaseException]:
        """Scores in input order; chunks run concurrently up to ``max_concurrency``."""
        vlm = self.settings.vlm
        size = max(1, vlm.batch_size)
        chunks = [list(segments[i : i + size]) for i in range(0, len(segments), size)]
        semaphore = asyncio.Semaphore(max(1, vlm.max_concurrency))

        async def one(chunk: list[list[VlmImage]]) -> list[float | BaseException]:
            async with semaphore:
                return await self._score_chunk(chunk)

        results = await asyncio.gather(*(one(c) for c in chunks))
        return [score for chunk in results for score in chunk]

    async def _score_chunk(self, chunk: list[list[VlmImage]]) -> list[float | BaseException]:
        assert self.backend is not None and self.questions is not None
        max_images = self.settings.vlm.max_images
        try:
            return list(await score_segments(self.backend, self.questions, chunk, max_images=max_images))
        except Exception as exc:  # noqa: BLE001 - any failure is reported per segment below
            if len(chunk) == 1:
                return [exc]
        # One bad segment must not fail its neighbours: score them one by one to find it.
        singles = [score_segments(self.backend, self.questions, [c], max_images=max_images) for c in chunk]
        outcomes = await asyncio.gather(*singles, return_exceptions=True)
        return [o if isinstance(o, BaseException) else o[0] for o in outcomes]

    def _output(self, segment: Segment, score: float) -> Output:
        assert self.backend is not None and self.questions is not None
        message = AnomalyScore(
            drive_id=segment.drive_id,
            camera=segment.camera,
            index=segment.index,
            t_start=segment.t_start,
            t_end=segment.t_end,
            score=min(1.0, max(0.0, score)),
            descriptor=segment.descriptor,
            model=self.backend.model,
            questions=self.questions.id,
        )
        partition = names.drive_partition(segment.drive_id, self.settings.broker.fuse_partitions)
        key = output_key(names.VERA, segment.drive_id, segment.camera, segment.index)
        return Output(names.ANOMALY, message, key, partition)


def build(settings: Settings, blobs: BlobStore) -> VeraHandler:
    """The registry's builder for ``roadstream worker vera``."""
    return VeraHandler(settings, blobs)

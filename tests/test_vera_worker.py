"""The vera and vlm handlers: unit behaviour, and through the real runtime on Redis."""

from __future__ import annotations

import asyncio
import json

import pytest
from vlm_tiny import fixture_segment

from brokers.base import Entry
from brokers.memory import MemoryBlobStore
from brokers.redis import RedisBlobStore, RedisBroker
from stages.vera import QuestionSet
from stages.vlm.base import VlmBackend, VlmOutputError
from stages.vlm.transformers_backend import TransformersBackend
from stream import codec, names
from stream.errors import InputError
from stream.ids import output_key
from stream.schemas import AnomalyScore, CameraFrame, DeadLetter, Escalation, VlmAnswer
from stream.settings import Settings
from workers.handler import Delivery
from workers.runtime import Worker
from workers.handlers.vera import VeraHandler
from stages.vlm.escalation import select_frames
from workers.handlers.vlm import VlmHandler

NS = "rsvera"


@pytest.fixture(scope="module")
def tiny(tiny_vlm_path) -> TransformersBackend:
    return TransformersBackend(model=str(tiny_vlm_path), batch_size=4, max_new_tokens=12, json_attempts=2)


def settings() -> Settings:
    return Settings(namespace=NS, vlm={"max_concurrency": 2, "batch_size": 2})


class CountingBlobs(MemoryBlobStore):
    def __init__(self) -> None:
        super().__init__()
        self.gets = 0

    async def get_many(self, keys):
        self.gets += 1
        return await super().get_many(keys)


async def segments(store, n: int, drive: str = "d1"):
    made = []
    for i in range(n):
        segment, blobs = fixture_segment(drive, "front", i, roadwork=i % 2 == 0)
        await store.put_many(blobs)
        made.append(segment)
    return made


def deliveries(messages) -> list[Delivery]:
    return [Delivery(Entry("rs:in", f"{i}-0", codec.encode(m)), m) for i, m in enumerate(messages)]


async def test_vera_scores_each_segment_to_its_drive_partition(tiny):
    # Given five segments whose key frames are in the blob store
    store = CountingBlobs()
    batch = deliveries(await segments(store, 5))
    handler = VeraHandler(settings(), store, backend=tiny, questions=QuestionSet(("Are there cones?",)))
    await handler.start()
    # When the runtime prepares and handles the batch
    result = await handler.handle(batch, await handler.prepare(batch))
    # Then the blobs came in one round trip and each segment has a score for fuse
    assert store.gets == 1 and not result.failed
    assert [o.message.index for o in result.outputs] == [0, 1, 2, 3, 4]
    partition = names.drive_partition("d1", settings().broker.fuse_partitions)
    for out in result.outputs:
        assert out.hop == names.ANOMALY and out.partition == partition
        assert isinstance(out.message, AnomalyScore) and 0.0 < out.message.score < 1.0
        assert out.dedupe_key == output_key(names.VERA, "d1", "front", out.message.index)
        assert out.message.questions == QuestionSet(("Are there cones?",)).id


async def test_vera_dead_letters_a_segment_whose_frames_expired(tiny):
    # Given two segments, the second with its blobs gone
    store = MemoryBlobStore()
    made = await segments(store, 2)
    await store.delete_many([made[1].key_frames[0].blob_key])
    handler = VeraHandler(settings(), store, backend=tiny)
    await handler.start()
    # When handled
    result = await handler.handle(deliveries(made))
    # Then the first is scored and the second failed as bad input naming the blob
    assert [o.message.index for o in result.outputs] == [0]
    (failed, error), = result.failed
    assert failed.message.index == 1 and isinstance(error, InputError) and "d1:front:50" in str(error)


class Scripted(VlmBackend):
    """Valid answers for the vlm handler; counts prompts and images."""

    def __init__(self) -> None:
        super().__init__(model="scripted")
        self.seen: list[int] = []

    async def first_token_logprobs(self, prompts):
        return [{"yes": -0.5, "no": -1.0} for _ in prompts]

    async def generate_json_text(self, prompts, schema, *, max_tokens, temperature):
        self.seen.append(len(prompts[0].images))
        labels = sorted({i.label for i in prompts[0].images})
        return [json.dumps({"roadwork": True, "confidence": 0.9, "objects": [{"type": "cone", "cameras": labels}]})]


async def escalations(store, n: int) -> list[Escalation]:
    made = []
    for window in range(n):
        frames = []
        for camera in ("front", "back"):
            segment, blobs = fixture_segment("d2", camera, window, frames=2)
            await store.put_many(blobs)
            frames += [CameraFrame(camera=camera, blob_key=kf.blob_key, t=kf.t) for kf in segment.key_frames]
        made.append(Escalation(drive_id="d2", window=window, t_start=0, t_end=2, frames=frames, confidence=0.5))
    return made


async def test_vlm_answers_with_images_labelled_by_camera():
    # Given escalations over two cameras and a backend that answers valid JSON
    store = MemoryBlobStore()
    backend = Scripted()
    handler = VlmHandler(settings(), store, backend=backend)
    # When handled
    result = await handler.handle(deliveries(await escalations(store, 3)))
    # Then each window has an answer in the drive's partition, naming the cameras it was shown
    assert len(result.outputs) == 3 and not result.failed
    out = result.outputs[0]
    assert out.hop == names.ANSWERS and out.partition == names.drive_partition("d2", settings().broker.fuse_partitions)
    assert isinstance(out.message, VlmAnswer) and out.message.answer.objects[0].cameras == ["back", "front"]
    assert backend.seen == [4, 4, 4]


async def test_vlm_dead_letters_invalid_json_with_the_models_text(tiny):
    # Given the random tiny model, which never writes valid JSON
    store = MemoryBlobStore()
    handler = VlmHandler(settings(), store, backend=tiny)
    # When an escalation is handled
    result = await handler.handle(deliveries(await escalations(store, 1)))
    # Then it failed as bad input (dead-lettered at once) carrying what the model wrote
    (_, error), = result.failed
    assert isinstance(error, VlmOutputError) and isinstance(error, InputError)
    assert "after 2 attempts" in str(error) and error.text


def test_frame_selection_shares_the_image_budget_across_cameras():
    frames = [CameraFrame(camera=c, blob_key=f"{c}{i}", t=i) for c in ("a", "b", "c") for i in range(6)]
    chosen = select_frames(frames, 6)
    assert [f.camera for f in chosen] == ["a", "a", "b", "b", "c", "c"]
    assert len(select_frames(frames, 2)) == 2


# -- through the real runtime on Redis ------------------------------------------------------


async def run_burst(handler, redis_url, conf, messages, hop):
    broker = RedisBroker(url=redis_url, namespace=NS, settings=conf.broker)
    try:
        for message in messages:
            await broker.publish(names.stream_name(hop, ns=NS), codec.encode(message))
        worker = Worker(handler, broker, handler.blobs, conf, burst=True)
        await asyncio.wait_for(worker.run(), timeout=60)
        return broker, worker
    except BaseException:
        await broker.close()
        raise


@pytest.mark.redis
async def test_vera_worker_publishes_scores_through_redis(tiny, redis_url):
    # Given segments on the segments stream and their frames in the Redis blob store
    conf = settings()
    store = RedisBlobStore(redis_url, namespace=NS)
    made = await segments(store, 4)
    # When the vera worker drains the stream
    broker, worker = await run_burst(VeraHandler(conf, store, backend=tiny), redis_url, conf, made, names.SEGMENTS)
    # Then fuse's partition of the drive holds one score per segment
    stream = names.stream_name(names.ANOMALY, names.drive_partition("d1", conf.broker.fuse_partitions), ns=NS)
    scores = [codec.decode(e.data) for e in await broker.range(stream)]
    assert sorted(s.index for s in scores) == [0, 1, 2, 3]
    assert worker.counts["failed"] == 0
    await broker.close()
    await store.close()


@pytest.mark.redis
async def test_vlm_worker_dead_letters_invalid_answers_through_redis(tiny, redis_url):
    # Given an escalation and the random tiny model
    conf = settings()
    store = RedisBlobStore(redis_url, namespace=NS)
    made = await escalations(store, 1)
    # When the vlm worker drains the stream
    broker, _ = await run_burst(VlmHandler(conf, store, backend=tiny), redis_url, conf, made, names.ESCALATIONS)
    # Then the escalation sits in the dead-letter stream with the model's text, and no answer was published
    (letter,) = [codec.decode(e.data) for e in await broker.range(broker.dead_letter_stream)]
    assert isinstance(letter, DeadLetter) and "model wrote" in letter.error
    assert await broker.streams(f"{NS}:{names.ANSWERS}*") == []
    await broker.close()
    await store.close()

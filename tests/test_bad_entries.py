"""Entries a worker cannot read, and tasks of a worker that end: on a real redis-server.

An entry without the payload field (``XADD stream * x y``: written by hand or by another
program) must become a dead letter with its reason wherever the worker meets it (a read,
a reclaim of an idle entry, the replay of a partition it takes over), and the worker goes
on. A task of the worker that ends unexpectedly stops the worker, which then reports
not-live and raises (its process exits non-zero and is restarted).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from brokers.memory import MemoryBlobStore
from brokers.redis import RedisBroker
from conftest import FAST_SETTINGS, TEST_NAMESPACE
from fixtures.relay import GroupingHandler, RelayHandler, frame
from stream import codec, names
from stream.errors import WorkerFailed
from stream.schemas import DeadLetter, FrameRef
from stream.settings import Settings, load_settings
from workers.handler import BatchResult
from workers.runtime import Worker

pytestmark = pytest.mark.redis

UNREADABLE = "has no payload field 'd' (its fields: x)"


@pytest.fixture
async def broker(redis_url: str) -> AsyncIterator[RedisBroker]:
    made = RedisBroker(url=redis_url, namespace=TEST_NAMESPACE, settings=FAST_SETTINGS.model_copy())
    yield made
    await made.close()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


def settings_for(broker: RedisBroker) -> Settings:
    worker = {"batch_size": 8, "max_wait_ms": 20, "heartbeat_s": 0.05, "reclaim_interval_s": 0.1, "grace_s": 2}
    settings = load_settings(environ={}, worker=worker)
    return settings.model_copy(update={"broker": broker.settings, "namespace": broker.namespace})


async def wait_until(check: Callable[[], Awaitable[bool]], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def outputs(broker: RedisBroker) -> list[FrameRef]:
    entries = await broker.range(names.stream_name("bench-out", ns=broker.namespace), count=1000)
    return [codec.decode(e.data, FrameRef) for e in entries]


async def letters(broker: RedisBroker) -> list[DeadLetter]:
    return [codec.decode(e.data, DeadLetter) for e in await broker.range(broker.dead_letter_stream)]


async def run_until(worker: Worker, done: Callable[[], Awaitable[bool]]) -> None:
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: _either(task, done))
        assert not task.done(), f"the worker stopped: {worker.failure!r}"
        assert worker.live()
    finally:
        worker.stop()
        await task


async def _either(task: asyncio.Task, done: Callable[[], Awaitable[bool]]) -> bool:
    return task.done() or await done()


async def test_an_entry_without_payload_read_is_dead_lettered_and_the_worker_goes_on(broker, raw) -> None:
    # Given an entry without the payload field ahead of five good frames on a stateless hop
    stream = names.stream_name("bench-in", ns=broker.namespace)
    bad_id = (await raw.xadd(stream, {"x": "y"})).decode()
    for seq in range(5):
        await broker.publish(stream, codec.encode(frame("d1", seq)))
    worker = Worker(RelayHandler(), broker, MemoryBlobStore(), settings_for(broker), consumer="w1")

    # When the worker reads them
    await run_until(worker, lambda: _has(broker, 5))

    # Then the bad entry is one dead letter with its reason, and the good frames went on
    (letter,) = await letters(broker)
    assert (letter.entry_id, letter.stream, letter.group) == (bad_id, stream, "relay")
    assert UNREADABLE in letter.error
    assert [f.seq for f in await outputs(broker)] == list(range(5))


async def test_an_entry_without_payload_reclaimed_from_a_dead_consumer_is_dead_lettered(broker, raw) -> None:
    # Given an entry without the payload field pending (idle) with a consumer that died
    stream = names.stream_name("bench-in", ns=broker.namespace)
    await broker.ensure_group(stream, "relay")
    bad_id = (await raw.xadd(stream, {"x": "y"})).decode()
    await raw.xreadgroup("relay", "ghost", {stream: ">"})
    for seq in range(5):
        await broker.publish(stream, codec.encode(frame("d1", seq)))
    worker = Worker(RelayHandler(), broker, MemoryBlobStore(), settings_for(broker), consumer="w1")

    # When the worker reclaims it (XAUTOCLAIM) after the claim timeout
    await run_until(worker, lambda: _has(broker, 5, letters=1))

    # Then it is dead-lettered with its reason, nothing of it is pending, the rest went on
    (letter,) = await letters(broker)
    assert letter.entry_id == bad_id and UNREADABLE in letter.error
    assert (await broker.stats(stream)).group("relay").pending == 0


async def test_an_entry_without_payload_replayed_on_a_takeover_is_dead_lettered(broker, raw) -> None:
    # Given a frames partition whose owner died holding an entry without the payload field
    # and frames 0-4 of a camera
    settings = settings_for(broker)
    partition = names.frame_partition("d1", "front", settings.broker.frame_partitions)
    stream = names.stream_name(names.FRAMES, partition, broker.namespace)
    await broker.ensure_group(stream, "grouping")
    bad_id = (await raw.xadd(stream, {"x": "y"})).decode()
    for seq in range(5):
        await broker.publish(stream, codec.encode(frame("d1", seq)))
    await raw.xreadgroup("grouping", "ghost", {stream: ">"})
    worker = Worker(GroupingHandler(size=5), broker, MemoryBlobStore(), settings, consumer="w1")

    # When a new worker takes the partition over (replaying its pending entries by id)
    await run_until(worker, lambda: _has(broker, 1, letters=1))

    # Then the bad entry is dead-lettered with its reason, and the frames made their group
    (letter,) = await letters(broker)
    assert letter.entry_id == bad_id and UNREADABLE in letter.error
    assert [(g.seq, g.tick) for g in await outputs(broker)] == [(0, 0 + 1 + 2 + 3 + 4)]


class TickFails(RelayHandler):
    """A stage whose idle tick has a bug: it raises."""

    async def tick(self) -> BatchResult:
        message = "a bug in tick"
        raise RuntimeError(message)




async def test_a_worker_whose_task_ends_reports_not_live_and_raises(broker) -> None:
    # Given a worker whose read loop will meet an unexpected error (the stage's tick)
    worker = Worker(TickFails(), broker, MemoryBlobStore(), settings_for(broker), consumer="w1")

    # When it runs
    with pytest.raises(WorkerFailed) as raised:
        await asyncio.wait_for(worker.run(), timeout=30)

    # Then it stopped by itself, naming the error, and is not live
    assert "a bug in tick" in str(raised.value)
    assert not worker.live() and not worker.ready()


async def _has(broker: RedisBroker, n: int, letters: int = 0) -> bool:
    return len(await outputs(broker)) >= n and (await broker.stats(broker.dead_letter_stream)).length >= letters

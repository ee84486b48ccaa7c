"""Streams are trimmed below what every group acknowledged; streams no group reads are capped.

Real redis-server (the session's private one): a worker trims its input streams in its
heartbeat, never an entry still pending (held in an open window) or unread, and caps
the streams it writes that no group reads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from brokers.memory import MemoryBlobStore
from brokers.redis import RedisBroker
from conftest import FAST_SETTINGS, TEST_NAMESPACE
from fixtures.relay import GroupingHandler, RelayHandler, frame
from stream import codec, names
from stream.settings import Settings, load_settings
from workers.runtime import Worker

pytestmark = pytest.mark.redis


@pytest.fixture
async def broker(redis_url: str) -> AsyncIterator[RedisBroker]:
    made = RedisBroker(url=redis_url, namespace=TEST_NAMESPACE, settings=FAST_SETTINGS.model_copy(update={"ungrouped_cap": 5}))
    yield made
    await made.close()


def settings_for(broker: RedisBroker) -> Settings:
    worker = {"batch_size": 8, "max_wait_ms": 20, "heartbeat_s": 0.05, "reclaim_interval_s": 0.1, "grace_s": 2,
              "trim_interval_s": 0.1}  # fmt: skip
    settings = load_settings(environ={}, worker=worker)
    return settings.model_copy(update={"broker": broker.settings, "namespace": broker.namespace})


async def until(check, worker: Worker, task: asyncio.Task) -> None:
    deadline = time.monotonic() + 30  # fails the test instead of hanging it
    while not await check():
        assert not task.done() and time.monotonic() < deadline, worker.failure
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(("hop", "kept"), [(names.SEGMENTS, 5), (names.VERDICTS, 20)])
async def test_a_worker_trims_what_its_group_acked_and_caps_a_stage_hop_no_group_reads(broker, hop, kept) -> None:
    # Given 20 frames on a stateless stage's input; no group reads its output: the
    # segments hop (vera off), or the verdicts that users read by range (never capped)
    source = names.stream_name("bench-in", ns=broker.namespace)
    out = names.stream_name(hop, ns=broker.namespace)
    for seq in range(20):
        await broker.publish(source, codec.encode(frame("d1", seq)))
    worker = Worker(RelayHandler(out_hop=hop), broker, MemoryBlobStore(), settings_for(broker), consumer="w1")
    task = asyncio.create_task(worker.run())
    try:
        # When it has relayed them all and its heartbeat trimmed
        async def trimmed() -> bool:
            return worker.counts["out"] == 20 and (await broker.stats(source)).length == 0 and (
                await broker.stats(out)).length == kept and worker.counts["trimmed"] >= 20 + (20 - kept)  # fmt: skip

        await until(trimmed, worker, task)
    finally:
        worker.stop()
        await task

    # Then the input holds nothing (all acknowledged), the segments their newest 5 entries,
    # the verdicts all 20
    assert [codec.decode(e.data).seq for e in await broker.range(out)] == list(range(20 - kept, 20))


async def test_entries_held_in_an_open_window_are_never_trimmed(broker) -> None:
    # Given a grouping stage (groups of 5) and 7 frames of a camera: 2 stay in an open group
    settings = settings_for(broker)
    partition = names.frame_partition("d1", "front", settings.broker.frame_partitions)
    source = names.stream_name(names.FRAMES, partition, broker.namespace)
    for seq in range(7):
        await broker.publish(source, codec.encode(frame("d1", seq)))
    worker = Worker(GroupingHandler(size=5), broker, MemoryBlobStore(), settings, consumer="w1")
    task = asyncio.create_task(worker.run())
    try:
        # When the first group is out and trims have run
        async def trimmed() -> bool:
            return worker.counts["trimmed"] >= 5

        await until(trimmed, worker, task)
        # Then the stream keeps exactly the two held frames, still pending
        left = [codec.decode(e.data).seq for e in await broker.range(source)]
        assert left == [5, 6]
        assert (await broker.stats(source)).group("grouping").pending == 2
        # and a new frame completing nothing is kept too (unread or pending, never cut)
        await broker.publish(source, codec.encode(frame("d1", 7)))
        await until(lambda: _pending(broker, source, 3), worker, task)
        assert [codec.decode(e.data).seq for e in await broker.range(source)] == [5, 6, 7]
    finally:
        worker.stop()
        await task


async def _pending(broker: RedisBroker, stream: str, n: int) -> bool:
    return (await broker.stats(stream)).group("grouping").pending == n

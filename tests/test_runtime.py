"""The worker runtime over both brokers: batching, acks, dead letters, takeover."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import msgpack
import pytest

from brokers.base import Broker
from brokers.memory import MemoryBlobStore
from brokers.partitions import balanced_owners
from fixtures.relay import BAD_INPUT_DRIVE, FLAKY_DRIVE, GroupingHandler, RelayHandler, frame
from stream import codec, names
from stream.schemas import DeadLetter, FrameRef
from stream.settings import Settings, load_settings
from workers.handler import Handler
from workers.runtime import Worker


def fast_settings(broker: Broker, **worker: object) -> Settings:
    """Settings with the broker's fast bounds and a quick worker loop."""
    base = {"batch_size": 8, "max_wait_ms": 20, "heartbeat_s": 0.05, "reclaim_interval_s": 0.1, "grace_s": 2}
    settings = load_settings(environ={}, worker={**base, **worker})
    return settings.model_copy(update={"broker": broker.settings, "namespace": broker.namespace})


async def wait_until(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Poll ``check`` until it holds; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(0.02)


def start(handler: Handler, broker: Broker, settings: Settings, name: str) -> tuple[Worker, asyncio.Task]:
    worker = Worker(handler, broker, MemoryBlobStore(), settings, consumer=name)
    return worker, asyncio.create_task(worker.run())


async def publish_frames(broker: Broker, hop: str, frames: list[FrameRef], partitions: int | None = None) -> None:
    for message in frames:
        partition = None if partitions is None else names.frame_partition(message.drive_id, message.camera, partitions)
        await broker.publish(names.stream_name(hop, partition, broker.namespace), codec.encode(message))


async def outputs(broker: Broker, hop: str = "bench-out") -> list[FrameRef]:
    entries = await broker.range(names.stream_name(hop, ns=broker.namespace), count=100_000)
    return [codec.decode(e.data, FrameRef) for e in entries]


async def dead_letters(broker: Broker) -> list[DeadLetter]:
    entries = await broker.range(broker.dead_letter_stream, count=1000)
    return [codec.decode(e.data, DeadLetter) for e in entries]


async def test_every_input_yields_one_output_and_is_acked(broker: Broker) -> None:
    # Given 30 frames on the input hop
    await publish_frames(broker, "bench-in", [frame("d1", i) for i in range(30)])
    worker, task = start(RelayHandler(), broker, fast_settings(broker), "w1")

    # When the worker has relayed them
    await wait_until(lambda: _count(broker, 30))
    worker.stop()
    await task

    # Then each input gave one output, in order, and nothing is left pending
    assert [m.seq for m in await outputs(broker)] == list(range(30))
    stats = await broker.stats(names.stream_name("bench-in", ns=broker.namespace))
    assert stats.group("relay").pending == 0


async def _count(broker: Broker, n: int, hop: str = "bench-out") -> bool:
    return len(await outputs(broker, hop)) >= n


async def test_batches_are_cut_at_the_size_bound(broker: Broker) -> None:
    # Given more entries waiting than one batch holds
    await publish_frames(broker, "bench-in", [frame("d1", i) for i in range(20)])
    handler = RelayHandler()
    worker, task = start(handler, broker, fast_settings(broker, batch_size=6, max_wait_ms=200), "w1")

    # When they are processed
    await wait_until(lambda: _count(broker, 20))
    worker.stop()
    await task

    # Then no batch was larger than the bound, and full batches were formed
    assert max(handler.batches) <= 6
    assert handler.batches[0] == 6


async def test_a_partial_batch_goes_after_the_wait(broker: Broker) -> None:
    # Given a batch bound far above what arrives
    handler = RelayHandler()
    worker, task = start(handler, broker, fast_settings(broker, batch_size=500, max_wait_ms=30), "w1")

    # When three frames arrive and no more
    await publish_frames(broker, "bench-in", [frame("d1", i) for i in range(3)])
    await wait_until(lambda: _count(broker, 3))
    worker.stop()
    await task

    # Then they were processed without waiting for the batch to fill
    assert sum(handler.batches) == 3


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"\xc1\xff garbage", "not a msgpack entry"),
        (msgpack.packb({"k": "frame", "v": 99, "p": {}}), "schema version 99"),
        (msgpack.packb({"k": "frame", "v": 1, "p": {"drive_id": "d1"}}), "Field required"),
        (msgpack.packb({"k": "mystery", "v": 1, "p": {}}), "unknown message kind"),
    ],
)
async def test_malformed_entries_are_dead_lettered_and_the_worker_goes_on(
    broker: Broker, raw: bytes, reason: str
) -> None:
    # Given a malformed entry between two good ones
    stream = names.stream_name("bench-in", ns=broker.namespace)
    await publish_frames(broker, "bench-in", [frame("d1", 0)])
    await broker.publish(stream, raw)
    await publish_frames(broker, "bench-in", [frame("d1", 1)])
    worker, task = start(RelayHandler(), broker, fast_settings(broker), "w1")

    # When the worker has read all three
    await wait_until(lambda: _count(broker, 2))
    worker.stop()
    await task

    # Then the bad one is a dead letter with a readable reason and the original bytes
    letters = await dead_letters(broker)
    assert len(letters) == 1
    assert reason in letters[0].error
    assert letters[0].raw == raw
    assert letters[0].stream == stream


async def test_input_errors_are_dead_lettered_at_once(broker: Broker) -> None:
    # Given a frame the stage rejects as bad input
    await publish_frames(broker, "bench-in", [frame(BAD_INPUT_DRIVE, 7), frame("d1", 1)])
    worker, task = start(RelayHandler(), broker, fast_settings(broker), "w1")

    # When it is processed
    await wait_until(lambda: _count(broker, 1))
    await wait_until(lambda: _has_letters(broker, 1))
    worker.stop()
    await task

    # Then it was dead-lettered on its first delivery, with the stage's message
    (letter,) = await dead_letters(broker)
    assert letter.deliveries == 1
    assert "frame 7: bad input" in letter.error


async def _has_letters(broker: Broker, n: int) -> bool:
    return len(await dead_letters(broker)) >= n


async def test_failing_entries_are_retried_then_dead_lettered(broker: Broker) -> None:
    # Given a frame on which the stage keeps crashing
    await publish_frames(broker, "bench-in", [frame(FLAKY_DRIVE, 3)])
    worker, task = start(RelayHandler(), broker, fast_settings(broker), "w1")

    # When the worker has tried it max_deliveries times
    await wait_until(lambda: _has_letters(broker, 1))
    worker.stop()
    await task

    # Then it is a dead letter after exactly that many deliveries, with the last error
    (letter,) = await dead_letters(broker)
    assert letter.deliveries >= broker.settings.max_deliveries
    assert "stage crashed" in letter.error
    assert worker.counts["failed"] == broker.settings.max_deliveries


async def test_entries_of_a_dead_consumer_are_taken_over(broker: Broker) -> None:
    # Given a consumer that read entries and died without acking them
    stream = names.stream_name("bench-in", ns=broker.namespace)
    await publish_frames(broker, "bench-in", [frame("d1", i) for i in range(10)])
    await broker.ensure_group(stream, "relay")
    taken = await broker.read("relay", "dead-one", [stream], count=4, block_ms=0)
    assert len(taken) == 4

    # When a live worker runs past the claim idle time
    worker, task = start(RelayHandler(), broker, fast_settings(broker), "w1")
    await wait_until(lambda: _count(broker, 10))
    worker.stop()
    await task

    # Then all ten were relayed exactly once
    assert sorted(m.seq for m in await outputs(broker)) == list(range(10))


async def test_a_stateful_stage_loses_and_doubles_nothing_on_takeover(broker: Broker) -> None:
    # Given frames of three cameras on a partitioned hop, and a grouping stage
    partitions = broker.settings.frame_partitions
    frames = [frame("d1", i, cam) for cam in ("front", "back", "left_repeater") for i in range(23)]
    await publish_frames(broker, names.FRAMES, frames, partitions)
    settings = fast_settings(broker, batch_size=7)
    first = GroupingHandler(size=5)
    worker, task = start(first, broker, settings, "first")

    # When the first worker stops mid-way, holding open groups, and a second takes over
    await wait_until(lambda: _count(broker, 3))
    worker.stop()
    await task
    second = GroupingHandler(size=5)
    worker2, task2 = start(second, broker, settings, "second")
    await wait_until(lambda: _count(broker, 12))
    worker2.stop()
    await task2

    # Then every group of five was emitted once, with the right members
    got = {(m.camera, m.seq): m.tick for m in await outputs(broker)}
    want = {(cam, g): sum(range(g * 5, g * 5 + 5)) for cam in ("front", "back", "left_repeater") for g in range(4)}
    assert got == want
    assert len(await outputs(broker)) == 12
    # and the three leftover frames per camera are still pending, not lost
    pending = 0
    for p in range(partitions):
        stats = await broker.stats(names.stream_name(names.FRAMES, p, broker.namespace))
        group = stats.group("grouping")
        pending += group.pending if group else 0
    assert pending == 9


class GatedGroupingHandler(GroupingHandler):
    """A grouping stage whose batches wait at a gate (a batch in hand, held open)."""

    def __init__(self) -> None:
        super().__init__(size=5)
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def handle(self, batch: list, prepared: object = None) -> object:
        self.entered.set()
        await self.gate.wait()
        return await super().handle(batch, prepared)


async def test_a_partition_moving_to_another_worker_is_released_only_after_its_batch_in_hand(
    broker: Broker,
) -> None:
    # Given one worker in the middle of a batch of partition p (a whole group of five)
    partitions = broker.settings.frame_partitions
    await publish_frames(broker, names.FRAMES, [frame("d1", i) for i in range(5)], partitions)
    p = names.frame_partition("d1", "front", partitions)
    settings = fast_settings(broker, batch_size=5, max_wait_ms=200)
    settings = settings.model_copy(update={"broker": broker.settings.model_copy(update={"lease_ttl_ms": 3000})})
    handler = GatedGroupingHandler()
    worker, task = start(handler, broker, settings, "w1")
    await asyncio.wait_for(handler.entered.wait(), 10)
    lease = names.lease_name(handler.group, p, broker.namespace)

    # When a member joins that should own p from now on, and the worker beats ten times
    newcomer = next(m for m in (f"n{i}" for i in range(100)) if balanced_owners(handler.group, partitions, {"w1", m})[p] == m)
    await broker.join(names.members_name(handler.group, broker.namespace), newcomer, 60_000)
    await asyncio.sleep(10 * settings.worker.heartbeat_s)

    # Then the worker keeps p's lease while the batch is in hand (a new owner would claim
    # entries about to be published and acked, and rebuild a group from the middle)
    assert await broker.lease_owner(lease) == "w1"
    # and gives it back once the batch is published and acked
    handler.gate.set()
    await wait_until(lambda: _lease_gone(broker, lease))
    assert [(m.seq, m.tick) for m in await outputs(broker)] == [(0, 10)]
    stats = await broker.stats(names.stream_name(names.FRAMES, p, broker.namespace))
    assert stats.group(handler.group).pending == 0
    worker.stop()
    await task



async def test_a_partition_given_to_another_worker_gets_no_entry_through_a_read_still_in_flight(
    broker: Broker,
) -> None:
    # Given a worker that owns every partition and waits in a blocking read (nothing to read yet)
    partitions = broker.settings.frame_partitions
    p = names.frame_partition("d1", "front", partitions)
    settings = fast_settings(broker, batch_size=5)
    settings = settings.model_copy(update={"broker": broker.settings.model_copy(update={"lease_ttl_ms": 3000})})
    delivered: list[tuple[str, str]] = []
    read = broker.read

    async def watched_read(group: str, consumer: str, streams: list[str], **kwargs: object) -> list:
        entries = await read(group, consumer, streams, **kwargs)
        delivered.extend((consumer, e.stream) for e in entries)
        return entries

    broker.read = watched_read
    old, old_task = start(GroupingHandler(size=5), broker, settings, "w1")
    await wait_until(lambda: _ready(old, set(range(partitions))))

    # When a member that should own p joins and takes p over, and p's frames come right after
    newcomer = next(m for m in (f"n{i}" for i in range(100)) if balanced_owners("grouping", partitions, {"w1", m})[p] == m)
    new, new_task = start(GroupingHandler(size=5), broker, settings, newcomer)
    await wait_until(lambda: _ready(new, {p}))
    await publish_frames(broker, names.FRAMES, [frame("d1", i) for i in range(10)], partitions)
    await wait_until(lambda: _count(broker, 2))
    for worker, task in ((old, old_task), (new, new_task)):
        worker.stop()
        await task

    # Then no frame of p reached the old owner (a read it started while p was its own
    # would take frames the new owner then reads past: it would group them out of order)
    stream = names.stream_name(names.FRAMES, p, broker.namespace)
    assert [c for c, s in delivered if s == stream and c == "w1"] == []
    assert sorted((m.seq, m.tick) for m in await outputs(broker)) == [(0, 10), (1, 35)]


async def _ready(worker: Worker, partitions: set[int]) -> bool:
    return worker.started and partitions <= worker.own.ready

class StallingGroupingHandler(GroupingHandler):
    """A grouping stage whose first batch freezes the whole process (a long GC, SIGSTOP)."""

    def __init__(self, stall_s: float) -> None:
        super().__init__(size=5)
        self.stall_s = stall_s
        self.stalled = False

    async def handle(self, batch: list, prepared: object = None) -> object:
        if not self.stalled:
            self.stalled = True
            time.sleep(self.stall_s)  # noqa: ASYNC251 - on purpose: the event loop stalls, no heartbeat renews the leases
        return await super().handle(batch, prepared)


async def test_a_worker_that_stalled_past_its_leases_publishes_nothing_until_it_renewed_them(
    broker: Broker,
) -> None:
    # Given a worker whose first batch stalls the process longer than the partition lease
    partitions = broker.settings.frame_partitions
    await publish_frames(broker, names.FRAMES, [frame("d1", i) for i in range(10)], partitions)
    settings = fast_settings(broker, batch_size=5)
    ttl_ms = 600
    settings = settings.model_copy(update={"broker": broker.settings.model_copy(update={"lease_ttl_ms": ttl_ms})})
    handler = StallingGroupingHandler(stall_s=1.5 * ttl_ms / 1000)
    worker = Worker(handler, broker, MemoryBlobStore(), settings, consumer="w1")
    stale_publishes = []
    publish = worker.publish

    async def watched_publish(outputs: list) -> None:
        if outputs and not worker.own.leases.fresh():
            stale_publishes.append(len(outputs))
        await publish(outputs)

    worker.publish = watched_publish
    task = asyncio.create_task(worker.run())

    # When it wakes up, and goes on
    await wait_until(lambda: _count(broker, 2))
    worker.stop()
    await task

    # Then nothing was published on the strength of leases that may have expired; the
    # partition was renewed, replayed and each group emitted once
    assert handler.stalled
    assert stale_publishes == []
    assert sorted((m.seq, m.tick) for m in await outputs(broker)) == [(0, 10), (1, 35)]


async def _lease_gone(broker: Broker, lease: str) -> bool:
    return await broker.lease_owner(lease) is None


async def test_stop_finishes_the_batch_in_hand(broker: Broker) -> None:
    # Given a slow stage in the middle of a batch
    await publish_frames(broker, "bench-in", [frame("d1", i) for i in range(4)])
    handler = RelayHandler(delay_s=0.3)
    worker, task = start(handler, broker, fast_settings(broker, batch_size=4), "w1")
    await wait_until(lambda: _started(handler))

    # When it is asked to stop
    worker.stop()
    await task

    # Then the batch was finished, published and acked
    assert len(await outputs(broker)) == 4
    stats = await broker.stats(names.stream_name("bench-in", ns=broker.namespace))
    assert stats.group("relay").pending == 0


async def _started(handler: RelayHandler) -> bool:
    return bool(handler.batches)


class _Held(RelayHandler):
    """A relay whose batches wait for ``release``: what a worker holds while busy shows."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.started = 0

    async def handle(self, batch, prepared=None):
        self.started += 1
        await self.release.wait()
        return await super().handle(batch, prepared)


@pytest.mark.parametrize(("prefetch", "second_gets"), [(0, 2), (4, 0)])
async def test_without_read_ahead_a_busy_worker_leaves_waiting_entries_to_others(
    broker: Broker, prefetch: int, second_gets: int
) -> None:
    # Given three jobs and a first worker, one job at a time, busy with one of them
    await publish_frames(broker, "bench-in", [frame("d1", i) for i in range(3)])
    settings = fast_settings(broker, batch_size=1, prefetch=prefetch)
    first, second = _Held(), _Held()
    w1, t1 = start(first, broker, settings, "w1")
    await wait_until(lambda: _true(first.started == 1))
    await asyncio.sleep(0.3)  # time enough for any read-ahead

    # When a second worker comes up while the first is still busy
    w2, t2 = start(second, broker, settings, "w2")
    await asyncio.sleep(0.5)

    # Then without read-ahead the other two jobs went to it (with read-ahead the first
    # worker had queued them, and the second idles)
    second.release.set()
    await wait_until(lambda: _true(second.started == second_gets) if second_gets else _true(True))
    await asyncio.sleep(0.2)
    assert second.started == second_gets
    first.release.set()
    await wait_until(lambda: _count(broker, 3))
    for worker, task in ((w1, t1), (w2, t2)):
        worker.stop()
        await task
    assert sorted(m.seq for m in await outputs(broker)) == [0, 1, 2]


async def _true(value: bool) -> bool:
    return value

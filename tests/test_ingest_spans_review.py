"""Span jobs of a long drive's camera under redelivery, concurrency and memory pressure.

Real Redis (the tests' private server) and the real ingest handler; the handler's
``ingest`` and ``dead_lettered`` are called directly to place a crash or a race exactly.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from brokers.redis import RedisBlobStore, RedisBroker
from fixtures import teslacam as tc
from stages.discover import discover
from stages.jobs import split_job
from stream import codec
from stream.schemas import DriveMarker, FrameRef
from stream.settings import IngestSettings, Settings
from workers.handlers.ingest import IngestHandler, build
from workers.publisher import WorkerPublisher
from workers.runtime import Worker

pytestmark = pytest.mark.redis


class _Env:
    """A namespace of the test server, with handlers bound to real (unstarted) workers."""

    def __init__(self, redis_url: str, ns: str, whole) -> None:
        self.ns = ns
        self.broker = RedisBroker(url=redis_url, namespace=ns)
        self.blobs = RedisBlobStore(redis_url, namespace=ns)
        roots = sorted({str(Path(p).resolve().parent) for c in whole.clips for p in c.files.values()})
        self.settings = Settings(namespace=ns, ingest=IngestSettings(roots=roots))

    def handler(self) -> IngestHandler:
        worker = Worker(build(self.settings, self.blobs), self.broker, self.blobs, self.settings)
        worker.handler.publisher = WorkerPublisher(worker)
        return worker.handler

    async def entries(self) -> dict:
        out: dict = {}
        for stream in [*await self.broker.streams(f"{self.ns}:frames:*"), f"{self.ns}:drives"]:
            for entry in await self.broker.range(stream, count=100_000):
                message = codec.decode(entry.data)
                out.setdefault(message.camera, []).append(message)
        return out

    async def frames(self, camera: str = "front") -> list[FrameRef]:
        return [m for m in (await self.entries())[camera] if isinstance(m, FrameRef)]

    async def close(self) -> None:
        await self.broker.close()
        await self.blobs.close()


def _drive(tmp_path: Path, minutes: int, cameras: tuple[str, ...], duration_s: float = 1.0):
    tc.make_drive(tmp_path, minutes=minutes, cameras=cameras, spec=tc.ClipSpec(duration_s=duration_s))
    (whole,) = [d.to_job() for d in discover(tmp_path).drives]
    return whole


async def test_a_held_span_that_becomes_next_while_waiting_for_memory_stops_waiting(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.handlers.ingest as ingest_module

    # Given a two-minute one-camera drive in one-minute spans of 40 frames (two chunks),
    # a blob bound of one byte, and a stuck limit far beyond the test's patience
    whole = _drive(tmp_path, 2, ("front",), duration_s=8.0)
    first, second = split_job(whole, "span", span_s=60)
    monkeypatch.setattr(ingest_module, "HELD_STUCK_S", 60.0)
    env = _Env(redis_url, "rvnext", whole)
    env.settings.broker.max_blob_bytes = 1
    try:
        # When the second span waits for memory room (its first chunk is stored)
        held = asyncio.create_task(env.handler().ingest(second))
        while await env.blobs.bytes_in_flight() == 0 and not held.done():
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)
        assert not held.done()
        # and the first span is ingested and published: the second is now next to publish
        await env.handler().ingest(first)
        # Then the second stops waiting (nothing it waits for can free memory: only its own
        # publication can) and publishes, well before the stuck limit
        await asyncio.wait_for(held, 10)
        frames = await env.frames()
        assert [f.seq for f in frames] == list(range(80))
    finally:
        await env.close()


@pytest.mark.parametrize(("minutes", "span_s", "again_s"), [(3, 120, 60), (5, 180, 240)],
                         ids=["other-count", "same-count-other-bounds"])  # fmt: skip
async def test_a_drive_submitted_again_with_other_spans_publishes_nothing_twice(
    tmp_path: Path, redis_url: str, minutes: int, span_s: float, again_s: float
) -> None:
    from stream import names
    from stream.settings import BrokerSettings
    from workers.cli.ingest import submit_jobs

    # Given a one-camera drive submitted in spans of span_s, then again in spans of again_s
    # (an operator changed ingest.span_s): 3 minutes in 2 spans then 3; or 5 minutes in two
    # spans of 3 + 2 minutes, then two of 4 + 1; each minute's pictures differ (their sizes)
    sizes = [(160 + 32 * i, 120 + 24 * i) for i in range(minutes)]
    specs = {(i, "front"): tc.ClipSpec(duration_s=1.0, size=size) for i, size in enumerate(sizes)}
    tc.make_drive(tmp_path, minutes=minutes, cameras=("front",), specs=specs)
    found = discover(tmp_path)
    (whole,) = [d.to_job() for d in found.drives]
    env = _Env(redis_url, f"rvresubmit{minutes}", whole)
    try:
        await submit_jobs(redis_url, env.ns, found.drives, BrokerSettings(), split="span", span_s=span_s)
        await submit_jobs(redis_url, env.ns, found.drives, BrokerSettings(), split="span", span_s=again_s)
        assert await env.broker.range(names.stream_name(names.JOBS, ns=env.ns), count=10)
        # When one worker ingests whatever was queued
        worker = Worker(build(env.settings, env.blobs), env.broker, env.blobs, env.settings, burst=True)
        await asyncio.wait_for(worker.run(), 60)
        # Then the partition holds the drive's frames once, numbered without a gap, between
        # one "started" and one "ended", each frame's blob holding that frame's pixels
        entries = (await env.entries())["front"]
        kinds = [m.event if isinstance(m, DriveMarker) else "frame" for m in entries]
        frames = [m for m in entries if isinstance(m, FrameRef)]
        assert kinds == ["started", *["frame"] * len(frames), "ended"]
        assert [f.seq for f in frames] == list(range(len(frames)))
        assert len({(f.clip, f.tick) for f in frames}) == len(frames)
        # and each frame's blob holds the pixels one whole-drive job stores for that seq
        one = _Env(redis_url, f"rvresubmitwhole{minutes}", whole)
        try:
            await one.handler().ingest(whole)
            expected = await one.frames()
            assert [await env.blobs.get(f.blob_key) for f in frames] == [await one.blobs.get(f.blob_key) for f in expected]
        finally:
            await one.close()
    finally:
        await env.close()


async def test_a_dead_lettered_span_leaves_the_chain_to_a_job_instead_of_publishing_in_the_hook(
    tmp_path: Path, redis_url: str
) -> None:
    from stream import names

    # Given a three-minute one-camera drive in one-minute spans whose last two spans are
    # stored, waiting for the first, and a frames hop whose backlog is full (detect is behind)
    whole = _drive(tmp_path, 3, ("front",))
    first, second, third = split_job(whole, "span", span_s=60)
    env = _Env(redis_url, "rvdeadhook", whole)
    backlog = env.broker.settings
    env.broker.settings = backlog.model_copy(update={"max_lag": 0})
    try:
        await env.handler().ingest(second)
        await env.handler().ingest(third)
        (stream,) = await env.broker.streams(f"{env.ns}:frames:*")
        await env.broker.ensure_group(stream, names.DETECT)  # it holds "started", unread
        # When the first span is dead-lettered (the hook may run in the heartbeat's reclaim)
        outputs = await asyncio.wait_for(env.handler().dead_lettered(first, "boom"), 5)
        # Then the hook returns at once, with the span's job queued again to move the chain
        assert [o.hop for o in outputs] == [names.JOBS]
        assert not await env.frames()
        # and that job, once detect has room, publishes the other spans and ends the drive
        env.broker.settings = backlog
        ended = await env.handler().ingest(outputs[0].message)
        assert ended is not None and any("dead-lettered (boom)" in p for p in ended.problems)
        frames = await env.frames()
        assert [f.seq for f in frames] == list(range(10)) and frames[0].clip == whole.clips[1].start
    finally:
        await env.close()


async def test_a_job_passing_a_finished_chain_clears_the_span_records_a_dead_job_left(
    tmp_path: Path, redis_url: str
) -> None:
    from workers.handlers.ingest_parts import record_key
    from workers.handlers.ingest_spans import PUBLISHED, span_key

    # Given a two-minute one-camera drive in one-minute spans, ingested, whose span records
    # were then put back as a job that stored the camera's record and died before clearing
    # them would leave them
    whole = _drive(tmp_path, 2, ("front",))
    first, second = split_job(whole, "span", span_s=60)
    env = _Env(redis_url, "rvtomb", whole)
    try:
        await env.handler().ingest(first)
        await env.handler().ingest(second)
        keys = [span_key(env.ns, whole.drive_id, "front", k, first.span.cut) for k in range(2)]
        assert [await env.broker.get_value(k) for k in keys] == [PUBLISHED, PUBLISHED]
        assert await env.broker.get_value(record_key(env.ns, whole.drive_id, "front")) is not None
        await env.broker.put_value(keys[1], b"a full record")
        # When the span's job is delivered again
        await env.handler().ingest(second)
        # Then the records are tombstones again, and nothing was published twice
        assert [await env.broker.get_value(k) for k in keys] == [PUBLISHED, PUBLISHED]
        frames = await env.frames()
        assert [f.seq for f in frames] == list(range(len(frames))) and frames
    finally:
        await env.close()

"""The fuse worker under the real runtime, on the in-memory broker and on real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from brokers.base import Broker
from brokers.blobs import BlobStore
from brokers.connect import connect, forget_memory
from stream import codec, names
from stream.schemas import Detection, DriveMarker, DriveSummary, Escalation, FrameDetections, Verdict
from stream.settings import Settings, load_settings
from tests.conftest import FAST_SETTINGS, TEST_NAMESPACE
from workers.handlers.fuse import FuseHandler, checkpoint_key
from workers.registry import builder
from workers.runtime import Worker

CAMS = ("front", "back", "left_repeater")


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Broker, BlobStore]]:
    """A broker and blob store of each kind, sharing one state."""
    if request.param == "memory":
        url = f"memory://fuse-{uuid.uuid4().hex[:8]}"
    else:
        url = request.getfixturevalue("redis_url")
    broker, blobs = connect(url, namespace=TEST_NAMESPACE, settings=FAST_SETTINGS.model_copy())
    yield broker, blobs
    await broker.close()
    await blobs.close()
    if url.startswith("memory://"):
        forget_memory(url.removeprefix("memory://"))


def settings_for(broker: Broker, **fuse: object) -> Settings:
    worker = {"batch_size": 16, "max_wait_ms": 10, "heartbeat_s": 0.05, "reclaim_interval_s": 0.1, "grace_s": 2}
    settings = load_settings(environ={}, worker=worker, fuse=fuse)
    return settings.model_copy(update={"broker": broker.settings, "namespace": broker.namespace})


def detections(drive: str, ticks: int, cone_from: int = 10**9) -> list:
    cone = Detection(type="cone", label="cone", score=0.9, box=(0.4, 0.5, 0.5, 0.6))
    started = [DriveMarker(drive_id=drive, event="started", camera=c, cameras=list(CAMS)) for c in CAMS]
    frames = [
        FrameDetections(
            drive_id=drive, camera=c, seq=t, tick=t, t=t * 0.5, blob_key=f"{drive}:{c}:{t}",
            detections=[cone, cone] if t >= cone_from else [], ingested_utc=time.time(),
        )  # fmt: skip
        for t in range(ticks)
        for c in CAMS
    ]
    ended = [
        DriveMarker(drive_id=drive, event="ended", camera=c, cameras=list(CAMS), frame_counts=dict.fromkeys(CAMS, ticks))
        for c in CAMS
    ]
    return started + frames + ended


async def send(broker: Broker, messages: list) -> None:
    for message in messages:
        p = names.drive_partition(message.drive_id, broker.settings.fuse_partitions)
        await broker.publish(names.stream_name(names.DETECTIONS, p, broker.namespace), codec.encode(message))


async def published(broker: Broker, hop: str = names.VERDICTS) -> list:
    entries = await broker.range(names.stream_name(hop, ns=broker.namespace), count=100_000)
    return [codec.decode(e.data) for e in entries]


async def pending(broker: Broker) -> int:
    total = 0
    for stream in await broker.streams(f"{broker.namespace}:{names.DETECTIONS}:*"):
        group = (await broker.stats(stream)).group(names.FUSE)
        total += group.pending + group.lag if group else 0
    return total


async def drained(broker: Broker) -> bool:
    return await pending(broker) == 0


async def until(check, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(0.02)


async def summaries(broker: Broker, n: int) -> bool:
    return sum(isinstance(m, DriveSummary) for m in await published(broker)) >= n


def run_worker(broker: Broker, blobs: BlobStore, settings: Settings, name: str) -> tuple[Worker, asyncio.Task]:
    worker = Worker(builder("fuse")(settings, blobs), broker, blobs, settings, consumer=name)
    return worker, asyncio.create_task(worker.run())


async def test_each_window_gets_one_verdict_and_every_entry_is_acked(pair):
    # Given two drives of three cameras, 6 s each (three 2 s windows), cones in drive a's end
    broker, blobs = pair
    await send(broker, detections("a", 12, cone_from=8) + detections("b", 12))
    worker, task = run_worker(broker, blobs, settings_for(broker), "f1")
    # When the fuse worker runs until both summaries are out
    await until(lambda: summaries(broker, 2))
    await until(lambda: drained(broker))
    worker.stop()
    await task
    # Then each window has exactly one verdict, and the roadwork span is a's last window
    out = await published(broker)
    verdicts = sorted((m.drive_id, m.window, m.roadwork) for m in out if isinstance(m, Verdict))
    assert verdicts == [("a", 0, False), ("a", 1, False), ("a", 2, True), ("b", 0, False), ("b", 1, False), ("b", 2, False)]
    summary = next(m for m in out if isinstance(m, DriveSummary) and m.drive_id == "a")
    assert [(s.t_start, s.t_end) for s in summary.spans] == [(4.0, 6.0)]
    assert summary.frame_counts == dict.fromkeys(CAMS, 12) and summary.problems == []


async def test_a_new_worker_finishes_a_drive_from_checkpoint_and_replay(pair):
    # Given a worker that published the first windows of a drive and then stopped
    broker, blobs = pair
    messages = detections("a", 20, cone_from=0)
    await send(broker, messages[:-20])
    settings = settings_for(broker)
    worker, task = run_worker(broker, blobs, settings, "first")
    await until(lambda: _verdict_count(broker, 3))
    worker.stop()
    await task
    # When the rest arrives and a second worker takes over
    await send(broker, messages[-20:])
    worker2, task2 = run_worker(broker, blobs, settings, "second")
    await until(lambda: summaries(broker, 1))
    worker2.stop()
    await task2
    # Then no window is doubled or lost, and the summary spans the whole drive
    out = await published(broker)
    windows = [m.window for m in out if isinstance(m, Verdict)]
    assert sorted(windows) == list(range(5))
    (summary,) = [m for m in out if isinstance(m, DriveSummary)]
    assert summary.windows == 5 and [(s.t_start, s.t_end) for s in summary.spans] == [(0.0, 10.0)]
    assert await blobs.get(checkpoint_key("a")) is not None


async def _verdict_count(broker: Broker, n: int) -> bool:
    return sum(isinstance(m, Verdict) for m in await published(broker)) >= n


async def test_uncertain_windows_are_escalated_once(pair):
    # Given a VLM configured and coefficients that make every window uncertain
    broker, blobs = pair
    settings = settings_for(broker, coefficients={"bias": 0.0}, vlm_timeout_s=0.2).model_copy(
        update={"vlm": load_settings(environ={}, vlm={"backend": "transformers"}).vlm}
    )
    handler = FuseHandler(settings, blobs)
    handler.fuser.expect_anomaly = False  # no vera stage in this test
    await send(broker, detections("a", 8))
    worker = Worker(handler, broker, blobs, settings, consumer="f1")
    task = asyncio.create_task(worker.run())
    # When the windows close without an answer
    await until(lambda: summaries(broker, 1))
    worker.stop()
    await task
    # Then one escalation per window went out, and the verdicts say they were escalated
    escalations = await published(broker, names.ESCALATIONS)
    assert sorted(e.window for e in escalations if isinstance(e, Escalation)) == [0, 1]
    assert all(v.escalated for v in await published(broker) if isinstance(v, Verdict))


class _Clock:
    """The fuse worker's clock, moved only by the test (a machine as loaded as it says)."""

    def __init__(self, now: float) -> None:
        self.now, self.reads = now, 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


def _back_sees_cones(drive: str) -> list:
    # Three cameras, 12 ticks; only back sees cones (from tick 4); ingested 50 s before
    # fuse first sees the drive (the pipeline's lag).
    cone = Detection(type="cone", label="cone", score=0.9, box=(0.4, 0.5, 0.5, 0.6))
    out = []
    for m in detections(drive, 12):
        if isinstance(m, FrameDetections):
            seen = [cone, cone] if m.camera == "back" and m.tick >= 4 else []
            m = m.copy_with(ingested_utc=1_000_000.0 - 50.0, detections=seen)
        out.append(m)
    return out


async def _fused(pair, drive: str, stall_s: float) -> tuple[list[tuple], DriveSummary]:
    broker, blobs = pair
    clock = _Clock(1_000_000.0)
    messages = _back_sees_cones(drive)
    slow = [m for m in messages if m.camera == "back" and getattr(m, "event", "") != "started"] if stall_s else []
    await send(broker, [m for m in messages if m not in slow])
    settings = settings_for(broker, watermark_timeout_s=30.0)
    handler = FuseHandler(settings, blobs, clock=clock)
    worker = Worker(handler, broker, blobs, settings, consumer=f"f-{drive}")
    task = asyncio.create_task(worker.run())
    if slow:
        # Back's partition stalls while the other cameras are fused; fuse's clock moves on
        # past the 30 s timeout and fuse looks at the drive's windows many times over.
        async def others_in() -> bool:
            state = handler.fuser.drives.get(drive)
            return state is not None and state.ended >= {"front", "left_repeater"}

        await until(others_in)
        clock.now += stall_s
        reads = clock.reads

        async def looked_again() -> bool:
            return clock.reads > reads + 3

        await until(looked_again)
        await send(broker, slow)

    async def summarised() -> bool:
        return any(isinstance(m, DriveSummary) and m.drive_id == drive for m in await published(broker))

    await until(summarised)
    worker.stop()
    await task
    out = [m for m in await published(broker) if m.drive_id == drive]
    rows = sorted((v.window, v.roadwork, v.cameras, v.missing_cameras, round(v.confidence, 9))
                  for v in out if isinstance(v, Verdict))  # fmt: skip
    (summary,) = [m for m in out if isinstance(m, DriveSummary)]
    return rows, summary


async def test_a_stalled_camera_partition_gives_the_same_verdicts_as_a_quiet_machine(pair):
    # Given one drive fused on a quiet machine (every camera's entries there at once), and
    # the same drive where back's partition stalls 120 s of fuse's clock (4x the timeout)
    quiet, quiet_summary = await _fused(pair, "quiet", stall_s=0.0)
    loaded, loaded_summary = await _fused(pair, "loaded", stall_s=120.0)
    # Then the verdicts are the same: every window has back, whose cones make windows 1 and 2 roadwork
    assert loaded == quiet
    assert [(row[0], row[1], row[3]) for row in loaded] == [(0, False, []), (1, True, []), (2, True, [])]
    assert loaded_summary.problems == quiet_summary.problems == []


async def test_blobs_of_closed_windows_expire_soon_except_the_verdicts_key_frames(pair):
    # Given a drive's detections whose frame blobs are stored with the full TTL (vera off)
    broker, blobs = pair
    messages = detections("a", 12, cone_from=8)
    keys = [m.blob_key for m in messages if isinstance(m, FrameDetections)]
    await blobs.put_many({k: b"jpeg" for k in keys}, ttl_s=3600)
    settings = settings_for(broker)
    settings.broker.spent_blob_ttl_s = 1
    await send(broker, messages)
    worker, task = run_worker(broker, blobs, settings, "f1")
    # When every window has been judged, and the spent TTL has passed
    await until(lambda: summaries(broker, 1))
    await until(lambda: drained(broker))
    worker.stop()
    await task
    kept = {f.blob_key for m in await published(broker) if isinstance(m, Verdict) for f in m.frames}
    await until(lambda: _gone(blobs, sorted(set(keys) - kept)))
    # Then the verdicts' key frames are still there (the report shows them), one per camera
    assert len(kept) == 3 * len(CAMS)
    assert all(b is not None for b in await blobs.get_many(sorted(kept)))


async def _gone(blobs: BlobStore, keys: list[str]) -> bool:
    return all(b is None for b in await blobs.get_many(keys))


async def test_a_worker_that_fell_behind_cannot_overwrite_the_new_owners_checkpoint(pair):
    # Given two handlers of one drive: "behind" saw its first 2 windows, "ahead" all 5
    # (a worker paused past its leases, and the one that took the drive over)
    broker, blobs = pair
    settings = settings_for(broker)
    behind, ahead = FuseHandler(settings, blobs), FuseHandler(settings, blobs)
    for handler in (behind, ahead):
        handler.fuser.expect_anomaly = False
    messages = detections("a", 20)
    frames = [m for m in messages if isinstance(m, FrameDetections)]
    markers = [m for m in messages if isinstance(m, DriveMarker)]
    behind_step = [behind.fuser.add(m, ("s", str(i)), 0.0) for i, m in enumerate(markers[:3] + frames[:27])]
    assert sum(isinstance(o, Verdict) for s in behind_step for o in s.outputs) == 2
    for i, m in enumerate(messages):
        ahead.fuser.add(m, ("s", str(i)), 0.0)
    assert ahead.fuser.progress("a") > behind.fuser.progress("a")
    # When the new owner checkpoints, and then the one behind resumes and checkpoints too
    await ahead._checkpoint({"a"})
    stored = await blobs.get(checkpoint_key("a"))
    await behind._checkpoint({"a"})
    # Then the stored checkpoint is still the new owner's
    assert await blobs.get(checkpoint_key("a")) == stored

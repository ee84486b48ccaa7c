"""The detect handler: cross-partition batches, windows, acks, bad frames and takeover.

A YOLO11n built from its yaml runs on CPU at a small input size; scenes are flat
colours with a square, so that equal scenes give equal descriptors and different scenes
differ (the window's threshold is set just under 1).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

import numpy as np
import pytest
import simplejpeg
import torch

from brokers.base import Broker, Entry
from brokers.memory import MemoryBlobStore
from brokers.redis import RedisBlobStore, RedisBroker
from stages.detect import Detector
from stream import codec, names
from stream.errors import InputError
from stream.ids import output_key
from stream.schemas import DriveMarker, FrameDetections, FrameRef, Message, Segment
from stream.settings import DetectSettings, Settings, load_settings
from workers.handlers.detect import DetectHandler
from workers.handler import BatchResult, Delivery
from workers.runtime import Worker

DETECT = {
    "model": "yolo11n.yaml",
    "allow_random_weights": True,
    "scorer": "",
    "imgsz": 160,
    "conf": 0.2,
    "classes": {"0": "cone", "1": "worker"},
    "window_s": 2.0,
    "stride_s": 1.0,
    "similarity_threshold": 0.99,
    "per_frame_budget": 2,
}
PARTITIONS = 8
CAMERAS = ("front", "back")
DRIVES = ("drive-a", "drive-b")
FPS = 4
FRAMES_PER_CAMERA = 18  # 4.5 s: windows 0-4


@pytest.fixture(scope="module")
def detector() -> Detector:
    """One detector for the module; its random head is nudged to report boxes."""
    made = Detector(DetectSettings(**DETECT))
    torch.manual_seed(0)
    for branch in made.net.model[-1].cv3:
        branch[-1].bias.data.fill_(-1.0)
        branch[-1].weight.data.normal_(0, 0.05)
    return made


def settings() -> Settings:
    return load_settings(environ={}, detect=DETECT, broker={"frame_partitions": PARTITIONS, "fuse_partitions": 4})


class CountingBlobs(MemoryBlobStore):
    """The in-memory blob store, counting round trips."""

    def __init__(self) -> None:
        super().__init__()
        self.get_calls: list[int] = []

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        self.get_calls.append(len(keys))
        return await super().get_many(keys)


def scene_jpeg(scene: int) -> bytes:
    """A flat colour with a square: one look per scene number."""
    rng = np.random.default_rng(scene)
    image = np.zeros((120, 160, 3), np.uint8)
    image[:] = rng.integers(0, 255, 3)
    y, x = rng.integers(0, 80), rng.integers(0, 120)
    image[y : y + 40, x : x + 40] = rng.integers(0, 255, 3)
    return simplejpeg.encode_jpeg(image)


def drive_messages(blobs: dict[str, bytes], bad: frozenset[tuple[str, str, int]] = frozenset()) -> list[Message]:
    """Frames of every drive and camera interleaved by tick, then each camera's end marker."""
    messages: list[Message] = []
    for seq in range(FRAMES_PER_CAMERA):
        for drive, camera in itertools.product(DRIVES, CAMERAS):
            key = f"{drive}:{camera}:{seq}"
            # a new scene every 1.5 s; numbered, not hash()ed: str hashes change per process (PYTHONHASHSEED)
            scene = 100 * DRIVES.index(drive) + 10 * CAMERAS.index(camera) + seq // 6
            blobs[key] = b"corrupt" if (drive, camera, seq) in bad else scene_jpeg(scene)
            messages.append(
                FrameRef(drive_id=drive, camera=camera, clip="c", seq=seq, tick=seq, t=seq / FPS, pts=seq / FPS,
                         blob_key=key, width=160, height=120, nbytes=len(blobs[key]))
            )
    for drive, camera in itertools.product(DRIVES, CAMERAS):
        messages.append(DriveMarker(drive_id=drive, event="ended", camera=camera, cameras=list(CAMERAS)))
    return messages


def to_deliveries(messages: list[Message]) -> list[Delivery]:
    """Deliveries as the runtime makes them: one partition stream per (drive, camera)."""
    out = []
    for i, message in enumerate(messages):
        p = names.frame_partition(message.drive_id, message.camera, PARTITIONS)
        entry = Entry(names.stream_name(names.FRAMES, p), f"{i + 1}-0", codec.encode(message))
        out.append(Delivery(entry, message, p))
    return out


async def make_handler(detector: Detector, blobs: MemoryBlobStore) -> DetectHandler:
    handler = DetectHandler(settings(), blobs, detector=detector)
    await handler.start()
    return handler


async def run_batches(handler: DetectHandler, batches: list[list[Delivery]]) -> list[BatchResult]:
    return [await handler.handle(batch) for batch in batches]


def cut(deliveries: list[Delivery], sizes: Sequence[int]) -> list[list[Delivery]]:
    """Cut deliveries into batches of the given sizes, cycling (as size and timeout cut them)."""
    batches, start = [], 0
    for size in itertools.cycle(sizes):
        if start >= len(deliveries):
            return batches
        batches.append(deliveries[start : start + size])
        start += size
    return batches


def published(results: list[BatchResult]) -> dict[str, tuple[str, Message, int | None]]:
    """Outputs as a deduplicating broker keeps them: the first by each dedupe key."""
    kept: dict[str, tuple[str, Message, int | None]] = {}
    for result in results:
        for output in result.outputs:
            kept.setdefault(output.dedupe_key, (output.hop, output.message, output.partition))
    return kept


def summary(kept: dict[str, tuple[str, Message, int | None]]) -> dict[str, object]:
    """What must not change between runs: segment contents and which frames got detections."""
    out: dict[str, object] = {}
    for key, (hop, message, partition) in kept.items():
        if isinstance(message, Segment):
            out[key] = (message.index, [k.seq for k in message.key_frames], message.frames_total,
                        message.object_counts, [len(k.detections) for k in message.key_frames])
        elif isinstance(message, FrameDetections):
            out[key] = (hop, partition, message.seq, len(message.detections))
        else:
            out[key] = (hop, partition, message.model_dump())
    return out


async def staged(store: MemoryBlobStore, bad: frozenset[tuple[str, str, int]] = frozenset()) -> list[Delivery]:
    """The drive deliveries, with their blobs in ``store``."""
    blobs: dict[str, bytes] = {}
    messages = drive_messages(blobs, bad)
    await store.put_many(blobs)
    return to_deliveries(messages)


async def test_mixed_batch_from_many_partitions_keeps_each_camera_in_order(detector: Detector) -> None:
    # Given one batch holding the first frames of two drives x two cameras (four partitions)
    store = CountingBlobs()
    deliveries = (await staged(store))[:24]
    handler = await make_handler(detector, store)

    # When it is handled
    result = await handler.handle(deliveries)

    # Then the blobs came in one round trip and each frame has its detections, in order
    assert store.get_calls == [24]
    detections = [o for o in result.outputs if isinstance(o.message, FrameDetections)]
    assert len(detections) == 24
    for drive, camera in itertools.product(DRIVES, CAMERAS):
        mine = [o for o in detections if (o.message.drive_id, o.message.camera) == (drive, camera)]
        assert [o.message.seq for o in mine] == list(range(6))
        assert {o.partition for o in mine} == {names.drive_partition(drive, 4)}
        assert [o.dedupe_key for o in mine] == [output_key("detect", drive, camera, s) for s in range(6)]
        assert all(o.hop == names.DETECTIONS for o in mine)


async def test_prepared_batch_is_not_fetched_again(detector: Detector) -> None:
    # Given a batch prepared ahead (as the runtime does while the previous batch runs)
    store = CountingBlobs()
    batch = (await staged(store))[:8]
    handler = await make_handler(detector, store)
    prepared = await handler.prepare(batch)

    # When it is handled
    await handler.handle(batch, prepared)

    # Then the blobs were fetched once, by prepare
    assert store.get_calls == [8]


async def test_batches_cut_by_size_or_by_timeout_give_the_same_outputs(detector: Detector) -> None:
    # Given the same drive cut into one big batch, and into small uneven batches
    store = MemoryBlobStore()
    deliveries = await staged(store)
    whole = await run_batches(await make_handler(detector, store), [deliveries])
    pieces = await run_batches(await make_handler(detector, store), cut(deliveries, [1, 7, 3, 16, 2]))

    # Then the published outputs are the same
    assert summary(published(pieces)) == summary(published(whole))


async def test_frames_are_acked_only_once_their_window_is_published(detector: Detector) -> None:
    # Given the frames of one camera up to 1.75 s (window 0 is 0-2 s)
    store = MemoryBlobStore()
    front = [d for d in await staged(store) if (d.message.drive_id, d.message.camera) == ("drive-a", "front")]
    handler = await make_handler(detector, store)
    first = await handler.handle(front[:8])

    # Then nothing is acked and no segment is out
    assert first.ack == []
    assert not any(isinstance(o.message, Segment) for o in first.outputs)

    # When the frame at 2.0 s arrives
    second = await handler.handle(front[8:9])

    # Then window 0 is published and its frames of the first stride (0-0.75 s) are acked
    assert [o.message.index for o in second.outputs if isinstance(o.message, Segment)] == [0]
    assert [d.message.seq for d in second.ack] == [0, 1, 2, 3]


async def test_segments_carry_key_frames_counts_and_reduction(detector: Detector) -> None:
    # Given a whole drive of scenes that change every 1.5 s
    store = MemoryBlobStore()
    results = await run_batches(await make_handler(detector, store), cut(await staged(store), [10]))
    segments = [m for hop, m, _ in published(results).values() if isinstance(m, Segment)]

    # Then each camera has windows 0-4, each 2 s long, with fewer key frames than frames
    assert len(segments) == 4 * 5
    seg = next(s for s in segments if (s.drive_id, s.camera, s.index) == ("drive-a", "front", 1))
    assert (seg.t_start, seg.t_end, seg.frames_total) == (1.0, 3.0, 8)
    assert [k.seq for k in seg.key_frames] == [4, 6]  # the first frame, then the scene change at 1.5 s
    assert all(len(k.detections) <= 2 for k in seg.key_frames)
    assert seg.object_counts and set(seg.object_counts) <= {"cone", "worker"}
    assert seg.key_frames[0].blob_key == "drive-a:front:4" and seg.key_frames[0].t == 1.0
    assert np.isclose(np.linalg.norm(seg.descriptor), 1.0, atol=1e-5)
    assert sum(s.frames_total for s in segments) > 2 * sum(s.frames_kept for s in segments)


async def test_drive_end_flushes_windows_and_forwards_the_marker(detector: Detector) -> None:
    # Given a whole drive handled
    store = MemoryBlobStore()
    deliveries = await staged(store)
    results = await run_batches(await make_handler(detector, store), cut(deliveries, [9]))

    # Then every delivery was acked, once
    acked = [d.entry.id for r in results for d in r.ack]
    assert sorted(acked) == sorted(d.entry.id for d in deliveries)

    # and each camera's marker went to its drive's fuse partition with its segment count
    markers = [(m, p) for hop, m, p in published(results).values() if isinstance(m, DriveMarker)]
    assert len(markers) == 4
    for marker, partition in markers:
        assert marker.segment_counts == {marker.camera: 5}
        assert partition == names.drive_partition(marker.drive_id, 4)


async def test_bad_frames_fail_with_their_name_and_the_window_goes_on(detector: Detector) -> None:
    # Given a drive where one frame does not decode and another's blob expired
    store = MemoryBlobStore()
    deliveries = await staged(store, bad=frozenset({("drive-a", "front", 5)}))
    await store.delete_many(["drive-a:back:2"])
    results = await run_batches(await make_handler(detector, store), cut(deliveries, [12]))

    # Then both are failed as InputErrors naming the frame, and not acked
    failed = [(d, e) for r in results for d, e in r.failed]
    assert sorted((d.message.camera, d.message.seq) for d, _ in failed) == [("back", 2), ("front", 5)]
    assert all(isinstance(e, InputError) and d.message.blob_key in str(e) for d, e in failed)
    assert "missing" in next(str(e) for d, e in failed if d.message.seq == 2)
    assert not {d.entry.id for d, _ in failed} & {d.entry.id for r in results for d in r.ack}

    # and their windows were published without them
    segments = {(m.camera, m.index): m for _, m, _ in published(results).values() if isinstance(m, Segment)
                and m.drive_id == "drive-a"}
    assert segments[("front", 1)].frames_total == 7
    assert segments[("back", 0)].frames_total == 7


async def test_takeover_mid_window_loses_and_doubles_nothing(detector: Detector) -> None:
    # Given a reference run of the whole drive by one handler
    store = MemoryBlobStore()
    deliveries = await staged(store)
    reference = published(await run_batches(await make_handler(detector, store), cut(deliveries, [8])))

    # When handler A handles the first half and dies holding open windows
    half = len(deliveries) // 2
    first = await run_batches(await make_handler(detector, store), cut(deliveries[:half], [5, 11]))
    acked = {d.entry.id for r in first for d in r.ack}
    assert 0 < len(acked) < half

    # and handler B gets A's unacked deliveries replayed in order, then the rest
    second_handler = await make_handler(detector, store)
    for p in range(PARTITIONS):
        await second_handler.assigned(p)
    replay = [d for d in deliveries[:half] if d.entry.id not in acked]
    second = await run_batches(second_handler, cut(replay + deliveries[half:], [6, 13]))

    # Then the published outputs equal the reference's, each once, and every input is acked
    assert summary(published(first + second)) == summary(reference)
    acks = [d.entry.id for r in first + second for d in r.ack]
    assert sorted(acks) == sorted(d.entry.id for d in deliveries)


async def test_revoked_partition_state_is_dropped(detector: Detector) -> None:
    # Given a handler holding open windows of two partitions
    store = MemoryBlobStore()
    deliveries = (await staged(store))[:16]
    handler = await make_handler(detector, store)
    await handler.handle(deliveries)
    front_a = names.frame_partition("drive-a", "front", PARTITIONS)

    # When one partition is revoked
    await handler.revoked(front_a)

    # Then only that partition's cameras are forgotten
    assert ("drive-a", "front") not in handler.windows
    assert ("drive-a", "back") in handler.windows or front_a == names.frame_partition("drive-a", "back", PARTITIONS)


async def test_runtime_worker_publishes_everything_and_holds_nothing(
    detector: Detector, broker: Broker, request: pytest.FixtureRequest
) -> None:
    # Given the drive's frames and blobs on the partitioned frames hop of a real broker
    bounds = broker.settings
    conf = load_settings(environ={}, detect=DETECT, worker={"batch_size": 16, "max_wait_ms": 20})
    conf = conf.model_copy(update={"broker": bounds, "namespace": broker.namespace})
    redis = isinstance(broker, RedisBroker)
    store = RedisBlobStore(request.getfixturevalue("redis_url"), namespace=broker.namespace) if redis else MemoryBlobStore()
    deliveries = await staged(store)
    for d in deliveries:
        p = names.frame_partition(d.message.drive_id, d.message.camera, bounds.frame_partitions)
        await broker.publish(names.stream_name(names.FRAMES, p, broker.namespace), d.entry.data)

    # When a real worker runs the detect handler until drained
    worker = Worker(DetectHandler(conf, store, detector=detector), broker, store, conf, burst=True)
    await asyncio.wait_for(worker.run(), timeout=60)

    # Then detections, markers and segments are all out, and no frame is pending
    out = []
    for q in range(bounds.fuse_partitions):
        out += await broker.range(names.stream_name(names.DETECTIONS, q, broker.namespace), count=10_000)
    kinds = [codec.decode(e.data).KIND for e in out]
    assert kinds.count("detections") == len(deliveries) - 4 and kinds.count("drive") == 4
    assert len(await broker.range(names.stream_name(names.SEGMENTS, ns=broker.namespace), count=10_000)) == 20
    for p in range(bounds.frame_partitions):
        group = (await broker.stats(names.stream_name(names.FRAMES, p, broker.namespace))).group(names.DETECT)
        assert group is None or group.pending == 0
    await store.close()


def test_cli_options_map_into_settings_overrides() -> None:
    # Given the detect worker's options, some left out
    from workers.cli.detect import overrides

    tree = overrides(model="weights/cones.pt", device="cuda:1", batch_size=64)

    # Then they land in the detect and worker sections, and settings accept them
    assert tree == {"detect": {"model": "weights/cones.pt", "device": "cuda:1"}, "worker": {"batch_size": 64}}
    conf = load_settings(environ={}, **tree)
    assert (conf.detect.model, conf.detect.device, conf.worker.batch_size) == ("weights/cones.pt", "cuda:1", 64)


def test_worker_command_gets_model_and_device_options() -> None:
    # Given a worker command like the runtime's
    import click
    from click.testing import CliRunner

    from workers.cli.detect import register

    seen: dict[str, object] = {}

    @click.group()
    @click.option("--set", "set_", multiple=True)
    def root(set_: tuple[str, ...]) -> None: ...

    @root.command()
    @click.argument("stage")
    @click.option("--batch-size", type=int, default=None)
    @click.pass_context
    def worker(ctx: click.Context, stage: str, batch_size: int | None) -> None:
        seen.update(stage=stage, set_=ctx.find_root().params["set_"], batch_size=batch_size)

    # When the detect options are registered and used
    register(root)
    result = CliRunner().invoke(root, ["worker", "detect", "--model", "m.pt", "--device", "cuda", "--batch-size", "8"])

    # Then they reach the settings as detect overrides
    assert result.exit_code == 0, result.output
    assert seen == {"stage": "detect", "set_": ("detect.model=m.pt", "detect.device=cuda"), "batch_size": 8}

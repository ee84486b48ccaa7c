"""The detect worker's handler: frames in, per-frame detections and window segments out.

The runtime reads batches across every frame partition this worker owns and calls
``prepare`` for the next batch while ``handle`` runs the current one. ``prepare`` fetches
the batch's blobs in one round trip, decodes them (nvJPEG, in a thread: the call blocks
without the GIL) and *launches* the batch: ONE forward pass of the detector and, when
``DetectSettings.scorer`` names one, one of the roadwork frame scorer over the same decoded
pixels, queued on the device without waiting. ``handle`` then waits for the batch's
outputs (in a thread, so the event loop goes on reading, fetching and publishing) and walks
the batch in its order (which keeps each camera's order) feeding the temporal windows. So
on a GPU the device always has the next batch queued behind the current one, and the host
work of a batch (Redis, messages, windows) overlaps the device work of the next.

The scorer's probability goes out with the frame's detections
(``FrameDetections.roadwork_prob``) and into the key frames; its pooled features are the
window descriptor when ``DetectSettings.descriptor`` is ``"scorer"``.

Acknowledgement follows ``stages.window``: a frame is acked only once the newest window
that holds it has been published; its detections are published at once (idempotent by
dedupe key, so a replay after a takeover republishes nothing new).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stages.step import Step
from stages.window import CameraWindows, WindowConfig, WindowFrame, WindowStats
from stream import names
from stream.errors import InputError, ModelError
from stream.ids import output_key
from stream.schemas import DriveMarker, FrameDetections, FrameRef, Message, Segment
from stream.settings import Settings
from workers.handler import BatchResult, Delivery, Handler, Output
from workers.logs import STARTUP_LOGGER

startup = logging.getLogger(STARTUP_LOGGER)

#: GIL switch interval of a detect worker on CUDA (Python's default is 5 ms).
GPU_SWITCH_INTERVAL_S = 1e-4
#: A Tesla HW3 camera's frame (width, height): the size the warm-up prepares for.
TESLA_CAMERA = (1280, 960)


async def _inline(func: Callable[..., Any], *args: Any) -> Any:
    """Run ``func`` on the event loop's own thread (for calls that only queue GPU work)."""
    return func(*args)

if TYPE_CHECKING:
    from brokers.blobs import BlobStore
    from stages.detect import Detector, FrameResult, PendingBatch
    from stages.detect.scoring import FrameScore
    from stages.scorer import RoadworkScorer

    #: A prepared frame: (launched batch, row in it), or the frame's ``InputError``.
    Prepared = tuple[PendingBatch, int] | InputError

Key = tuple[str, str]  # (stream, entry id)
Camera = tuple[str, str]  # (drive, camera)


def _key(delivery: Delivery) -> Key:
    return delivery.entry.stream, delivery.entry.id


@dataclass
class HandlerTimings:
    """Cumulative seconds the handler spent outside the detector's own steps."""

    seconds: dict[str, float] = field(default_factory=lambda: {"fetch": 0.0, "wait": 0.0, "window": 0.0})

    def add(self, stage: str, seconds: float) -> None:
        """Add time to one step."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


class DetectHandler(Handler):
    """Binds the detector and the temporal windows to the frames hop.

    Parameters:
        settings: all settings (``detect`` for the model and windows, ``broker`` for partitions).
        blobs: the frame blob store.
        detector: a ready detector (tests, benchmarks); built in ``start`` otherwise.
        scorer: a ready roadwork scorer; loaded in ``start`` from ``detect.scorer`` otherwise.
    """

    group = names.DETECT
    inputs = (names.FRAMES,)
    partitioned = True
    accepts = (FrameRef, DriveMarker)

    def __init__(
        self,
        settings: Settings,
        blobs: BlobStore,
        *,
        detector: Detector | None = None,
        scorer: RoadworkScorer | None = None,
    ) -> None:
        self.settings = settings
        self.blobs = blobs
        self.detector = detector
        self.scorer = scorer
        self.timings = HandlerTimings()
        self.ended_stats = WindowStats()  # figures of cameras whose drive ended here
        self.batch_sizes: list[int] = []  # frames per forward pass
        self.windows: dict[Camera, CameraWindows] = {}
        self._camera_partition: dict[Camera, int | None] = {}
        self._config: WindowConfig | None = None
        # CPU inference runs in a thread of its own pool so the loop keeps reading (launches
        # are serialised by the detector anyway), and so that ``stop`` can drop the queued
        # ones without the loop's shutdown waiting for them; on CUDA launching only queues
        # work and runs inline (see ``start``).
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="detect-launch")
        self._launcher: Callable[..., Awaitable[Any]] = self._in_pool
        self._stopped = False

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Load the detector and the scorer (a bad model raises ``ModelError`` naming the file)."""
        from stages import shipped
        from stages.detect import Detector  # torch and ultralytics load only here

        if self._stopped:  # started again after a stop: a fresh launch pool
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="detect-launch")
            self._stopped = False
        detect = shipped.resolve(self.settings.detect)
        self.settings = self.settings.model_copy(update={"detect": detect})
        if self.detector is None:
            self.detector = await asyncio.to_thread(Detector, detect)
        if self.scorer is None and detect.scorer:
            self.scorer = await asyncio.to_thread(self._load_scorer)
        startup.info("detect: model %s (classes %s) on %s; frame scorer %s", self.detector.settings.model,
                    ", ".join(sorted(set(self.detector.class_types.values()))) or "none of the class map",
                    self.detector.device, detect.scorer or "off")  # fmt: skip
        self._bound_padding()
        if self.settings.detect.descriptor == "scorer" and self.scorer is None:
            message = "detect.descriptor is 'scorer' but no scorer is configured (detect.scorer)"
            raise ModelError(message)
        if self.detector.device.type == "cuda":
            # Measured on an H200 (README): the GPU calls made from a pool thread lose the
            # GIL to the event loop on every kernel launch (the convoy effect), and ran 5x
            # slower than inline calls with a short switch interval. CUDA work only queues
            # kernels, so inline calls hold the loop for milliseconds, not a batch's time.
            self._launcher = _inline
            sys.setswitchinterval(GPU_SWITCH_INTERVAL_S)
            self._warm_up()
        self._config = WindowConfig.from_settings(self.settings.detect, model=self.detector.name)

    def _warm_up(self) -> None:
        """Run one full batch of the frames ingest makes of Tesla's cameras through decode,
        detector and scorer before the worker joins its partitions.

        A batch shape costs seconds when first seen (cuDNN's plans and the CUDA graph
        capture: 2.3-4.6 s each on an H200, bench/detect_startup.py). Paid here, it holds
        no lease and no frame; paid by a first real batch, it would stall the event loop
        past a heartbeat. One shape: batches pad to the worker's batch (``pad_batch_to``
        32, the default batch), and frames of another size capture on their first batch.
        Until 2026-12-02 every padded size was warmed at 640x360, a shape Tesla's 4:3
        frames never have: 12 s of start for nothing.
        """
        import numpy as np
        import simplejpeg

        width, height = warm_up_size(self.settings)
        grey = simplejpeg.encode_jpeg(np.full((height, width, 3), 114, dtype=np.uint8))
        self._run_batch([grey] * self.settings.worker.batch_size)
        self.detector.timings = type(self.detector.timings)()

    def _bound_padding(self) -> None:
        """No batch is larger than the worker's: padding stops there (no blank frames past it)."""
        self.detector.max_rows = self.settings.worker.batch_size
        if self.scorer is not None:
            self.scorer.max_rows = self.settings.worker.batch_size

    def _run_batch(self, jpegs: list[bytes]) -> tuple[list[FrameResult], list[FrameScore | None]]:
        """Decode, detect and score a batch of JPEGs at once, frames that fail to decode left
        out (the warm-up, benchmarks)."""
        images = [im for im in self.detector.decode(jpegs) if not isinstance(im, Exception)]
        return self._collect_now(self._launch_now(images))

    def _load_scorer(self) -> RoadworkScorer:
        """The scorer of ``detect.scorer``, on the detector's device (it reads the same pixels)."""
        from stages.scorer import RoadworkScorer

        detect = self.settings.detect
        return RoadworkScorer.load(detect.scorer, device=self.detector.device, cuda_graphs=detect.cuda_graphs,
                                   graph_rows=detect.pad_batch_to)  # fmt: skip

    async def stop(self) -> None:
        """Drop launches still queued for the inference thread: on the CPU a forward pass
        takes seconds, and the prefetched batches waiting behind the running one would hold
        an interrupted process that long (their entries stay pending and are redelivered)."""
        self._stopped = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _in_pool(self, func: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, func, *args)

    def _launch_now(self, images: list) -> PendingBatch:
        """Queue the detector, then the scorer, over the same decoded frames (one call)."""
        if self._stopped:
            message = "the detect worker is stopping"
            raise asyncio.CancelledError(message)
        return self.detector.launch(images, self._score if self.scorer is not None else None)

    def _score(self, images: list) -> dict[str, Any]:
        from stages.detect.scoring import score_heads

        return score_heads(self.scorer, images, scorer_descriptor=self.settings.detect.descriptor == "scorer")

    def _collect_now(self, pending: PendingBatch) -> tuple[list[FrameResult], list[FrameScore | None]]:
        """The launched batch's detections and scores (waits for the device)."""
        from stages.detect.scoring import frame_scores  # torch loads only with the model

        found = self.detector.collect(pending)
        return found, frame_scores(found, pending.extras)

    async def _collect(self, pending: PendingBatch) -> tuple[list[FrameResult], list[FrameScore | None]]:
        if not pending.ready():
            # The wait releases the GIL: the loop reads, fetches and publishes meanwhile.
            started = time.perf_counter()
            await asyncio.to_thread(pending.wait)
            self.timings.add("wait", time.perf_counter() - started)
        return self._collect_now(pending)

    async def revoked(self, partition: int) -> None:
        """Drop the partition's windows; its entries go to the next owner."""
        for camera in [c for c, p in self._camera_partition.items() if p == partition]:
            self.windows.pop(camera, None)
            self._camera_partition.pop(camera, None)

    async def assigned(self, partition: int) -> None:
        """A partition arrives: start it from nothing (its pending entries are replayed)."""
        await self.revoked(partition)

    # -- the batch -------------------------------------------------------------------

    async def prepare(self, batch: list[Delivery]) -> dict[Key, Prepared]:
        """Fetch the batch's blobs in one round trip, decode them and launch detection.

        Returns:
            Per frame: its launched batch and row in it, or the frame's ``InputError``.
        """
        frames = [d for d in batch if isinstance(d.message, FrameRef)]
        if not frames:
            return {}
        started = time.perf_counter()
        blobs = await self.blobs.get_many([d.message.blob_key for d in frames])
        self.timings.add("fetch", time.perf_counter() - started)
        labels = [_frame_name(d.message) for d in frames]
        decoded = await asyncio.to_thread(self.detector.decode, blobs, labels)
        good = [i for i, image in enumerate(decoded) if not isinstance(image, InputError)]
        pending = await self._launcher(self._launch_now, [decoded[i] for i in good]) if good else None
        rows = {i: row for row, i in enumerate(good)}
        # Launched, or the frame's InputError.
        return {_key(d): (pending, rows[i]) if i in rows else decoded[i] for i, d in enumerate(frames)}

    async def handle(self, batch: list[Delivery], prepared: dict[Key, Prepared] | None = None) -> BatchResult:
        """The batch's detections (launched by ``prepare``), then the windows in batch order.

        The runtime calls it under its state lock, so no partition is revoked meanwhile.
        """
        if prepared is None:
            prepared = await self.prepare(batch)
        frames = [d for d in batch if isinstance(d.message, FrameRef)]
        self.batch_sizes.append(len(frames))
        items = {_key(d): prepared.get(_key(d)) for d in frames}
        collected: dict[int, tuple[list, list, dict[str, float]]] = {}
        for item in items.values():
            if isinstance(item, tuple) and id(item[0]) not in collected:
                collected[id(item[0])] = (*await self._collect(item[0]), _per_frame_ms(item[0]))
        started = time.perf_counter()
        result = BatchResult(ack=[])
        for delivery in batch:
            if isinstance(delivery.message, DriveMarker):
                self._on_marker(delivery, result)
                continue
            item = items[_key(delivery)]
            if isinstance(item, tuple):
                found, scores, timings = collected[id(item[0])]
                self._on_frame(delivery, found[item[1]], scores[item[1]], timings, result)
            else:
                result.failed.append((delivery, item or InputError(f"{_frame_name(delivery.message)}: not decoded")))
        self.timings.add("window", time.perf_counter() - started)
        await self._release_blobs(result.ack)
        return result

    def window_stats(self) -> WindowStats:
        """Reduction figures over every camera this handler has seen (ended and live)."""
        total = WindowStats()
        total.add(self.ended_stats)
        for windows in self.windows.values():
            total.add(windows.stats)
        return total

    # -- frames and markers -------------------------------------------------------------

    def _on_frame(
        self,
        delivery: Delivery,
        found: FrameResult,
        score: FrameScore | None,
        timings: dict[str, float],
        result: BatchResult,
    ) -> None:
        ref: FrameRef = delivery.message
        prob = None if score is None else round(score.prob, 6)
        detections = FrameDetections(
            drive_id=ref.drive_id,
            camera=ref.camera,
            seq=ref.seq,
            tick=ref.tick,
            t=ref.t,
            utc=ref.utc,
            telemetry=ref.telemetry,
            blob_key=ref.blob_key,
            detections=found.detections,
            roadwork_prob=prob,
            model=self.detector.name,
            ingested_utc=ref.ingested_utc,
            timings_ms=timings,
        )
        result.outputs.append(self._to_fuse(detections, output_key("detect", ref.drive_id, ref.camera, ref.seq)))
        frame = WindowFrame(
            seq=ref.seq,
            tick=ref.tick,
            t=ref.t,
            blob_key=ref.blob_key,
            descriptor=found.descriptor if score is None else score.descriptor,
            detections=found.detections,
            utc=ref.utc,
            telemetry=ref.telemetry,
            roadwork_prob=prob,
        )
        self._apply(self._camera(ref.drive_id, ref.camera, delivery.partition).add(frame, delivery), result)

    def _on_marker(self, delivery: Delivery, result: BatchResult) -> None:
        marker: DriveMarker = delivery.message
        if marker.event == "ended":
            cameras = [marker.camera] if marker.camera else self._cameras_of(marker.drive_id, delivery.partition)
            counts = {}
            for camera in cameras:
                windows = self.windows.pop((marker.drive_id, camera), None)
                self._camera_partition.pop((marker.drive_id, camera), None)
                if windows is not None:
                    self._apply(windows.flush(), result)
                    self.ended_stats.add(windows.stats)
                counts[camera] = windows.last_index + 1 if windows is not None else 0
            marker = marker.copy_with(segment_counts={**marker.segment_counts, **counts})
        dedupe = output_key("detect", "drive", marker.drive_id, marker.camera or "", marker.event)
        result.outputs.append(self._to_fuse(marker, dedupe))
        result.ack.append(delivery)

    def _apply(self, update: Step[Segment], result: BatchResult) -> None:
        for segment in update.outputs:
            key = output_key("detect", "segment", segment.drive_id, segment.camera, segment.index)
            result.outputs.append(Output(names.SEGMENTS, segment, key))
        result.ack.extend(update.release)

    def _to_fuse(self, message: Message, dedupe_key: str) -> Output:
        partition = names.drive_partition(message.drive_id, self.settings.broker.fuse_partitions)
        return Output(names.DETECTIONS, message, dedupe_key, partition)

    def _camera(self, drive: str, camera: str, partition: int | None) -> CameraWindows:
        key = (drive, camera)
        if key not in self.windows:
            self.windows[key] = CameraWindows(drive, camera, self._config)
            self._camera_partition[key] = partition
        return self.windows[key]

    def _cameras_of(self, drive: str, partition: int | None) -> list[str]:
        return sorted(c for (d, c), p in self._camera_partition.items() if d == drive and p == partition)

    async def _release_blobs(self, acked: list[Delivery]) -> None:
        # The pixels stay (vera and vlm read key frames by blob key until the TTL); only the
        # producers' in-flight count drops, once per frame, when its window is published.
        nbytes = sum(d.message.nbytes for d in acked if isinstance(d.message, FrameRef))
        if nbytes:
            await self.blobs.release(nbytes)


def _per_frame_ms(pending: PendingBatch) -> dict[str, float]:
    """Host milliseconds per frame of each detector step of the frame's batch."""
    return {k: round(1000 * v / max(len(pending), 1), 3) for k, v in pending.seconds.items()}


def _frame_name(ref: FrameRef) -> str:
    return f"frame {ref.drive_id}/{ref.camera}#{ref.seq} (blob {ref.blob_key})"


def warm_up_size(settings: Settings) -> tuple[int, int]:
    """(width, height) of the frames ingest makes of a Tesla HW3 camera (1280×960, 4:3)
    with these settings: 640×480 at the default ``ingest.long_side``."""
    from stages.frames import target_size

    return target_size(*TESLA_CAMERA, settings.ingest.long_side)


def build(settings: Settings, blobs: BlobStore) -> DetectHandler:
    """The registry's builder: a detect handler (the model loads in ``start``)."""
    return DetectHandler(settings, blobs)

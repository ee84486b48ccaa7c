"""The ingest handler: one ``Job`` (a drive) in, ordered frame references out.

One thread decodes the drive's clips back to back, minute by minute and camera by
camera, and samples them on the drive's shared tick grid; each sampled frame is resized
and JPEG-encoded in a small thread pool (swscale and libjpeg-turbo release the GIL) while
the decoder runs on. The loop meanwhile stores finished chunks' pixels in the blob store
and publishes their ``FrameRef``s to the frame partition of (drive, camera). Decoding so
never waits for encoding, publishing or the next clip's start. Every output has a
deterministic dedupe key, so a redelivered job publishes nothing twice.

A ``DriveMarker`` "started" precedes a drive's frames on every camera partition and on
the drives hop; "ended" (frame counts, missing minutes, missed ticks, problems) follows the
last frame. A broken clip is a problem in the marker, not a failed job: the other cameras
and minutes go on. Every loss is a problem in words naming its file: empty, header-only,
cut or unreadable clips, a camera of the car with no clip in a minute, ticks a camera had
no frame for, telemetry without a GPS fix, a clip decord could not read. Only a job outside
the allowed footage roots fails (``InputError``); a job dead-lettered for good still ends
its drive (``dead_lettered``). Minutes are placed by their UTC starts (``minute_offsets``).

A drive split into per-camera jobs (``Job.cameras``, ``stages.jobs``) decodes only its
cameras; each part stores their records and the part that completes the drive publishes
the merged "ended" markers (``workers.handlers.ingest_parts``), which say what one whole-drive job
would: problems, missing and absent minutes, missed ticks, the car's absent cameras. A
dead-lettered part ends only its own cameras and stores failed records, so the drive
still ends once every part has finished or failed.

A long drive's camera split into spans of minutes (``Job.span``) decodes only its
minutes, stores its frames' pixels and a record of them, and publishes them in time order
through the camera's chain (``workers.handlers.ingest_spans``); the chain's end stores
the camera's record, and the drive ends as above.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from brokers.blobs import BlobStore
from stages.decode import (
    ClipStats,
    Sample,
    clip_notes,
    decoded_size,
    minute_offsets,
    probe_creation_utc,
    sample_clip,
    sample_keyframes,
)
from stages.discover import footage_name
from stages.frames import Encoded, encode_frame
from stages import sei
from stages.jobs import drive_cameras, job_cameras
from stages.nvdec import NvdecSampler, choose_decoder, decodes_with_nvdec, nvdec_refuses, nvdec_unavailable, timeline
from stream import ids
from stream.errors import FootageError, InputError
from stream.names import DRIVES, FRAMES, INGEST, JOBS, frame_partition
from stream.schemas import DriveMarker, FrameRef, Job, Telemetry
from stream.settings import Settings
from workers.handler import BatchResult, Delivery, Handler, Output
from workers.handlers.ingest_parts import RECORD_TTL_MS, CameraRecord, merge, record_key
from workers.handlers.ingest_spans import PUBLISHED, Cursor, SpanRecord, chain_key, join, span_key
from workers.logs import STARTUP_LOGGER

log = logging.getLogger("roadstream.ingest")
startup = logging.getLogger(STARTUP_LOGGER)

#: Frames per blob write and publish round trip.
CHUNK = 32
#: Chunks the decoding thread may run ahead of publishing.
AHEAD = 4
#: Threads that resize and encode sampled frames while the decoder runs on.
ENCODERS = 2
#: Sampled frames decoded but not yet encoded; the decoder waits beyond this (memory).
BACKLOG = 8
#: Frames per publish round trip when a span's frames go out at its turn.
SPAN_CHUNK = 256
#: A held span's pixels may wait for earlier spans behind a slow detect stage: they keep
#: a day, and get ``broker.blob_ttl_s`` from when they are published.
HELD_BLOB_TTL_S = 24 * 3600
#: A held span waits for memory room only while its camera's chain moves; after this
#: long without a move (the span before it is not running: its worker died and its job
#: waits to be claimed, perhaps by this very process) it goes on over the bound.
HELD_STUCK_S = 60.0


@dataclass
class _Shot:
    """One sampled, encoded frame on its way to the blob store."""

    tick: int
    pts_s: float
    telemetry: Telemetry | None
    pixels: Encoded


@dataclass
class _Piece:
    """Part of one camera minute, handed from the decoding thread to the loop."""

    index: int  # the minute
    camera: str
    shots: list[Future]  # of _Shot, in tick order; encoding may still be running
    utc: Future | None  # of the clip's creation time
    last: bool = False  # the camera minute ends with this piece
    problems: list[str] = field(default_factory=list)  # why the clip stopped early, what it lost
    missed: int = 0  # ticks inside the clip that got no frame


@dataclass
class DriveProgress:
    """What has been published of a drive: the content of its "ended" marker."""

    cameras: list[str]
    frame_counts: dict[str, int] = field(default_factory=dict)
    ticks: set[int] = field(default_factory=set)
    missing: dict[str, list[str]] = field(default_factory=dict)
    absent: dict[str, list[str]] = field(default_factory=dict)  # camera -> minutes with no file
    missed_ticks: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    first_utc: float | None = None
    last_utc: float | None = None
    minutes: int = 0
    # Where problems and the first/last UTC came from, (minute index, camera): what a
    # drive split into per-camera jobs needs to merge its markers (``workers.handlers.ingest_parts``).
    problem_at: list[tuple[int, str]] = field(default_factory=list)
    first_at: tuple[int, str] | None = None
    last_at: tuple[int, str] | None = None
    #: A span job's frames, stored but held back until the span's turn (``None``: published at once).
    held: list[FrameRef] | None = None
    #: The chain cursor at which the held span stopped waiting for memory (``_wait_held``).
    stuck_at: bytes | None = None

    def lacks(self, camera: str, minute: str) -> None:
        """Note a camera minute that gave no frame."""
        self.missing.setdefault(camera, []).append(minute)

    def all_problems(self) -> list[str]:
        """The problems, then one line per camera absent from some minutes (normal, but said)."""
        lines = list(self.problems)
        for camera, minutes in self.absent.items():
            lines.append(f"{camera}: no clip in {len(minutes)} of {self.minutes} minute(s) "
                         f"({', '.join(minutes)}): the camera did not record them")  # fmt: skip
        return lines


def estimate(event: dict[str, str] | None) -> Telemetry | None:
    """The event's estimated position, marked as an estimate; ``None`` without one (or at 0, 0)."""
    try:
        lat, lon = sei.position(float(event["est_lat"]), float(event["est_lon"]))
    except (TypeError, KeyError, ValueError):
        return None
    return Telemetry(lat=lat, lon=lon, estimated=True) if lat is not None else None


class IngestHandler(Handler):
    """Decodes drives into frame references.

    Parameters:
        settings: all settings; ``settings.ingest`` and ``settings.broker`` are used.
        blobs: where the frame pixels go.
    """

    group = INGEST
    inputs = (JOBS,)
    partitioned = False
    accepts = (Job,)

    def __init__(self, settings: Settings, blobs: BlobStore) -> None:
        self.settings = settings
        self.blobs = blobs
        self.frames_published = 0
        self.fallbacks = 0  # clips NVDEC refused or failed on, decoded with PyAV instead
        self._sampler: NvdecSampler | None = None
        asked = settings.ingest.decoder
        self.decoder, note = choose_decoder(asked, nvdec_unavailable() if asked in ("auto", "nvdec") else None)
        if note is not None:  # asked for nvdec by name: worth a warning; auto: a note
            log.log(logging.WARNING if asked == "nvdec" else logging.INFO, note)

    async def start(self) -> None:
        """An NVDEC worker starts CUDA and nvJPEG on its GPU before it takes a job: it
        takes several at once (``worker.concurrency``), and would otherwise hold them
        through that start while PyAV processes stand ready. A failed warm-up is logged;
        each clip then falls back to PyAV on its own, as always."""
        ing = self.settings.ingest
        if not decodes_with_nvdec(self.decoder, ing.sample, ing.encoding):
            return
        started = time.perf_counter()
        try:
            await asyncio.to_thread(self._nvdec().warm_up)
        except Exception as exc:  # noqa: BLE001 - the clips' own fallback covers it
            log.warning("ingest: NVDEC warm-up on %s failed (%s); clips NVDEC fails on are decoded with PyAV",
                        ing.nvdec_device, exc)  # fmt: skip
            return
        startup.info("ingest: NVDEC and nvJPEG ready on %s in %.1f s", ing.nvdec_device, time.perf_counter() - started)

    async def handle(self, batch: list[Delivery], prepared: object = None) -> BatchResult:
        """Ingest each job of the batch; a job outside the footage roots fails alone."""
        result = BatchResult(ack=[])
        for delivery in batch:
            try:
                await self.ingest(delivery.message)
            except InputError as exc:
                result.failed.append((delivery, exc))
            else:
                result.ack.append(delivery)
        return result

    async def ingest(self, job: Job) -> DriveMarker:
        """Publish one drive's frames and markers.

        Returns:
            The "ended" marker that was published.

        Raises:
            InputError: a clip lies outside ``settings.ingest.roots``.
        """
        self.check_roots(job)
        cameras = drive_cameras(job)
        mine = job_cameras(job)  # all of them unless the drive was split into parts
        progress = DriveProgress(cameras, {c: 0 for c in cameras}, minutes=len(job.clips))
        await self._publish_markers(job, self._marker(job, "started", progress), mine)
        if job.span is not None:
            # Redelivered after it stored its record: only the chain is left to move.
            if await self.publisher.get_value(self._span_key(job, job.span.index)) is not None:
                return await self._advance_chain(job)
            progress.held = []
        pool = _Encoders()
        try:
            taken = 0  # frames of the current camera minute
            pieces = _in_thread(lambda: self._decode_drive(job, mine, pool), AHEAD)
            async with contextlib.aclosing(pieces):  # a failure stops the decoding thread at once
                async for piece in pieces:
                    taken += await self._take(job, piece, progress)
                    if piece.last:
                        minute = job.clips[piece.index].start
                        if taken == 0:
                            progress.lacks(piece.camera, minute)
                        if piece.camera not in job.clips[piece.index].files:
                            progress.absent.setdefault(piece.camera, []).append(minute)
                        taken = 0
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        if job.span is not None:
            return await self._finish_span(job, progress)
        if job.cameras:
            return await self._finish_part(job, mine, progress)
        _add_car_absent(job, progress)
        ended = self._marker(job, "ended", progress)
        await self._publish_markers(job, ended)
        return ended

    async def dead_lettered(self, message: Job, error: str) -> list[Output]:
        """A job that failed for good ends what it was to publish, with the failure as its
        problem, so fuse closes the drive's windows on what arrived instead of waiting out
        its stall guard. A whole drive's job ends every camera partition (and the drives
        hop). A part of a split drive ends only its own cameras: it stores their records
        (marked failed) like a finished part, so the drive still ends once every part has
        finished or failed; the part (or this hook) that completes it publishes the merged
        markers on every camera. A job refused for its roots published nothing and gets
        nothing."""
        try:
            self.check_roots(message)
        except InputError:
            return []
        cameras = drive_cameras(message)
        progress = DriveProgress(cameras, minutes=len(message.clips))
        if not message.cameras:
            progress.problems.append(f"{message.root}: ingest of this drive failed and was dead-lettered ({error}); "
                                     "frames after the failure were not published")  # fmt: skip
            return self._marker_outputs(message, self._marker(message, "ended", progress))
        mine = job_cameras(message)
        if message.span is not None:
            return await self._span_failed(message, error)
        problem = (f"{message.root}: ingest of camera(s) {', '.join(mine)} of this drive failed and was "
                   f"dead-lettered ({error}); frames after the failure were not published")  # fmt: skip
        ns = self.settings.namespace
        for camera in mine:
            key = record_key(ns, message.drive_id, camera)
            if await self.publisher.get_value(key) is None:  # a part that finished before failing keeps its record
                mark = [(len(message.clips), problem)] if camera == mine[0] else []
                await self.publisher.put_value(key, CameraRecord(problems=mark, failed=True).encode(), RECORD_TTL_MS)
        whole = await self._merged(message)
        if whole is not None:  # this failure completed the drive: every camera ends, merged
            return self._marker_outputs(message, self._marker(message, "ended", whole))
        # Other parts still run: only this part's cameras end now, and not on the drives
        # hop, whose one "ended" copy (deduplicated) is the merged one still to come.
        progress.problems.append(problem)
        return self._marker_outputs(message, self._marker(message, "ended", progress), mine, hop=False)

    async def _finish_part(self, job: Job, mine: list[str], progress: DriveProgress) -> DriveMarker | None:
        """Store this part's camera records; the part that completes the drive ends it.

        Returns:
            The "ended" marker when this part published it, else ``None``.
        """
        ns = self.settings.namespace
        for camera in mine:
            record = _camera_record(progress, camera)
            await self.publisher.put_value(record_key(ns, job.drive_id, camera), record.encode(), RECORD_TTL_MS)
        return await self._end_if_complete(job)

    async def _end_if_complete(self, job: Job) -> DriveMarker | None:
        """Publish the drive's merged "ended" markers once every camera has its record.

        Returns:
            The "ended" marker when published, else ``None`` (another part will end the drive).
        """
        whole = await self._merged(job)
        if whole is None:
            return None
        ended = self._marker(job, "ended", whole)
        await self._publish_markers(job, ended)
        return ended

    async def _finish_span(self, job: Job, progress: DriveProgress) -> DriveMarker | None:
        """Store the span's record (its held frames and its share of the camera's record),
        then advance the camera's chain."""
        camera = job.cameras[0]
        record = SpanRecord(_camera_record(progress, camera), progress.held or [])
        key = self._span_key(job, job.span.index)
        # Another delivery of this span (a worker paused past its claim) may have stored its
        # record first, and the chain published from it: that one stands.
        if await self.publisher.get_value(key) is None:
            await self.publisher.put_value(key, record.encode(), RECORD_TTL_MS)
        return await self._advance_chain(job)

    async def _span_failed(self, job: Job, error: str) -> list[Output]:
        """A span dead-lettered for good: an empty record with the failure as its problem,
        so the chain moves past it and the camera and drive still end.

        Returns:
            The span's job queued again (once): finding its record, it advances the chain
            as any redelivered span job does. Not here: this hook may run in the heartbeat
            (reclaim), and the chain's spans wait for detect's room as they publish; and
            the dead letter is acked already, so a crash here would leave the chain stuck.
        """
        camera, span = job.cameras[0], job.span
        key = self._span_key(job, span.index)
        if await self.publisher.get_value(key) is None:  # else it stored its record before failing
            first, last = job.clips[span.first].start, job.clips[span.end - 1].start
            minutes = f"minute {first}" if first == last else f"minutes {first} to {last}"
            problem = (f"{job.root}: ingest of camera {camera}, {minutes}, of this drive failed and was "
                       f"dead-lettered ({error}); none of their frames were published")  # fmt: skip
            record = SpanRecord(CameraRecord(problems=[(span.first, problem)]), [])
            await self.publisher.put_value(key, record.encode(), RECORD_TTL_MS)
        again = ids.output_key(INGEST, job.drive_id, "advance", camera, f"{span.index}@{span.cut}")
        return [Output(JOBS, job, again)]

    async def _advance_chain(self, job: Job) -> DriveMarker | None:
        """Publish the camera's stored spans in order from the chain's cursor; the job that
        publishes the last span stores the camera's record and may end the drive
        (``workers.handlers.ingest_spans``).

        Returns:
            The "ended" marker when this job published it, else ``None``.
        """
        camera, count = job.cameras[0], job.span.count
        while True:
            cursor = Cursor.decode(await self.publisher.get_value(self._chain_key(job)))
            if cursor.next >= count:
                break
            data = await self.publisher.get_value(self._span_key(job, cursor.next))
            if data is None:
                return None  # that span still decodes: its job goes on from here
            if data == PUBLISHED:
                break  # another job published them all, and stored the camera's record
            refs = SpanRecord.decode(data).refs
            await self._publish_held(job, camera, refs, cursor.frames)
            after = Cursor(cursor.next + 1, cursor.frames + len(refs))
            await self.publisher.put_value(self._chain_key(job), after.encode(), RECORD_TTL_MS)
        await self._store_camera_record(job, camera)
        return await self._end_if_complete(job)

    async def _store_camera_record(self, job: Job, camera: str) -> None:
        """The camera's record joined from its spans' (once), then the spans become
        tombstones (again by every job that passes: one that stored the record may have
        died before it cleared them)."""
        ns = self.settings.namespace
        keys = [self._span_key(job, k) for k in range(job.span.count)]
        if await self.publisher.get_value(record_key(ns, job.drive_id, camera)) is None:
            spans = []
            for key in keys:
                data = await self.publisher.get_value(key)
                if data is None or data == PUBLISHED:
                    return  # another job stored the record and is clearing the spans
                spans.append(SpanRecord.decode(data).record)
            await self.publisher.put_value(record_key(ns, job.drive_id, camera), join(spans).encode(), RECORD_TTL_MS)
        for key in keys:
            await self.publisher.put_value(key, PUBLISHED, RECORD_TTL_MS)

    async def _publish_held(self, job: Job, camera: str, refs: list[FrameRef], first_seq: int) -> None:
        """A span's frames, numbered on from ``first_seq``, with the dedupe keys of those numbers.

        Only the hop's backlog is waited for: the pixels are stored already, and the spans
        held back behind this one must not keep it from publishing.
        """
        partition = frame_partition(job.drive_id, camera, self.settings.broker.frame_partitions)
        for start in range(0, len(refs), SPAN_CHUNK):
            await self.publisher.wait_for_room(FRAMES, partition, memory=False)
            chunk = refs[start:start + SPAN_CHUNK]
            await self.blobs.expire_many([ref.blob_key for ref in chunk], self.settings.broker.blob_ttl_s)
            outputs = []
            for i, ref in enumerate(chunk, first_seq + start):
                key = ids.output_key(INGEST, job.drive_id, camera, i)
                outputs.append(Output(FRAMES, ref.copy_with(seq=i), key, partition))
            await self.publisher.publish(outputs)
            self.frames_published += len(outputs)

    async def _merged(self, job: Job) -> DriveProgress | None:
        """The whole drive's progress from its cameras' records; ``None`` while one lacks.

        It reports what one whole-drive job would: the merged records, the cameras absent
        from some minutes (from the clip list, in publishing order), and the car's cameras
        absent from the whole drive (written once, here).
        """
        cameras = drive_cameras(job)
        records = {}
        for camera in cameras:
            data = await self.publisher.get_value(record_key(self.settings.namespace, job.drive_id, camera))
            if data is None:
                return None
            records[camera] = CameraRecord.decode(data)
        merged = merge(cameras, records)
        whole = DriveProgress(
            cameras, frame_counts=merged.frame_counts, ticks=merged.ticks, missing=merged.missing,
            missed_ticks=merged.missed_ticks, problems=merged.problems, first_utc=merged.first_utc,
            last_utc=merged.last_utc, minutes=len(job.clips),
        )
        for clip in job.clips:
            for camera in cameras:
                if camera not in clip.files:
                    whole.absent.setdefault(camera, []).append(clip.start)
        _add_car_absent(job, whole)
        return whole

    def check_roots(self, job: Job) -> None:
        """Refuse a job whose footage lies outside the configured roots.

        Without configured roots only footage under the current folder is taken: a bare
        worker must not open whatever path a job names (``/etc/passwd``).

        Raises:
            InputError: a clip path is not under any of ``settings.ingest.roots`` (or,
                with none configured, not under the current folder).
        """
        roots = [Path(r).resolve() for r in self.settings.ingest.roots]
        where = f"the allowed footage roots ({', '.join(map(str, roots))})"
        if not roots:
            roots = [Path.cwd().resolve()]
            where = (f"the allowed footage roots (none configured: only the current folder {roots[0]}; "
                     "set ingest.roots to the footage folders)")  # fmt: skip
        for clip in job.clips:
            for path in clip.files.values():
                resolved = Path(path).resolve()
                if not any(resolved.is_relative_to(root) for root in roots):
                    message = f"{path}: outside {where}"
                    raise InputError(message)

    async def _take(self, job: Job, piece: _Piece, progress: DriveProgress) -> int:
        """Publish one piece's frames and note its problem; returns how many frames it had."""
        shots = [await _result(shot) for shot in piece.shots]
        if shots:
            utc = await _result(piece.utc)
            await self._publish_chunk(job, piece.camera, job.clips[piece.index].start, shots, utc, progress)
            if utc is not None:  # its frames have a UTC: the last one is the drive's last so far
                progress.last_at = (piece.index, piece.camera)
        for problem in piece.problems:
            progress.problems.append(problem)
            progress.problem_at.append((piece.index, piece.camera))
        if piece.missed:
            progress.missed_ticks[piece.camera] = progress.missed_ticks.get(piece.camera, 0) + piece.missed
        if progress.first_utc is not None and progress.first_at is None:
            progress.first_at = (piece.index, piece.camera)
        return len(shots)

    def _decode_drive(self, job: Job, cameras: list[str], pool: _Encoders) -> Iterator[_Piece]:
        """Every camera minute of the drive in publishing order (runs in the decoding thread).

        With ``ingest.parallel_clips`` above 1, that many clips decode at once in
        threads of their own and their pieces come out in the same order: one long drive's
        camera job is the critical path of a run once the short drives are done (on the
        H200, the 10-minute drive's six camera jobs held six of twelve processes to the end).
        """
        offsets = minute_offsets(job)
        units = []  # (clip index, camera, path or None, offset, limit) in publishing order
        first, end = (job.span.first, job.span.end) if job.span is not None else (0, len(job.clips))
        for index, clip in enumerate(job.clips[first:end], first):
            limit = offsets[index + 1] - offsets[index] if index + 1 < len(job.clips) else float("inf")
            units.extend((index, camera, clip.files.get(camera), offsets[index], limit) for camera in cameras)
        parallel = self.settings.ingest.parallel_clips or 1  # NVDEC: one session per clip at once
        if parallel <= 1:
            for index, camera, path, offset, limit in units:
                if path is None:
                    yield _Piece(index, camera, [], None, last=True)
                else:
                    yield from self._decode_clip(index, camera, path, offset, limit, pool)
            return
        yield from self._decode_parallel(units, parallel, pool)

    def _decode_parallel(self, units: list[tuple], parallel: int, pool: _Encoders) -> Iterator[_Piece]:
        """``units``' pieces in order, ``parallel`` clips decoding at once, each whole."""
        stop = threading.Event()

        def whole(index: int, camera: str, path: str | None, offset: float, limit: float) -> list[_Piece]:
            if path is None:
                return [_Piece(index, camera, [], None, last=True)]
            pieces = []
            for piece in self._decode_clip(index, camera, path, offset, limit, pool):
                pieces.append(piece)
                if stop.is_set():  # the consumer is gone: stop decoding
                    break
            return pieces

        clips = ThreadPoolExecutor(parallel, thread_name_prefix="ingest-clip")
        try:
            pending: deque[Future] = deque()
            queued = iter(units)
            for unit in itertools.islice(queued, parallel):
                pending.append(clips.submit(whole, *unit))
            while pending:
                pieces = pending.popleft().result()
                unit = next(queued, None)
                if unit is not None:
                    pending.append(clips.submit(whole, *unit))
                yield from pieces
        finally:
            stop.set()
            clips.shutdown(wait=False, cancel_futures=True)

    def _decode_clip(
        self, index: int, camera: str, path: str, offset_s: float, limit_s: float, pool: _Encoders
    ) -> Iterator[_Piece]:
        ing = self.settings.ingest
        tick0 = round(offset_s * ing.sample_fps)
        utc = pool.submit(probe_creation_utc, path)
        shots: list[Future] = []
        stats = ClipStats()
        problems: list[str] = []
        try:
            for sample in self._samples(path, limit_s, stats):
                if sample.telemetry is not None and sample.telemetry.lat is None:
                    stats.no_fix += 1
                shots.append(pool.submit_frame(self._encode, tick0 + sample.k, sample))
                if len(shots) >= CHUNK:
                    yield _Piece(index, camera, shots, utc)
                    shots = []
        except FootageError as exc:
            # A clip that breaks mid-way (truncated) still hands over what it had.
            problems.append(str(exc))
        yield _Piece(index, camera, shots, utc, last=True, problems=problems + clip_notes(path, stats),
                     missed=len(stats.missed))  # fmt: skip

    def _encode(self, tick: int, sample: Sample) -> _Shot:
        ing = self.settings.ingest
        if isinstance(sample.image, Encoded):  # NVDEC: resized and encoded on the GPU already
            return _Shot(tick, sample.pts_s, sample.telemetry, sample.image)
        pixels = encode_frame(sample.image, long_side=ing.long_side, encoding=ing.encoding, quality=ing.jpeg_quality)
        return _Shot(tick, sample.pts_s, sample.telemetry, pixels)

    def _samples(self, path: str, limit_s: float, stats: ClipStats | None = None) -> Iterator[Sample]:
        """One clip's samples with the configured sampling and decoder (decoding thread);
        ``stats`` is filled in as ``sample_clip`` fills it (frames, missed ticks, fallback)."""
        ing = self.settings.ingest
        stats = stats if stats is not None else ClipStats()
        if ing.sample == "keyframes":
            return sample_keyframes(path, sample_fps=ing.sample_fps, limit_s=limit_s, threads=ing.decoder_threads,
                                    stats=stats)  # fmt: skip
        if decodes_with_nvdec(self.decoder, ing.sample, ing.encoding):  # keyframes returned above
            return self._nvdec_or_pyav(path, limit_s, stats)
        decoder = "pyav" if self.decoder == "nvdec" else self.decoder
        size = decoded_size(path, ing.long_side) if decoder == "decord" else None
        return sample_clip(path, sample_fps=ing.sample_fps, limit_s=limit_s, threads=ing.decoder_threads,
                           decoder=decoder, size=size, stats=stats)  # fmt: skip

    def _nvdec_or_pyav(self, path: str, limit_s: float, stats: ClipStats) -> Iterator[Sample]:
        """NVDEC's samples; PyAV's, with a log line, for a clip NVDEC refuses or fails on at once
        (or whose index holds no frame: PyAV then says why, as for any clip)."""
        ing = self.settings.ingest
        line = timeline(Path(path))
        reason = nvdec_refuses(line.info) or (None if line.candidates else "no frame in the clip's index")
        if reason is None:
            yielded = False
            try:
                samples = self._nvdec().sample(path, sample_fps=ing.sample_fps, limit_s=limit_s, line=line, stats=stats)
                for sample in samples:
                    yielded = True
                    yield sample
                return
            except Exception as exc:  # the GPU path is never worth a failed job
                if yielded:  # part of the clip is published: PyAV cannot take over mid-way
                    if isinstance(exc, FootageError):
                        raise
                    raise FootageError(Path(path), f"NVDEC stopped ({exc})") from exc
                reason = str(exc)
        log.warning("%s: %s; decoding it with PyAV", path, reason)
        self.fallbacks += 1
        stats.decoded, stats.expected, stats.missed = 0, 0, []  # what NVDEC noted before failing does not count
        yield from sample_clip(path, sample_fps=ing.sample_fps, limit_s=limit_s, threads=ing.decoder_threads,
                               stats=stats)  # fmt: skip

    def _nvdec(self) -> NvdecSampler:
        if self._sampler is None:
            ing = self.settings.ingest
            self._sampler = NvdecSampler(ing.nvdec_device, long_side=ing.long_side, quality=ing.jpeg_quality)
        return self._sampler

    async def _publish_chunk(
        self, job: Job, camera: str, minute: str, shots: list[_Shot], created: float | None,
        progress: DriveProgress,
    ) -> None:
        partition = frame_partition(job.drive_id, camera, self.settings.broker.frame_partitions)
        held = progress.held is not None
        if not held:
            await self.publisher.wait_for_room(FRAMES, partition)
        else:
            await self._wait_held(job, partition, progress)
        fallback = estimate(job.event)
        refs, blobs = [], {}
        now = time.time()
        for shot in shots:
            seq = progress.frame_counts[camera]
            progress.frame_counts[camera] = seq + 1
            # A held span's seq is its own (renumbered when published): its pixels' key names the span (and the cut).
            key = ids.blob_key(job.drive_id, f"{camera}.{job.span.index}.{job.span.cut}" if held else camera, seq)
            blobs[key] = shot.pixels.data
            utc = created + shot.pts_s if created is not None else None
            progress.ticks.add(shot.tick)
            progress.first_utc = utc if progress.first_utc is None else progress.first_utc
            progress.last_utc = utc if utc is not None else progress.last_utc
            ref = FrameRef(
                drive_id=job.drive_id, camera=camera, clip=minute, seq=seq, tick=shot.tick,
                t=shot.tick / self.settings.ingest.sample_fps, pts=shot.pts_s, utc=utc,
                telemetry=shot.telemetry or fallback, blob_key=key, width=shot.pixels.width,
                height=shot.pixels.height, encoding=shot.pixels.encoding, nbytes=len(shot.pixels.data),
                ingested_utc=now,
            )
            refs.append(Output(FRAMES, ref, ids.output_key(INGEST, job.drive_id, camera, seq), partition))
        ttl = max(HELD_BLOB_TTL_S, self.settings.broker.blob_ttl_s) if held else self.settings.broker.blob_ttl_s
        await self.blobs.put_many(blobs, ttl_s=ttl)
        if held:
            progress.held.extend(output.message for output in refs)
            return
        await self.publisher.publish(refs)
        self.frames_published += len(refs)

    async def _wait_held(self, job: Job, partition: int, progress: DriveProgress) -> None:
        """Wait for memory room (``broker.max_blob_bytes``, ``max_used_memory``) while the
        camera's chain moves; go on when it has not moved for ``HELD_STUCK_S``. The span
        next to publish never waits (see ``ingest_spans``), nor one that becomes next.

        Without that limit, held spans filling every ingest process could wait for ever
        on the span before them, whose job waits for a free process after its worker died.
        """
        key = self._chain_key(job)
        seen, since = await self.publisher.get_value(key), time.monotonic()
        if Cursor.decode(seen).next >= job.span.index:
            return
        if progress.stuck_at is not None and (seen or b"") == progress.stuck_at:
            return  # still stuck where it gave up: no new wait per chunk
        while True:
            try:
                await asyncio.wait_for(self.publisher.wait_for_room(FRAMES, partition, backlog=False), 1.0)
                return
            except TimeoutError:
                pass
            now = await self.publisher.get_value(key)
            if Cursor.decode(now).next >= job.span.index:
                return  # it became next to publish while waiting: it never waits (see ingest_spans)
            if now != seen:
                seen, since = now, time.monotonic()
            elif time.monotonic() - since > HELD_STUCK_S:
                log.warning("%s %s: the span before span %d has not moved for %.0f s; storing its frames over "
                            "the memory bound", job.drive_id, job.cameras[0], job.span.index, HELD_STUCK_S)  # fmt: skip
                progress.stuck_at = seen or b""  # b"": no cursor yet
                return

    def _span_key(self, job: Job, index: int) -> str:
        """Key of the record of span ``index`` of a span job's camera and cut."""
        return span_key(self.settings.namespace, job.drive_id, job.cameras[0], index, job.span.cut)

    def _chain_key(self, job: Job) -> str:
        """Key of the chain cursor of a span job's camera and cut."""
        return chain_key(self.settings.namespace, job.drive_id, job.cameras[0], job.span.cut)

    def _marker(self, job: Job, event: str, progress: DriveProgress) -> DriveMarker:
        position = estimate(job.event)
        return DriveMarker(
            drive_id=job.drive_id, event=event, cameras=progress.cameras,
            frame_counts=dict(progress.frame_counts) if event == "ended" else {},
            ticks=len(progress.ticks), missing=progress.missing if event == "ended" else {},
            missed_ticks=dict(progress.missed_ticks) if event == "ended" else {},
            problems=progress.all_problems() if event == "ended" else [], source=job.root,
            name=footage_name(job.clips),
            start_utc=progress.first_utc, end_utc=progress.last_utc if event == "ended" else None,
            est_lat=position.lat if position else None, est_lon=position.lon if position else None,
        )

    async def _publish_markers(self, job: Job, marker: DriveMarker, cameras: list[str] | None = None) -> None:
        await self.publisher.publish(self._marker_outputs(job, marker, cameras))

    def _marker_outputs(
        self, job: Job, marker: DriveMarker, cameras: list[str] | None = None, *, hop: bool = True
    ) -> list[Output]:
        # In band on each camera's partition (after its last frame for "ended"), and once
        # on the drives hop for whoever tracks drives as a whole. A part of a split drive
        # starts only its own cameras' partitions (the drives hop copy is deduplicated).
        outputs = [Output(DRIVES, marker, ids.output_key(INGEST, job.drive_id, marker.event))] if hop else []
        for camera in marker.cameras if cameras is None else cameras:
            partition = frame_partition(job.drive_id, camera, self.settings.broker.frame_partitions)
            copy = marker.copy_with(camera=camera)
            outputs.append(Output(FRAMES, copy, ids.output_key(INGEST, job.drive_id, marker.event, camera), partition))
        return outputs


class _Encoders(ThreadPoolExecutor):
    """The encoding threads, with a bounded backlog of decoded frames."""

    def __init__(self) -> None:
        super().__init__(ENCODERS, thread_name_prefix="ingest-encode")
        self._room = threading.Semaphore(BACKLOG)

    def submit_frame(self, encode: callable, *args) -> Future:
        """Queue one frame's encoding; blocks while ``BACKLOG`` frames wait already."""
        self._room.acquire()
        future = self.submit(encode, *args)
        future.add_done_callback(lambda _: self._room.release())
        return future


def _camera_record(progress: DriveProgress, camera: str) -> CameraRecord:
    """One camera's share of a part's progress (a part may decode several cameras)."""
    problems = [(i, p) for (i, c), p in zip(progress.problem_at, progress.problems, strict=True) if c == camera]
    first = progress.first_at if progress.first_at and progress.first_at[1] == camera else None
    last = progress.last_at if progress.last_at and progress.last_at[1] == camera else None
    return CameraRecord(
        frames=progress.frame_counts.get(camera, 0), ticks=sorted(progress.ticks),
        missing=list(progress.missing.get(camera, [])), problems=problems,
        first=(first[0], progress.first_utc) if first else None, last=(last[0], progress.last_utc) if last else None,
        missed_ticks=progress.missed_ticks.get(camera, 0),
    )


def _add_car_absent(job: Job, progress: DriveProgress) -> None:
    """A camera of the car that recorded nothing in this drive: said (absent, missing), not expected."""
    for camera in [c for c in job.car_cameras if c not in progress.cameras]:
        progress.absent[camera] = [clip.start for clip in job.clips]
        progress.missing[camera] = [clip.start for clip in job.clips]


async def _result(future: Future):
    """A thread pool future's result, without a loop round trip when it is already done."""
    return future.result() if future.done() else await asyncio.wrap_future(future)


async def _in_thread(make: callable, ahead: int) -> AsyncIterator:
    """Run a blocking generator in a thread, ``ahead`` items in advance; re-raise its error."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    room = threading.Semaphore(ahead)
    stop = threading.Event()
    done = object()

    def run() -> None:
        try:
            for item in make():
                room.acquire()
                if stop.is_set():
                    return
                loop.call_soon_threadsafe(queue.put_nowait, (item, None))
        except BaseException as exc:  # handed to the consumer, raised there
            if not stop.is_set():  # nobody listens any more (and the loop may be closed)
                loop.call_soon_threadsafe(queue.put_nowait, (None, exc))
            return
        loop.call_soon_threadsafe(queue.put_nowait, (done, None))

    thread = threading.Thread(target=run, name="ingest-decode", daemon=True)
    thread.start()
    try:
        while True:
            item, error = await queue.get()
            if error is not None:
                raise error
            if item is done:
                return
            room.release()
            yield item
    finally:
        stop.set()
        room.release()


def build(settings: Settings, blobs: BlobStore) -> IngestHandler:
    """The ingest handler (registered as ``workers.handlers.ingest:build``)."""
    return IngestHandler(settings, blobs)

"""Decode one camera's clip and sample it on the drive's tick grid, by presentation time.

Ticks are ``k / sample_fps`` seconds into the clip; for each tick the frame with the
nearest presentation timestamp is taken when it lies within half the *local* frame
spacing (the interval between the frames either side of the tick, unless that interval is
a hole in the stream), so every camera of a tick shows (nearly) the same instant, whatever
each camera's frame rate. The streams are variable frame rate: timestamps decide, never
frame counts or the average rate. Ticks that get no frame are counted (``ClipStats``).

The clip is decoded once; only sampled frames are ever converted (the caller resizes and
encodes them, ``stages.frames``). Telemetry SEI is read from the same demuxed packets
and keyed by the packet's pts, so it lands on the right frame with B-frames too.

PyAV is the default backend; decord is an option (it reads SEI through a PyAV
demux-only pass; a clip decord refuses, such as a truncated one, is read with PyAV).
Any unusable file raises ``FootageError`` naming it — possibly after some samples were
already yielded (a truncated clip keeps what it had and says how many frames it lost).
A display rotation (the MP4 display matrix) is carried on each PyAV frame
(``frame.rotation``) and applied when the frame is encoded (``stages.frames``); decord
applies it itself.
"""

from __future__ import annotations

import os
import statistics
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import av
import numpy as np

from stages import sei
from stages.discover import STAMP_FORMAT
from stages.frames import target_size
from stream.errors import FootageError
from stream.schemas import Job, Telemetry

#: Fewer decoded frames than the index promises, beyond this, means the file was cut.
TRUNCATION_SLACK = 2
#: An interval longer than this many times the recent median is a hole, not frame spacing.
HOLE = 1.5
#: Recent frame intervals the median spacing is taken over.
SPACING_WINDOW = 9


@dataclass(frozen=True)
class ClipInfo:
    """What the container says about a clip."""

    codec: str
    width: int
    height: int
    fps: float
    frames: int  # from the index; 0 when unknown
    creation_utc: float | None  # MP4 creation_time (GPS-based UTC), POSIX seconds


@dataclass
class Sample:
    """One camera's frame for one tick."""

    k: int  # tick index inside the clip
    tick_s: float  # the tick's time inside the clip
    pts_s: float  # presentation time of the chosen frame inside the clip
    image: Any  # av.VideoFrame (pyav) or an H×W×3 RGB array (decord)
    telemetry: Telemetry | None = None


@dataclass
class ClipStats:
    """What sampling one clip found; ``sample_clip`` fills it in as it runs."""

    decoded: int = 0  # frames decoded (pyav) or indexed (decord)
    expected: int = 0  # frames the container's index promises; 0 when unknown
    missed: list[float] = field(default_factory=list)  # tick times (s) inside the clip with no frame near
    fallback: str | None = None  # why decord was not used for (part of) the clip
    no_fix: int = 0  # sampled frames whose telemetry has no GPS fix (the caller counts)


@dataclass
class _Candidate:
    pts_s: float
    pts: int
    frame: Any


def pick_nearest(
    frames: Iterable[_Candidate],
    step_s: float,
    tolerance_s: float | None,
    limit_s: float,
    *,
    nominal_s: float = 0.0,
    missed: list[float] | None = None,
) -> Iterator[tuple[int, float, _Candidate]]:
    """For each tick ``k·step_s < limit_s``, the frame nearest in time, if near enough.

    Frames arrive in presentation order; one frame of look-ahead decides each tick.

    Parameters:
        frames: candidates in presentation order.
        step_s: seconds between ticks.
        tolerance_s: a fixed largest distance from tick to frame; ``None``: half the local
            frame spacing, i.e. the interval between the frames either side of the tick
            unless it exceeds ``HOLE`` × the median of the recent intervals (a hole, where
            the median stands in), and ``nominal_s`` where no interval is known yet.
        limit_s: no tick at or after this time.
        nominal_s: half the nominal frame interval, for ticks outside any known interval.
        missed: if given, the time of every tick up to the last frame that got no frame.

    Yields:
        ``(k, tick time, candidate)`` in tick order.
    """
    k, previous = 0, None
    gaps: deque[float] = deque(maxlen=SPACING_WINDOW)
    for item in frames:
        if previous is not None:
            gaps.append(item.pts_s - previous.pts_s)
        while k * step_s < limit_s and item.pts_s >= k * step_s:
            tick = k * step_s
            best = item if previous is None or item.pts_s - tick <= tick - previous.pts_s else previous
            spacing = None if previous is None else item.pts_s - previous.pts_s
            if abs(best.pts_s - tick) <= _tolerance(tolerance_s, spacing, gaps, nominal_s):
                yield k, tick, best
            elif missed is not None:
                missed.append(tick)
            k += 1
        previous = item
        if k * step_s >= limit_s:
            return
    tail = _tolerance(tolerance_s, None, gaps, nominal_s)
    while previous is not None and k * step_s < limit_s and k * step_s - previous.pts_s <= tail:
        yield k, k * step_s, previous
        k += 1


def _tolerance(fixed: float | None, spacing: float | None, gaps: deque[float], nominal_s: float) -> float:
    if fixed is not None:
        return fixed
    median = statistics.median(gaps) if gaps else None
    if spacing is not None and (median is None or spacing <= HOLE * median):
        return spacing / 2 + 1e-6
    return median / 2 + 1e-6 if median is not None else nominal_s


def half_interval(fps: float) -> float:
    """Half a frame interval (a hair more, for rounding of timestamps)."""
    return 0.5 / fps + 1e-6


def check_readable(path: Path) -> None:
    """Fail early, naming the file, on what the decoder would report vaguely.

    Raises:
        FootageError: missing, unreadable or empty.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise FootageError(path, "file not found") from exc
    except PermissionError as exc:
        raise FootageError(path, "cannot read the file: permission denied") from exc
    except OSError as exc:
        raise FootageError(path, f"cannot read the file: {exc.strerror}") from exc
    try:
        if os.fstat(fd).st_size == 0:
            raise FootageError(path, "empty file (0 bytes): the clip was never written")
    finally:
        os.close(fd)


def open_container(path: Path) -> av.container.InputContainer:
    """Open a clip with PyAV.

    Raises:
        FootageError: not readable, not a video, or no video stream.
    """
    check_readable(path)
    try:
        container = av.open(str(path))
    except av.FFmpegError as exc:
        if _cut_before_index(path):
            problem = ("cut before its index was written (an MP4 with frame data but no 'moov' box: "
                       "power lost while recording); no frame can be decoded from it")
            raise FootageError(path, problem) from exc
        raise FootageError(path, f"not a readable video ({_reason(exc)})") from exc
    if not container.streams.video:
        container.close()
        raise FootageError(path, "no video stream in the file")
    return container


def _cut_before_index(path: Path) -> bool:
    """An MP4 whose top-level boxes start ``ftyp`` … ``mdat`` and end before any ``moov``."""
    kinds, at = [], 0
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        while at + 8 <= size:
            file.seek(at)
            header = file.read(16)
            length, kind = int.from_bytes(header[:4], "big"), header[4:8]
            if length == 1 and len(header) == 16:
                length = int.from_bytes(header[8:16], "big")  # 64-bit size (large mdat)
            kinds.append(kind)
            if length < 8:
                break
            at += length
    return bool(kinds) and kinds[0] == b"ftyp" and b"mdat" in kinds and b"moov" not in kinds


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return text.split(": '")[0]


def clip_info(container: av.container.InputContainer) -> ClipInfo:
    """Codec, size, rate, frame count and UTC start of an open clip."""
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or 30
    return ClipInfo(
        codec=stream.codec_context.name,
        width=stream.codec_context.width,
        height=stream.codec_context.height,
        fps=float(rate),
        frames=stream.frames or 0,
        creation_utc=_creation_utc(container.metadata.get("creation_time")),
    )


def display_rotation(container: av.container.InputContainer) -> int:
    """The display rotation (degrees counter-clockwise) of an open clip's first frame; 0 if none decodes."""
    try:
        frame = next(container.decode(video=0), None)
    except av.FFmpegError:
        return 0
    return round(getattr(frame, "rotation", 0) or 0) if frame is not None else 0


def _creation_utc(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class _SeiReader:
    """Telemetry of each packet, keyed by pts; knows the stream's NAL framing.

    Demuxing keeps only the SEI NAL units in front of each picture; they are parsed
    (emulation prevention removed, protobuf read) only for the frames that get sampled.
    """

    def __init__(self, stream: av.video.stream.VideoStream) -> None:
        extradata = bytes(stream.codec_context.extradata or b"")
        self.hevc = stream.codec_context.name == "hevc"
        self.annexb = extradata[:3] == b"\x00\x00\x01" or extradata[:4] == b"\x00\x00\x00\x01"
        if self.hevc and len(extradata) > 21 and not self.annexb:
            self.length_size = (extradata[21] & 3) + 1
        elif len(extradata) > 4 and extradata[0] == 1:
            self.length_size = (extradata[4] & 3) + 1
        else:
            self.length_size = 4
        self.sei_kind = sei.HEVC_SEI_PREFIX if self.hevc else sei.H264_SEI
        self.nals_by_pts: dict[int, list[bytes]] = {}

    def read(self, packet: av.Packet) -> None:
        """Keep the SEI NAL units of one packet, if it carries any."""
        if packet.pts is None or packet.size == 0:
            return
        nals = self._sei_nals(memoryview(packet))
        if nals:
            self.nals_by_pts[packet.pts] = nals

    def _sei_nals(self, data: memoryview) -> list[bytes]:
        nals = sei.iter_annexb_nals(bytes(data)) if self.annexb else sei.iter_avcc_nals(data, self.length_size)
        found = []
        for nal in nals:
            kind = (nal[0] >> 1) & 0x3F if self.hevc else nal[0] & 0x1F
            if (self.hevc and kind < 32) or (not self.hevc and 1 <= kind <= 5):
                break  # the picture itself: its SEI would have come before it
            if kind == self.sei_kind:
                found.append(bytes(nal))
        return found

    def payload(self, pts: int) -> bytes | None:
        """The telemetry protobuf bytes of the picture with this pts, if it has any."""
        for nal in self.nals_by_pts.get(pts, ()):
            payload = sei.telemetry_payload(nal, self.hevc)
            if payload is not None:
                return payload
        return None

    def telemetry(self, pts: int) -> Telemetry | None:
        """The telemetry of the picture with this pts, parsed only now (sampled frames only)."""
        payload = self.payload(pts)
        meta = sei.parse_metadata(payload) if payload is not None else None
        return sei.to_telemetry(meta) if meta is not None else None


def sample_clip(
    path: str | Path,
    *,
    sample_fps: float = 5.0,
    tolerance_s: float | None = None,
    limit_s: float = float("inf"),
    threads: int = 0,
    decoder: str = "pyav",
    size: tuple[int, int] | None = None,
    stats: ClipStats | None = None,
) -> Iterator[Sample]:
    """Decode a clip once and yield one ``Sample`` per tick that has a frame near it.

    Parameters:
        path: the clip.
        sample_fps: ticks per second.
        tolerance_s: largest distance between a tick and the frame taken for it; by
            default half the local frame spacing (see ``pick_nearest``), so a camera
            whose stream has a hole at a tick, or has ended, skips the tick.
        limit_s: no tick at or after this time in the clip (where the next minute starts).
        threads: decoder threads; 0 lets the decoder choose.
        decoder: ``pyav`` or ``decord``.
        size: decord only: decode straight to this (width, height), as displayed.
        stats: filled in while sampling: frames decoded and promised, ticks without a
            frame, and why decord was replaced by PyAV.

    Yields:
        Samples in tick order. PyAV samples are ``av.VideoFrame`` s in coded orientation
        with their display ``rotation``; decord samples are upright RGB arrays.

    Raises:
        FootageError: the file cannot be used (also: it holds no frame, or it was cut and
            lost frames); the message names it and says why.
    """
    path = Path(path)
    stats = stats if stats is not None else ClipStats()
    if decoder == "decord":
        yield from _sample_decord(path, sample_fps, tolerance_s, limit_s, threads, size, stats)
        return
    if decoder != "pyav":
        raise FootageError(path, f"unknown decoder {decoder!r} (pyav or decord)")
    with open_container(path) as container:
        yield from _sample_pyav(path, container, sample_fps, tolerance_s, limit_s, threads, stats)


def _sample_pyav(path, container, sample_fps, tolerance_s, limit_s, threads, stats: ClipStats,
                 from_k: int = 0) -> Iterator[Sample]:  # fmt: skip
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = threads
    reader = _SeiReader(stream)
    nominal = half_interval(clip_info(container).fps)
    state = {"decoded": 0, "exhausted": False}
    stats.expected = stream.frames or 0
    frames = _pyav_frames(path, container, stream, reader, state)
    missed: list[float] = []
    for k, tick, item in pick_nearest(frames, 1.0 / sample_fps, tolerance_s, limit_s, nominal_s=nominal, missed=missed):
        stats.decoded = state["decoded"]
        if k >= from_k:
            yield Sample(k, tick, item.pts_s, item.frame, reader.telemetry(item.pts))
    stats.decoded = state["decoded"]
    stats.missed = [t for t in missed if t >= from_k / sample_fps]
    _check_complete(path, state["decoded"], stats.expected, state["exhausted"])


def _check_complete(path: Path, decoded: int, expected: int, exhausted: bool) -> None:
    if exhausted and decoded == 0:
        size = path.stat().st_size
        raise FootageError(path, f"holds no frames ({size} bytes: a header and no video; the clip was never written)")
    if exhausted and expected and decoded + TRUNCATION_SLACK < expected:
        lost = expected - decoded
        raise FootageError(path, f"truncated clip: decoded {decoded} of {expected} frames ({lost} lost)")


def _pyav_frames(path, container, stream, reader: _SeiReader, state: dict) -> Iterator[_Candidate]:
    base = stream.start_time or 0
    tb = float(stream.time_base)
    try:
        for packet in container.demux(stream):
            reader.read(packet)
            for frame in packet.decode():
                if frame.pts is None:
                    continue
                state["decoded"] += 1
                yield _Candidate(round((frame.pts - base) * tb, 6), frame.pts, frame)
        state["exhausted"] = True
    except av.FFmpegError as exc:
        if state["decoded"] == 0:
            raise FootageError(path, f"cannot decode ({_reason(exc)})") from exc
        raise FootageError(path, f"decoding stopped after {state['decoded']} frames ({_reason(exc)})") from exc


def read_telemetry(path: str | Path) -> dict[float, Telemetry]:
    """Every frame's telemetry by pts in seconds, from a demux-only pass (no decoding);
    of a clip cut mid-way, the frames before the cut.

    Raises:
        FootageError: the file cannot be opened as a video, or not demuxed at all.
    """
    path = Path(path)
    with open_container(path) as container:
        stream = container.streams.video[0]
        reader = _SeiReader(stream)
        try:
            for packet in container.demux(stream):
                reader.read(packet)
        except av.FFmpegError as exc:
            if not reader.nals_by_pts:
                raise FootageError(path, f"cannot demux ({_reason(exc)})") from exc
            # A cut clip: the telemetry of the packets before the cut is kept; the
            # decoder reports the loss.
        base, tb = stream.start_time or 0, float(stream.time_base)
        carrying = (pts for pts in sorted(reader.nals_by_pts) if reader.payload(pts) is not None)
        return {round((pts - base) * tb, 6): reader.telemetry(pts) for pts in carrying}


def _sample_decord(path, sample_fps, tolerance_s, limit_s, threads, size, stats: ClipStats) -> Iterator[Sample]:
    import decord  # optional backend

    telemetry = read_telemetry(path)  # also rejects what PyAV cannot open, naming the file
    width, height = size or (-1, -1)
    next_k = 0
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=threads, width=width, height=height)
        starts = reader.get_frame_timestamp(np.arange(len(reader)))[:, 0]
        stats.decoded = stats.expected = len(reader)
        nominal = half_interval(reader.get_avg_fps())
        candidates = (_Candidate(round(float(t), 6), i, None) for i, t in enumerate(starts))
        missed: list[float] = []
        picks = list(pick_nearest(candidates, 1.0 / sample_fps, tolerance_s, limit_s, nominal_s=nominal, missed=missed))
        stats.missed = missed
        by_time = {round(t, 3): v for t, v in telemetry.items()}
        for start in range(0, len(picks), 16):
            chunk = picks[start : start + 16]
            images = reader.get_batch([item.pts for _, _, item in chunk]).asnumpy()
            for (k, tick, item), image in zip(chunk, images, strict=True):
                yield Sample(k, tick, item.pts_s, image, by_time.get(round(item.pts_s, 3)))
                next_k = k + 1
    except (decord.DECORDError, RuntimeError) as exc:
        # decord refuses a clip it cannot read to the end (a truncated one) and keeps
        # nothing; PyAV decodes what is there, and says how much was lost.
        stats.fallback = f"decord could not read it ({_decord_reason(exc)}); read with PyAV from tick {next_k}"
        with open_container(path) as container:
            yield from _sample_pyav(path, container, sample_fps, tolerance_s, limit_s, threads, stats, from_k=next_k)


def _decord_reason(exc: BaseException) -> str:
    # decord's messages carry a timestamp and its source path before the reason.
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split("Error: ")[-1].split("Check failed: ")[-1][:120]


def sample_keyframes(
    path: str | Path, *, sample_fps: float = 5.0, limit_s: float = float("inf"), threads: int = 0,
    stats: ClipStats | None = None,
) -> Iterator[Sample]:
    """Decode only the clip's keyframes (FFmpeg skips the rest) and put each on its nearest tick.

    A fast first pass: TeslaCam clips carry about one keyframe a second, so a camera gets
    about one frame a second instead of ``sample_fps``, for a fraction of the decoding.
    Each keyframe lands on tick ``round(pts · sample_fps)`` of the drive's grid (cameras
    stay comparable by tick); a tick is used once (the first keyframe that rounds to it).

    Parameters:
        path: the clip.
        sample_fps: the tick grid's rate (ticks per second).
        limit_s: no keyframe at or after this time in the clip.
        threads: decoder threads; 0 lets the decoder choose.
        stats: gets the keyframes decoded (ticks without a keyframe are the mode's, not
            missed ones).

    Yields:
        Samples in time order; ``pts_s`` is the keyframe's own presentation time.

    Raises:
        FootageError: the file cannot be used (possibly after some samples were yielded;
            also: it holds no frame).
    """
    path = Path(path)
    with open_container(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        stream.codec_context.skip_frame = "NONKEY"
        reader = _SeiReader(stream)
        state = {"decoded": 0, "exhausted": False}
        stats = stats if stats is not None else ClipStats()
        last_k = -1
        for item in _pyav_frames(path, container, stream, reader, state):
            stats.decoded = state["decoded"]
            if item.pts_s >= limit_s:
                return
            k = round(item.pts_s * sample_fps)
            if k <= last_k:
                continue
            last_k = k
            yield Sample(k, k / sample_fps, item.pts_s, item.frame, reader.telemetry(item.pts))
        stats.decoded = state["decoded"]
        # Only keyframes are decoded, so the index's frame count says nothing of a cut;
        # a clip with no frame at all is still said to be one.
        _check_complete(path, state["decoded"], 0, state["exhausted"])


# -- the decode plan of a drive (what the ingest worker decodes, where each minute starts) --


def minute_offsets(job: Job) -> list[float]:
    """Seconds from the drive's first clip to each clip: from their UTC starts (MP4
    ``creation_time``, set by discovery) when every minute has one, else from the names
    (the car's local clock, which a clock change would break)."""
    if all(clip.utc is not None for clip in job.clips):
        return [clip.utc - job.clips[0].utc for clip in job.clips]
    starts = [datetime.strptime(clip.start, STAMP_FORMAT) for clip in job.clips]
    return [(s - starts[0]).total_seconds() for s in starts]


def clip_notes(path: str, stats: ClipStats) -> list[str]:
    """What a clip's sampling lost or worked around, in words, naming the file."""
    notes = []
    if stats.fallback:
        notes.append(f"{path}: {stats.fallback}")
    if stats.no_fix:
        notes.append(f"{path}: telemetry of {stats.no_fix} sampled frame(s) has no GPS fix (latitude/longitude "
                     "unset or impossible): no position taken from them")  # fmt: skip
    if stats.missed:
        at = ", ".join(f"{t:.1f}" for t in stats.missed[:5]) + (" …" if len(stats.missed) > 5 else "")
        notes.append(f"{path}: {len(stats.missed)} tick(s) had no frame within half the local frame spacing "
                     f"(at {at} s into the clip): a hole in the stream")  # fmt: skip
    return notes


def probe_creation_utc(path: str) -> float | None:
    """A clip's MP4 ``creation_time`` (GPS-based UTC) as a Unix time, from its header only;
    ``None`` when the clip cannot be opened or has none."""
    try:
        with open_container(Path(path)) as container:
            return clip_info(container).creation_utc
    except FootageError:
        return None


def decoded_size(path: str, long_side: int) -> tuple[int, int]:
    """The (width, height) to ask decord for, so frames come out ``long_side`` on their
    long side as shown (decord applies the display rotation itself)."""
    with open_container(Path(path)) as container:
        info = clip_info(container)
        sideways = display_rotation(container) % 180 != 0
    width, height = target_size(info.width, info.height, long_side)
    return (height, width) if sideways else (width, height)

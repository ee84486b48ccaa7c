"""Decode one camera's clip and sample it on the drive's tick grid, by presentation time.

Ticks are ``k / sample_fps`` seconds into the clip; for each tick the frame with the
nearest presentation timestamp is taken when it lies within ``tolerance_s``, so every
camera of a tick shows (nearly) the same instant, whatever each camera's frame rate. The
streams are variable frame rate: timestamps decide, never frame counts.

The clip is decoded once; only sampled frames are ever converted (the caller resizes and
encodes them, ``stages.frames``). Telemetry SEI is read from the same demuxed packets
and keyed by the packet's pts, so it lands on the right frame with B-frames too.

PyAV is the default backend; decord is an option (it reads SEI through a PyAV
demux-only pass). Any unusable file raises ``FootageError`` naming it — possibly after
some samples were already yielded (a truncated clip keeps what it had).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import av
import numpy as np

from stages import sei
from stream.errors import FootageError
from stream.schemas import Telemetry

#: Fewer decoded frames than the index promises, beyond this, means the file was cut.
TRUNCATION_SLACK = 2


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
class _Candidate:
    pts_s: float
    pts: int
    frame: Any


def pick_nearest(
    frames: Iterable[_Candidate], step_s: float, tolerance_s: float, limit_s: float
) -> Iterator[tuple[int, float, _Candidate]]:
    """For each tick ``k·step_s < limit_s``, the frame nearest in time, if within tolerance.

    Frames arrive in presentation order; one frame of look-ahead decides each tick.
    """
    k, previous = 0, None
    for item in frames:
        while k * step_s < limit_s and item.pts_s >= k * step_s:
            tick = k * step_s
            best = item if previous is None or item.pts_s - tick <= tick - previous.pts_s else previous
            if abs(best.pts_s - tick) <= tolerance_s:
                yield k, tick, best
            k += 1
        previous = item
        if k * step_s >= limit_s:
            return
    while previous is not None and k * step_s < limit_s and k * step_s - previous.pts_s <= tolerance_s:
        yield k, k * step_s, previous
        k += 1


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
        raise FootageError(path, f"not a readable video ({_reason(exc)})") from exc
    if not container.streams.video:
        container.close()
        raise FootageError(path, "no video stream in the file")
    return container


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
) -> Iterator[Sample]:
    """Decode a clip once and yield one ``Sample`` per tick that has a frame near it.

    Parameters:
        path: the clip.
        sample_fps: ticks per second.
        tolerance_s: largest distance between a tick and the frame taken for it; by
            default half the clip's nominal frame interval, so a camera that has no
            frame that close to a tick (a gap, past its end) skips the tick.
        limit_s: no tick at or after this time in the clip (where the next minute starts).
        threads: decoder threads; 0 lets the decoder choose.
        decoder: ``pyav`` or ``decord``.
        size: decord only: decode straight to this (width, height).

    Yields:
        Samples in tick order.

    Raises:
        FootageError: the file cannot be used; the message names it and says why.
    """
    path = Path(path)
    if decoder == "decord":
        yield from _sample_decord(path, sample_fps, tolerance_s, limit_s, threads, size)
        return
    if decoder != "pyav":
        raise FootageError(path, f"unknown decoder {decoder!r} (pyav or decord)")
    with open_container(path) as container:
        yield from _sample_pyav(path, container, sample_fps, tolerance_s, limit_s, threads)


def _sample_pyav(path, container, sample_fps, tolerance_s, limit_s, threads) -> Iterator[Sample]:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = threads
    reader = _SeiReader(stream)
    tolerance_s = tolerance_s if tolerance_s is not None else half_interval(clip_info(container).fps)
    state = {"decoded": 0, "exhausted": False}
    frames = _pyav_frames(path, container, stream, reader, state)
    for k, tick, item in pick_nearest(frames, 1.0 / sample_fps, tolerance_s, limit_s):
        yield Sample(k, tick, item.pts_s, item.frame, reader.telemetry(item.pts))
    expected = stream.frames or 0
    if state["exhausted"] and expected and state["decoded"] + TRUNCATION_SLACK < expected:
        raise FootageError(path, f"truncated clip: decoded {state['decoded']} of {expected} frames")


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
    """Every frame's telemetry by pts in seconds, from a demux-only pass (no decoding).

    Raises:
        FootageError: the file cannot be opened as a video.
    """
    path = Path(path)
    with open_container(path) as container:
        stream = container.streams.video[0]
        reader = _SeiReader(stream)
        try:
            for packet in container.demux(stream):
                reader.read(packet)
        except av.FFmpegError as exc:
            raise FootageError(path, f"cannot demux ({_reason(exc)})") from exc
        base, tb = stream.start_time or 0, float(stream.time_base)
        carrying = (pts for pts in sorted(reader.nals_by_pts) if reader.payload(pts) is not None)
        return {round((pts - base) * tb, 6): reader.telemetry(pts) for pts in carrying}


def _sample_decord(path, sample_fps, tolerance_s, limit_s, threads, size) -> Iterator[Sample]:
    import decord  # optional backend

    telemetry = read_telemetry(path)  # also rejects what PyAV cannot open, naming the file
    width, height = size or (-1, -1)
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=threads, width=width, height=height)
        starts = reader.get_frame_timestamp(np.arange(len(reader)))[:, 0]
    except decord.DECORDError as exc:
        raise FootageError(path, f"decord cannot decode ({exc})") from exc
    if tolerance_s is None:
        tolerance_s = half_interval(reader.get_avg_fps())
    candidates = (_Candidate(round(float(t), 6), i, None) for i, t in enumerate(starts))
    picks = list(pick_nearest(candidates, 1.0 / sample_fps, tolerance_s, limit_s))
    by_time = {round(t, 3): v for t, v in telemetry.items()}
    for start in range(0, len(picks), 16):
        chunk = picks[start : start + 16]
        images = reader.get_batch([item.pts for _, _, item in chunk]).asnumpy()
        for (k, tick, item), image in zip(chunk, images, strict=True):
            yield Sample(k, tick, item.pts_s, image, by_time.get(round(item.pts_s, 3)))


def sample_keyframes(
    path: str | Path, *, sample_fps: float = 5.0, limit_s: float = float("inf"), threads: int = 0
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

    Yields:
        Samples in time order; ``pts_s`` is the keyframe's own presentation time.

    Raises:
        FootageError: the file cannot be used (possibly after some samples were yielded).
    """
    path = Path(path)
    with open_container(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        stream.codec_context.skip_frame = "NONKEY"
        reader = _SeiReader(stream)
        state = {"decoded": 0, "exhausted": False}
        last_k = -1
        for item in _pyav_frames(path, container, stream, reader, state):
            if item.pts_s >= limit_s:
                return
            k = round(item.pts_s * sample_fps)
            if k <= last_k:
                continue
            last_k = k
            yield Sample(k, k / sample_fps, item.pts_s, item.frame, reader.telemetry(item.pts))

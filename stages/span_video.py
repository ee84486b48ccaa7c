"""``run --save-video``: an annotated MP4 of each roadwork span, cut from the footage itself.

A span's video is one camera's footage (the camera that supported most of the span's
windows) from the span's first to its last UTC second, sampled at ``fps``, with the verdict
of the window each frame falls in written on it (roadwork, confidence, window, objects)
and, on the frames fuse kept as that window's key frame, its boxes. Other
frames carry no boxes: the detector's per-frame boxes are not kept after a run (only the
key frames' are), so none are made up. Clips without a UTC start (``creation_time``)
cannot be placed on the span's clock and are left out, said in the returned notes.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import av
import cv2
import numpy as np

from stages.report_page import draw_detections
from stream.schemas import DriveSummary, RoadworkSpan, Verdict

#: Frames a second written; the longest side of the written frames.
VIDEO_FPS = 5.0
VIDEO_LONG_SIDE = 640


@dataclass
class SpanVideos:
    """What ``write_span_videos`` wrote, and what it could not."""

    paths: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def write_span_videos(folder: Path, drives: Mapping[str, object], verdicts: Sequence[Verdict],
                      summaries: Sequence[DriveSummary], fps: float = VIDEO_FPS) -> SpanVideos:  # fmt: skip
    """Write ``<drive name>_span<i>_<camera>.mp4`` for every roadwork span with a UTC time.

    Parameters:
        folder: where the videos go (created when one is written).
        drives: drive id -> ``stages.discover.FoundDrive`` (its clips).
        verdicts: the run's verdicts (their windows annotate the frames).
        summaries: the drive summaries (their spans are cut).
        fps: frames a second written.

    Returns:
        The files written and the spans that could not be.
    """
    done = SpanVideos()
    for summary in summaries:
        drive = drives.get(summary.drive_id)
        mine = sorted((v for v in verdicts if v.drive_id == summary.drive_id), key=lambda v: v.window)
        for index, span in enumerate(summary.spans):
            name = f"{_stem(summary.drive_name or summary.drive_id)}_span{index}"
            if drive is None or span.start_utc is None or span.end_utc is None:
                done.notes.append(f"{name}: no UTC time for the span; no video")
                continue
            windows = [v for v in mine if v.roadwork and v.start_utc is not None
                       and span.start_utc <= v.start_utc < span.end_utc]  # fmt: skip
            camera = _camera(windows)
            path = folder / f"{name}_{camera}.mp4"
            written = _cut(path, drive, camera, span, windows, fps)
            if written:
                done.paths.append(path)
            else:
                done.notes.append(f"{name}: no frame of {camera} with a UTC time in the span; no video")
    return done


def _stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)


def _camera(windows: Sequence[Verdict]) -> str:
    counts = Counter(c for v in windows for c in v.cameras)
    return counts.most_common(1)[0][0] if counts else "front"


def _frames(drive: object, camera: str, start: float, end: float, fps: float):  # noqa: ANN202
    """(utc, RGB array) of ``camera`` from ``start`` to ``end`` UTC, one every 1/fps s."""
    next_utc = start
    for minute in drive.minutes:
        path = minute.files.get(camera)
        if path is None or minute.utc is None:
            continue
        with av.open(path) as container:
            for frame in container.decode(video=0):
                utc = minute.utc + float(frame.time or 0.0)
                if utc >= end:
                    return
                if utc + 1e-6 >= next_utc:
                    next_utc = utc + 1.0 / fps
                    yield utc, frame.to_ndarray(format="rgb24")


def _cut(path: Path, drive: object, camera: str, span: RoadworkSpan, windows: Sequence[Verdict], fps: float) -> int:
    count = 0
    output = stream = None
    try:
        for utc, rgb in _frames(drive, camera, span.start_utc, span.end_utc, fps):
            image = _annotate(_resize(rgb), utc, camera, windows, fps)
            if output is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                output = av.open(str(path), "w")
                stream = output.add_stream("h264", rate=round(fps))
                stream.height, stream.width = image.shape[:2]
                stream.pix_fmt = "yuv420p"
            output.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            count += 1
        if output is not None:
            output.mux(stream.encode(None))
    finally:
        if output is not None:
            output.close()
    return count


def _resize(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = min(1.0, VIDEO_LONG_SIDE / max(h, w))
    size = (max(2, round(w * scale) // 2 * 2), max(2, round(h * scale) // 2 * 2))  # even, for yuv420p
    return np.ascontiguousarray(cv2.resize(rgb, size, interpolation=cv2.INTER_AREA))


def _annotate(image: np.ndarray, utc: float, camera: str, windows: Sequence[Verdict], fps: float) -> np.ndarray:
    window = next((v for v in windows if v.start_utc <= utc < (v.end_utc or v.start_utc + v.t_end - v.t_start)), None)
    w = image.shape[1]
    if window is not None:
        key = next((f for f in window.frames if f.camera == camera), None)
        offset = window.start_utc - window.t_start
        if key is not None and abs(offset + key.t - utc) < 0.5 / fps:
            draw_detections(image, key, (255, 140, 0), scale=0.4, top=28)  # RGB frames; below the banner
        objects = ", ".join(f"{k} x{n}" for k, n in window.objects.items()) or "no objects"
        text = f"ROADWORK {window.confidence:.2f}  window {window.window}  {objects}"
    else:
        text = "between roadwork windows"
    cv2.rectangle(image, (0, 0), (w, 18), (0, 0, 0), -1)
    cv2.putText(image, f"{camera}  {text}", (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 140, 0), 1, cv2.LINE_AA)
    return image

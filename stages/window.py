"""PureKV-style temporal windows over one camera of one drive (pure: no IO).

PureKV drops temporally redundant and spatially noisy visual tokens; here the same idea is
applied before any vision-language model sees a frame. Per (drive, camera), sliding windows
of ``length_s`` every ``stride_s`` seconds (window ``i`` covers ``[i·stride, i·stride +
length)``) keep:

* **temporal sparsity** — a frame only if the cosine similarity of its descriptor to the
  window's last kept frame is below ``similarity_threshold`` (the first frame of a window
  is always kept), so a static scene collapses to one key frame;
* **spatial sparsity** — in each kept frame, the ``per_frame_budget`` detections with the
  highest ``score · sqrt(box area)`` (a confident large object beats a speck).

A window closes when a frame at or after its end arrives, or when the drive ends; it
then becomes a ``stream.schemas.Segment``.

Determinism after a takeover (the rule that makes acking safe):

* Window ``i`` is *opened* only by a frame in its first stride, ``[i·stride,
  (i+1)·stride)``; windows with no frame there are never emitted (a gap in the footage).
* A frame is *held* by the newest window that contains it, ``k = floor(t / stride)``,
  and is *no longer needed* once window ``k`` has closed (older windows that contain it
  close first). A frame in no window (``stride > length`` gaps) is released at once.

Windows close in index order, so the released frames of a camera are always a prefix of
its frames, and the unreleased ones are exactly the frames of the open windows. A worker
that takes over and replays the unreleased frames in order therefore rebuilds the open
windows exactly: every window older than the first replayed frame's ``k`` was opened by
a frame that is already released, hence was closed and published before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stages.step import Step
from stream.schemas import Detection, KeyFrame, Segment, Telemetry
from stream.settings import DetectSettings

#: Slack for float times that should land exactly on a window boundary (t = 5.0 / 5 s).
EPSILON = 1e-9


@dataclass(frozen=True)
class WindowConfig:
    """The window settings.

    Attributes:
        length_s: window length.
        stride_s: time between window starts; ``stride < length`` overlaps windows.
        similarity_threshold: keep a frame when cosine similarity to the last kept is below this.
        per_frame_budget: detections kept per key frame.
        model: detector name, copied into segments.
    """

    length_s: float = 10.0
    stride_s: float = 5.0
    similarity_threshold: float = 0.9
    per_frame_budget: int = 5
    model: str = ""

    @classmethod
    def from_settings(cls, settings: DetectSettings, model: str = "") -> WindowConfig:
        """Build from the detect section of the settings."""
        return cls(
            settings.window_s, settings.stride_s, settings.similarity_threshold, settings.per_frame_budget, model
        )


@dataclass(frozen=True)
class WindowFrame:
    """One detected frame, as the window needs it."""

    seq: int
    tick: int
    t: float
    blob_key: str
    descriptor: np.ndarray
    detections: list[Detection] = field(default_factory=list)
    utc: float | None = None
    telemetry: Telemetry | None = None
    roadwork_prob: float | None = None


@dataclass
class WindowStats:
    """Reduction figures of one camera (or summed over many)."""

    frames: int = 0  # frames added
    slots: int = 0  # frame memberships over closed windows (a frame counts in each window)
    kept: int = 0  # key frames over closed windows
    detections: int = 0  # detections of key frames before the budget
    detections_kept: int = 0
    segments: int = 0

    @property
    def reduction(self) -> float:
        """Frames in closed windows per key frame kept (higher is a stronger cut)."""
        return self.slots / self.kept if self.kept else 0.0

    def add(self, other: WindowStats) -> None:
        """Sum another camera's figures into this one."""
        for name in ("frames", "slots", "kept", "detections", "detections_kept", "segments"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def importance(detection: Detection) -> float:
    """Score weighted by box size: ``score · sqrt(area)`` with the box normalised."""
    x1, y1, x2, y2 = detection.box
    return detection.score * math.sqrt(max(x2 - x1, 0.0) * max(y2 - y1, 0.0))


def top_detections(detections: list[Detection], budget: int) -> list[Detection]:
    """The ``budget`` most important detections, most important first (ties keep order)."""
    return sorted(detections, key=importance, reverse=True)[: max(budget, 0)]


def unit(vector: np.ndarray) -> np.ndarray:
    """The vector scaled to length 1 (a zero vector stays zero)."""
    norm = math.sqrt(float(np.dot(vector, vector)))
    return vector / norm if norm else vector


@dataclass
class _Window:
    index: int
    start: float
    end: float
    frames_total: int = 0
    key_frames: list[KeyFrame] = field(default_factory=list)
    descriptors: list[np.ndarray] = field(default_factory=list)
    last_kept: np.ndarray | None = None  # unit length
    counts: dict[str, int] = field(default_factory=dict)
    held: list[Any] = field(default_factory=list)  # tokens of frames this window releases
    held_seqs: list[int] = field(default_factory=list)


class CameraWindows:
    """The sliding windows of one camera of one drive.

    Parameters:
        drive_id: the drive.
        camera: the camera.
        config: window settings.
    """

    def __init__(self, drive_id: str, camera: str, config: WindowConfig) -> None:
        self.drive_id = drive_id
        self.camera = camera
        self.config = config
        self.stats = WindowStats()
        self.last_index = -1  # highest window index emitted or open
        self._open: list[_Window] = []
        self._last_seq: int | None = None
        self._held: set[int] = set()

    @property
    def open_windows(self) -> list[int]:
        """Indices of the windows still open."""
        return [w.index for w in self._open]

    def add(self, frame: WindowFrame, token: Any = None) -> Step[Segment]:
        """Add the camera's next frame.

        Parameters:
            frame: the frame, its detections and descriptor; frames come in ``seq`` order.
            token: returned in ``Step.release`` once the frame is no longer needed.

        Returns:
            Windows this frame closed, and the frames now released.
        """
        if self._last_seq is not None and frame.seq <= self._last_seq:
            return self._repeat(frame, token)
        self._last_seq = frame.seq
        self.stats.frames += 1
        update = self._close_before(frame.t)
        stride, length = self.config.stride_s, self.config.length_s
        k = math.floor(frame.t / stride + EPSILON)
        if frame.t - k * stride >= length - EPSILON:  # in the gap between windows
            update.release.append(token)
            return update
        if not self._open or self._open[-1].index < k:
            self._open.append(_Window(k, k * stride, k * stride + length))
            self.last_index = k
        holding = [w for w in self._open if w.start - EPSILON <= frame.t < w.end - EPSILON]
        direction = unit(frame.descriptor) if holding else None  # once, for every window holding it
        for window in holding:
            self._feed(window, frame, direction)
        if not holding:  # time went back into closed windows: nothing will hold it
            update.release.append(token)
            return update
        holding[-1].held.append(token)
        holding[-1].held_seqs.append(frame.seq)
        self._held.add(frame.seq)
        return update

    def flush(self) -> Step[Segment]:
        """The drive ended: close every open window and release every frame."""
        update = Step()
        while self._open:
            update.extend(self._close(self._open.pop(0)))
        return update

    def _repeat(self, frame: WindowFrame, token: Any) -> Step[Segment]:
        # A redelivered frame: still held means its first delivery is acked with its
        # window; already released means it can be acked now.
        if frame.seq in self._held:
            return Step()
        return Step(release=[token])

    def _close_before(self, t: float) -> Step[Segment]:
        update = Step()
        while self._open and self._open[0].end - EPSILON <= t:
            update.extend(self._close(self._open.pop(0)))
        return update

    def _feed(self, window: _Window, frame: WindowFrame, direction: np.ndarray) -> None:
        window.frames_total += 1
        for type_, n in _type_counts(frame.detections).items():
            window.counts[type_] = max(window.counts.get(type_, 0), n)
        last = window.last_kept
        if last is not None and float(np.dot(direction, last)) >= self.config.similarity_threshold:
            return
        window.last_kept = direction
        window.descriptors.append(frame.descriptor)
        kept = top_detections(frame.detections, self.config.per_frame_budget)
        self.stats.detections += len(frame.detections)
        self.stats.detections_kept += len(kept)
        window.key_frames.append(_key_frame(frame, kept))

    def _close(self, window: _Window) -> Step[Segment]:
        self.stats.slots += window.frames_total
        self.stats.kept += len(window.key_frames)
        self.stats.segments += 1
        self._held.difference_update(window.held_seqs)
        return Step([self._segment(window)], list(window.held))

    def _segment(self, window: _Window) -> Segment:
        mean = np.mean(window.descriptors, axis=0) if window.descriptors else np.zeros(0, np.float32)
        mean = unit(mean).astype(np.float32)
        return Segment(
            drive_id=self.drive_id,
            camera=self.camera,
            index=window.index,
            t_start=window.start,
            t_end=window.end,
            key_frames=window.key_frames,
            frames_total=window.frames_total,
            frames_kept=len(window.key_frames),
            object_counts=dict(sorted(window.counts.items())),
            descriptor=mean.tolist(),
            model=self.config.model,
        )


def _type_counts(detections: list[Detection]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for d in detections:
        counts[d.type] = counts.get(d.type, 0) + 1
    return counts


def _key_frame(frame: WindowFrame, detections: list[Detection]) -> KeyFrame:
    return KeyFrame(
        seq=frame.seq,
        tick=frame.tick,
        t=frame.t,
        utc=frame.utc,
        blob_key=frame.blob_key,
        telemetry=frame.telemetry,
        detections=detections,
        roadwork_prob=frame.roadwork_prob,
    )

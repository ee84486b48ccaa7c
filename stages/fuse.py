"""Fuse: cameras and stages of one drive into one verdict per time window.

Pure and deterministic: ``Fuser`` takes messages (``FrameDetections``, ``DriveMarker``,
``AnomalyScore``, ``VlmAnswer``) with an opaque token each (the worker's delivery) and the
current time, and returns the messages to publish and the tokens now safe to acknowledge.
It does no IO; the worker publishes, checkpoints (``snapshot``/``restore``) and acks.

Windows. Window ``i`` of a drive covers ``[i·w, (i+1)·w)`` on the drive clock ``t``
(``w = FuseSettings.window_s``). It closes when

* every expected camera's watermark (its latest ``t``; cameras arrive in order) reached
  its end, or that camera's drive-ended marker arrived — and, when vera runs, every camera's
  anomaly scores cover it too; or
* the drive stalled: no entry of it arrived for ``watermark_timeout_s`` *and* for
  ``stall_lag_factor`` times the pipeline's own lag (the longest ingest-to-fuse delay seen
  of its frames). Then the cameras it still waits for are given up (a dead-lettered ingest
  job, a partition nobody serves) and the summary names them.

Windows close on the drive's own progress, never on the time a window has been open: a
camera that arrives late because the machine is loaded (ingest decodes a minute camera by
camera; detect may be behind on one partition) still lands in its windows, so the same
footage gives the same verdicts on a quiet and on a loaded machine.

Cross-view fusion. A cone in the overlap of two neighbouring cameras is seen twice. For
each tick (all cameras of a tick share one time) and object type, the fused count is the
sum over cameras less, for each overlapping pair ``(a, edge_a, b, edge_b)`` of
``FuseSettings.overlaps``, ``min(n_a, n_b)`` where ``n_x`` counts the objects whose box
centre lies in the overlapping edge strip (``edge_fraction`` of the width) of camera x. A
window's count of a type is its maximum over ticks (objects persist across frames).

Confidence. A logistic model over the window's features (``FEATURES``)::

    objects    log(1 + fused objects)      the most objects seen at one tick
    types      distinct object types
    prob_max   max frame-scorer probability − 0.5     (0 when no scorer ran)
    prob_mean  mean frame-scorer probability − 0.5    (0 when no scorer ran)
    anomaly    smoothed VERA score − 0.5, max over cameras (0 when vera is off)
    cameras    share of the window's cameras that support roadwork
    vlm        VLM P(roadwork) − 0.5                   (0 unless a VLM answered)

    confidence = sigmoid(bias + Σ coefficient_f · feature_f)

Centring the probabilities at 0.5 makes a missing stage neutral. Coefficients are
settings; ``stages.calibration.fit_coefficients`` fits them on labelled windows.
A window whose confidence (without ``vlm``) lies in ``[escalate_low, escalate_high]`` is
escalated once, and waits for the answer up to ``vlm_timeout_s``.

Acknowledgement. A detection's token is released when its window is published; a VLM
answer's with its window; an anomaly score's when every window it overlaps is published
(or the drive is done); a marker's with the drive summary.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from stages.step import Step
from stream.ids import output_key
from stream.schemas import (
    AnomalyScore,
    CameraFrame,
    Detection,
    DriveMarker,
    DriveSummary,
    Escalation,
    FrameDetections,
    Gps,
    Message,
    RoadworkSpan,
    Verdict,
    VlmAnswer,
)
from stream.settings import FuseSettings

FEATURES: tuple[str, ...] = ("objects", "types", "prob_max", "prob_mean", "anomaly", "cameras", "vlm")

#: ``smoother(scores, descriptors) -> smoothed scores``, over one camera's segments in order.
Smoother = Callable[[Sequence[float], Sequence[Sequence[float]]], list[float]]

Token = Hashable


def dedupe_key(message: Message) -> str:
    """The deterministic dedupe key of a fuse output: one per (drive, window) or drive."""
    if isinstance(message, Verdict):
        return output_key("fuse", "verdict", message.drive_id, message.window)
    if isinstance(message, Escalation):
        return output_key("fuse", "escalation", message.drive_id, message.window)
    if isinstance(message, DriveSummary):
        return output_key("fuse", "summary", message.drive_id)
    text = f"fuse emits no {type(message).__name__}"
    raise TypeError(text)


def sigmoid(x: float) -> float:
    """The logistic function, safe for large ``|x|``."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def confidence(features: dict[str, float], coefficients: dict[str, float]) -> float:
    """``sigmoid(bias + Σ coefficient·feature)``; features without a coefficient count 0."""
    logit = coefficients.get("bias", 0.0)
    logit += sum(coefficients.get(name, 0.0) * value for name, value in features.items())
    return sigmoid(logit)


# -- cross-view counting ---------------------------------------------------------------


@dataclass(frozen=True)
class Overlap:
    """Two cameras whose image edges see the same road."""

    cam_a: str
    edge_a: str
    cam_b: str
    edge_b: str


def parse_overlaps(rows: Sequence[Sequence[str]]) -> list[Overlap]:
    """Validate ``FuseSettings.overlaps``.

    Raises:
        ValueError: a row is not ``[cam, left|right, cam, left|right]``, or a camera edge
            appears in two rows (an object would be subtracted twice).
    """
    overlaps, seen = [], set()
    for row in rows:
        if len(row) != 4 or row[1] not in ("left", "right") or row[3] not in ("left", "right"):
            message = f"fuse overlap {list(row)!r}: expected [camera, left|right, camera, left|right]"
            raise ValueError(message)
        for edge in ((row[0], row[1]), (row[2], row[3])):
            if edge in seen:
                message = f"fuse overlap: edge {edge[1]} of {edge[0]} is listed twice"
                raise ValueError(message)
            seen.add(edge)
        overlaps.append(Overlap(*row))
    return overlaps


def _in_edge(det: Detection, edge: str, fraction: float) -> bool:
    centre = (det.box[0] + det.box[2]) / 2
    return centre <= fraction if edge == "left" else centre >= 1.0 - fraction


def fused_counts(
    by_camera: dict[str, Sequence[Detection]], overlaps: Sequence[Overlap], edge_fraction: float
) -> dict[str, int]:
    """Object counts by type of one tick, counting once what neighbouring cameras share.

    Parameters:
        by_camera: each camera's detections at this tick.
        overlaps: the camera layout.
        edge_fraction: width share of each overlapping edge strip.

    Returns:
        type -> fused count (types with a positive count only).
    """
    counts: dict[str, int] = {}
    for dets in by_camera.values():
        for det in dets:
            counts[det.type] = counts.get(det.type, 0) + 1
    for ov in overlaps:
        dets_a, dets_b = by_camera.get(ov.cam_a, ()), by_camera.get(ov.cam_b, ())
        for kind in counts:
            n_a = sum(1 for d in dets_a if d.type == kind and _in_edge(d, ov.edge_a, edge_fraction))
            n_b = sum(1 for d in dets_b if d.type == kind and _in_edge(d, ov.edge_b, edge_fraction))
            counts[kind] -= min(n_a, n_b)
    return {kind: n for kind, n in counts.items() if n > 0}


# -- state -------------------------------------------------------------------------------


@dataclass
class Window:
    """One open window of a drive."""

    index: int
    t_start: float
    t_end: float
    opened_at: float
    frames: dict[str, list[FrameDetections]] = field(default_factory=dict)
    tokens: list[Token] = field(default_factory=list)
    escalated_at: float | None = None


@dataclass
class ClosedWindow:
    """What the drive summary needs of a published window (kept in the checkpoint)."""

    index: int
    t_start: float
    t_end: float
    start_utc: float | None
    end_utc: float | None
    roadwork: bool
    confidence: float
    track: list[tuple[float, float]]
    estimated: bool


@dataclass
class Drive:
    """Everything fuse holds about one drive."""

    drive_id: str
    cameras: set[str] = field(default_factory=set)
    watermark: dict[str, float] = field(default_factory=dict)
    ended: set[str] = field(default_factory=set)
    ended_all: bool = False
    markers: list[DriveMarker] = field(default_factory=list)
    windows: dict[int, Window] = field(default_factory=dict)
    closed: dict[int, ClosedWindow] = field(default_factory=dict)
    segments: dict[tuple[str, int], AnomalyScore] = field(default_factory=dict)
    answers: dict[int, VlmAnswer] = field(default_factory=dict)
    answer_tokens: dict[int, list[Token]] = field(default_factory=dict)
    anomaly_tokens: list[tuple[Token, set[int]]] = field(default_factory=list)
    marker_tokens: list[Token] = field(default_factory=list)
    frame_counts: dict[str, int] = field(default_factory=dict)  # frames of published windows
    late: int = 0
    done: bool = False
    progress_at: float | None = None  # when an entry of the drive last arrived
    lag_s: float = 0.0  # the longest ingest-to-fuse delay of its frames
    given_up: dict[str, list[int]] = field(default_factory=dict)  # camera -> windows closed without it
    stalled_s: float = 0.0  # the longest stall that made fuse give up cameras
    no_anomaly: list[int] = field(default_factory=list)  # windows closed without vera's scores

    def expected_cameras(self) -> set[str]:
        """Cameras named by markers, plus cameras seen."""
        return self.cameras | set(self.watermark)


@dataclass(frozen=True)
class Evidence:
    """A window's evidence, summed up."""

    features: dict[str, float]
    objects: dict[str, int]
    cameras: list[str]
    anomaly: float | None
    prob: float | None


def vlm_feature(answer: VlmAnswer | None) -> float:
    """The VLM's P(roadwork) − 0.5, or 0 when it was not asked."""
    if answer is None:
        return 0.0
    body = answer.answer
    return (body.confidence if body.roadwork else 1.0 - body.confidence) - 0.5


def _frame_weight(frame: FrameDetections) -> float:
    return (frame.roadwork_prob or 0.0) + sum(d.score for d in frame.detections)


def key_frames(window: Window) -> list[CameraFrame]:
    """Per camera, the frame with the most roadwork evidence (earliest on ties)."""
    chosen = []
    for camera in sorted(window.frames):
        best = max(window.frames[camera], key=lambda f: (_frame_weight(f), -f.seq))
        chosen.append(CameraFrame(camera=camera, blob_key=best.blob_key, t=best.t, detections=best.detections,
                                  roadwork_prob=best.roadwork_prob))  # fmt: skip
    return chosen


#: Faster than any car (m/s): a fix that far from the window's others is no position.
MAX_SPEED_MPS = 100.0
#: GPS noise allowed on top of that distance (m).
GPS_SLACK_M = 50.0


def _fixes(frames: Sequence[FrameDetections]) -> tuple[list[tuple[float, float]], bool]:
    # One position per tick (the car has one), telemetry fixes before estimates.
    by_tick: dict[int, tuple[float, float, bool, float]] = {}
    for frame in sorted(frames, key=lambda f: (f.tick, f.camera)):
        tel = frame.telemetry
        if tel is None or tel.lat is None or tel.lon is None:
            continue
        held = by_tick.get(frame.tick)
        if held is None or (held[2] and not tel.estimated):
            by_tick[frame.tick] = (tel.lat, tel.lon, tel.estimated, frame.t)
    measured = _plausible([(lat, lon, t) for lat, lon, est, t in by_tick.values() if not est])
    if measured:
        return measured, False
    return [(lat, lon) for lat, lon, est, _ in by_tick.values() if est], True


def _plausible(fixes: list[tuple[float, float, float]]) -> list[tuple[float, float]]:
    """The fixes a car could have driven between: none farther from the window's median
    position than ``MAX_SPEED_MPS`` over the window's time span allows (a GPS jump)."""
    if not fixes:
        return []
    mid_lat = statistics.median(f[0] for f in fixes)
    mid_lon = statistics.median(f[1] for f in fixes)
    span_s = max(f[2] for f in fixes) - min(f[2] for f in fixes)
    reach = MAX_SPEED_MPS * span_s + GPS_SLACK_M
    return [(lat, lon) for lat, lon, _ in fixes if _metres(lat, lon, mid_lat, mid_lon) <= reach]


def _metres(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance (haversine, metres)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    return 2 * 6_371_000 * math.asin(min(1.0, math.sqrt(a)))


def _utc_offset(frames: Sequence[FrameDetections], drive: Drive) -> float | None:
    offsets = [f.utc - f.t for f in frames if f.utc is not None]
    if offsets:
        return statistics.median(offsets)
    starts = [m.start_utc for m in drive.markers if m.start_utc is not None]
    return min(starts) if starts else None


def _name(drive: Drive) -> str:
    """The drive's footage name, from its markers (ingest's ``footage_name``)."""
    return next((m.name for m in drive.markers if m.name), "")


def build_spans(closed: Sequence[ClosedWindow]) -> list[RoadworkSpan]:
    """Runs of consecutive roadwork windows, with their GPS tracks."""
    spans: list[RoadworkSpan] = []
    run: list[ClosedWindow] = []
    for win in sorted(closed, key=lambda c: c.index) + [None]:  # type: ignore[list-item]
        if win is not None and win.roadwork and (not run or run[-1].index + 1 == win.index):
            run.append(win)
            continue
        if run:
            spans.append(_span(run))
        run = [win] if win is not None and win.roadwork else []
    return spans


def _span(run: Sequence[ClosedWindow]) -> RoadworkSpan:
    track = [point for win in run for point in win.track]
    return RoadworkSpan(
        t_start=run[0].t_start,
        t_end=run[-1].t_end,
        start_utc=run[0].start_utc,
        end_utc=run[-1].end_utc,
        confidence=max(win.confidence for win in run),
        track=track,
        estimated=bool(track) and all(win.estimated for win in run if win.track),
    )


class Fuser:
    """Fuses the messages of many drives into verdicts; deterministic, no IO.

    Parameters:
        settings: windows, overlaps, coefficients, escalation band and timeouts.
        escalate: ask the vlm stage about uncertain windows (a VLM is configured).
        expect_anomaly: windows wait for the vera stage's scores (a VLM is configured).
        smoother: applied to each camera's anomaly scores in segment order before use
            (VERA's scene-context and temporal smoothing); ``None`` uses them raw.
        coefficients: logistic coefficients; ``settings.coefficients`` by default.
    """

    def __init__(
        self,
        settings: FuseSettings | None = None,
        *,
        escalate: bool = False,
        expect_anomaly: bool = False,
        smoother: Smoother | None = None,
        coefficients: dict[str, float] | None = None,
    ) -> None:
        self.settings = settings or FuseSettings()
        self.overlaps = parse_overlaps(self.settings.overlaps)
        self.coefficients = dict(coefficients or self.settings.coefficients)
        self.escalate = escalate
        self.expect_anomaly = expect_anomaly
        self.smoother = smoother
        self.drives: dict[str, Drive] = {}
        self._smoothed: dict[tuple[str, str], tuple[int, list[tuple[AnomalyScore, float]]]] = {}
        self._dirty: set[str] = set()

    # -- input ---------------------------------------------------------------------

    def add(self, message: Message, token: Token = None, now: float = 0.0) -> Step:
        """Take one message; close what it completes.

        Parameters:
            message: a ``FrameDetections``, ``DriveMarker``, ``AnomalyScore`` or ``VlmAnswer``.
            token: returned in ``Step.release`` once the message's windows are published.
            now: the current time (POSIX seconds), for timeouts and latencies.

        Returns:
            Messages to publish and tokens now safe to acknowledge.

        Raises:
            TypeError: a message of another kind.
        """
        drive = self.drives.setdefault(message.drive_id, Drive(message.drive_id))  # type: ignore[attr-defined]
        if drive.done:
            drive.late += 1
            return self._released(drive, Step(release=[token]))
        handlers = {
            FrameDetections: self._on_frame,
            DriveMarker: self._on_marker,
            AnomalyScore: self._on_anomaly,
            VlmAnswer: self._on_answer,
        }
        handler = handlers.get(type(message))
        if handler is None:
            text = f"fuse takes detections, drive markers, anomaly scores and answers, not {message.KIND!r}"
            raise TypeError(text)
        drive.progress_at = now if drive.progress_at is None else max(drive.progress_at, now)
        step = Step(release=handler(drive, message, token, now))
        step.extend(self._advance(drive, now))
        return self._released(drive, step)

    def tick(self, now: float) -> Step:
        """Close windows whose timeouts passed, in every drive."""
        step = Step()
        for drive in list(self.drives.values()):
            if not drive.done:
                step.extend(self._released(drive, self._advance(drive, now)))
        return step

    def take_dirty(self) -> set[str]:
        """Drives whose checkpoint changed since the last call (tokens were released)."""
        dirty, self._dirty = self._dirty, set()
        return dirty

    def _released(self, drive: Drive, step: Step) -> Step:
        if step.release or step.outputs:
            self._dirty.add(drive.drive_id)
        return step

    def _window_index(self, t: float) -> int:
        # The epsilon keeps t = 2.0 with w = 0.4 in window 5 despite binary fractions.
        return math.floor(t / self.settings.window_s + 1e-9)

    def _on_frame(self, drive: Drive, msg: FrameDetections, token: Token, now: float) -> list[Token]:
        drive.watermark[msg.camera] = max(drive.watermark.get(msg.camera, -math.inf), msg.t)
        if msg.ingested_utc is not None:
            drive.lag_s = max(drive.lag_s, now - msg.ingested_utc)
        index = self._window_index(msg.t)
        if index in drive.closed:
            drive.late += 1
            return [token]
        window = drive.windows.get(index)
        if window is None:
            w = self.settings.window_s
            window = drive.windows[index] = Window(index, index * w, (index + 1) * w, opened_at=now)
        frames = window.frames.setdefault(msg.camera, [])
        window.tokens.append(token)
        if all(f.seq != msg.seq for f in frames):  # a redelivered frame counts once
            frames.append(msg)
        return []

    def _on_marker(self, drive: Drive, msg: DriveMarker, token: Token, now: float) -> list[Token]:
        drive.markers.append(msg)
        drive.marker_tokens.append(token)
        drive.cameras |= set(msg.cameras)
        if msg.event == "ended":
            if msg.camera is None:
                drive.ended_all = True
            else:
                drive.ended.add(msg.camera)
                drive.cameras.add(msg.camera)
            drive.ended_all = drive.ended_all or drive.ended >= drive.cameras
        return []

    def _on_anomaly(self, drive: Drive, msg: AnomalyScore, token: Token, now: float) -> list[Token]:
        key = (msg.camera, msg.index)
        if key in drive.segments:
            return [token]  # a redelivered score adds nothing
        drive.segments[key] = msg
        first = self._window_index(msg.t_start)
        last = math.ceil(msg.t_end / self.settings.window_s - 1e-9)
        span = {i for i in range(first, max(last, first + 1)) if i not in drive.closed}
        if not span:
            return [token]
        drive.anomaly_tokens.append((token, span))
        return []

    def _on_answer(self, drive: Drive, msg: VlmAnswer, token: Token, now: float) -> list[Token]:
        if msg.window in drive.closed:
            return [token]
        drive.answers.setdefault(msg.window, msg)
        drive.answer_tokens.setdefault(msg.window, []).append(token)
        return []

    # -- closing -------------------------------------------------------------------

    def _advance(self, drive: Drive, now: float) -> Step:
        step = Step()
        for index in sorted(drive.windows):
            step.extend(self._try_close(drive, drive.windows[index], now))
        if not drive.ended_all and not drive.windows and drive.ended and self._stalled(drive, now):
            # Some cameras ended, the rest made no progress for far longer than the
            # pipeline's lag: they are gone, and the drive is summarised without them.
            drive.stalled_s = max(drive.stalled_s, now - (drive.progress_at or now))
            for camera in sorted(drive.expected_cameras() - drive.ended):
                drive.given_up.setdefault(camera, [])
            drive.ended_all = True
        if drive.ended_all and not drive.windows:
            step.extend(self._finish(drive))
        return step

    def _try_close(self, drive: Drive, window: Window, now: float) -> Step:
        if not self._complete(drive, window):
            if not self._stalled(drive, now):
                return Step()
            self._give_up(drive, window, now)
        answer = drive.answers.get(window.index)
        evidence = self.evidence(drive, window, answer)
        base = confidence({**evidence.features, "vlm": 0.0}, self.coefficients)
        uncertain = self.settings.escalate_low <= base <= self.settings.escalate_high
        if answer is None and self.escalate and uncertain:
            if window.escalated_at is None:
                window.escalated_at = now
                return Step(outputs=[self._escalation(drive.drive_id, window, evidence, base)])
            if now - window.escalated_at < self.settings.vlm_timeout_s:
                return Step()
        return self._close(drive, window, evidence, answer, now)

    def stall_limit(self, drive: Drive) -> float:
        """Seconds without any entry of the drive after which fuse gives up its missing cameras."""
        return max(self.settings.watermark_timeout_s, self.settings.stall_lag_factor * drive.lag_s)

    def _stalled(self, drive: Drive, now: float) -> bool:
        return drive.progress_at is not None and now - drive.progress_at >= self.stall_limit(drive)

    def _waiting_for(self, drive: Drive, window: Window) -> list[str]:
        # Behind the window, and either not ended yet or still owing frames it was counted
        # to have sent.
        return sorted(
            camera
            for camera in drive.expected_cameras()
            if drive.watermark.get(camera, -math.inf) < window.t_end
            and (not (drive.ended_all or camera in drive.ended) or self._frames_due(drive, camera))
        )

    @staticmethod
    def _frames_due(drive: Drive, camera: str) -> bool:
        # A camera's "ended" marker can overtake its last frames when a partition moves
        # between detect workers (a paused owner's in-flight read is replayed later): the
        # camera has ended only once fuse holds the frames the marker counts. Frames that
        # never come (dead-lettered) leave it to the stall guard.
        sent = max((m.frame_counts.get(camera, 0) for m in drive.markers if m.event == "ended"), default=0)
        held = drive.frame_counts.get(camera, 0) + sum(len(w.frames.get(camera, ())) for w in drive.windows.values())
        return held < sent

    def _give_up(self, drive: Drive, window: Window, now: float) -> None:
        drive.stalled_s = max(drive.stalled_s, now - (drive.progress_at or now))
        waiting = self._waiting_for(drive, window)
        for camera in waiting:
            drive.given_up.setdefault(camera, []).append(window.index)
        if not waiting and self.expect_anomaly:
            drive.no_anomaly.append(window.index)  # only vera's scores were missing

    def _complete(self, drive: Drive, window: Window) -> bool:
        if self._waiting_for(drive, window):
            return False
        if not self.expect_anomaly:
            return True
        return all(self._anomaly_covers(drive, camera, window) for camera in window.frames)

    def _anomaly_covers(self, drive: Drive, camera: str, window: Window) -> bool:
        # vera workers are many and stateless: scores arrive out of order, so only the
        # unbroken run of segment indices from 0 counts as the camera's anomaly watermark.
        index, reach = 0, -math.inf
        while (seg := drive.segments.get((camera, index))) is not None:
            reach, index = max(reach, seg.t_end), index + 1
        if reach >= window.t_end:
            return True
        ended = drive.ended_all or camera in drive.ended
        expected = [m.segment_counts[camera] for m in drive.markers if camera in m.segment_counts]
        return ended and bool(expected) and index >= max(expected)

    # -- evidence --------------------------------------------------------------------

    def evidence(self, drive: Drive, window: Window, answer: VlmAnswer | None = None) -> Evidence:
        """Features and summaries of one window's evidence."""
        ticks: dict[int, dict[str, list[Detection]]] = {}
        probs: list[float] = []
        for camera, frames in window.frames.items():
            for frame in frames:
                ticks.setdefault(frame.tick, {})[camera] = frame.detections
                if frame.roadwork_prob is not None:
                    probs.append(frame.roadwork_prob)
        objects: dict[str, int] = {}
        most = 0
        for by_camera in ticks.values():
            counts = fused_counts(by_camera, self.overlaps, self.settings.edge_fraction)
            most = max(most, sum(counts.values()))
            for kind, n in counts.items():
                objects[kind] = max(objects.get(kind, 0), n)
        support = sorted(
            cam
            for cam, frames in window.frames.items()
            if any(f.detections or (f.roadwork_prob or 0.0) >= 0.5 for f in frames)
        )
        anomaly = self._anomaly(drive, window)
        features = {
            "objects": math.log1p(most),
            "types": float(len(objects)),
            "prob_max": max(probs) - 0.5 if probs else 0.0,
            "prob_mean": statistics.fmean(probs) - 0.5 if probs else 0.0,
            "anomaly": anomaly - 0.5 if anomaly is not None else 0.0,
            "cameras": len(support) / max(len(window.frames), 1),
            "vlm": vlm_feature(answer),
        }
        return Evidence(features, dict(sorted(objects.items())), support, anomaly, max(probs) if probs else None)

    def _anomaly(self, drive: Drive, window: Window) -> float | None:
        best = None
        for camera in sorted({c for c, _ in drive.segments}):
            for seg, score in self._smoothed_scores(drive, camera):
                if seg.t_start < window.t_end and seg.t_end > window.t_start:
                    best = score if best is None else max(best, score)
        return best

    def _smoothed_scores(self, drive: Drive, camera: str) -> list[tuple[AnomalyScore, float]]:
        segs = sorted((s for (c, _), s in drive.segments.items() if c == camera), key=lambda s: s.index)
        cached = self._smoothed.get((drive.drive_id, camera))
        if cached is not None and cached[0] == len(segs):
            return cached[1]
        scores = [s.score for s in segs]
        if self.smoother is not None and segs:
            scores = [min(max(float(x), 0.0), 1.0) for x in self.smoother(scores, [s.descriptor for s in segs])]
        pairs = list(zip(segs, scores, strict=True))
        self._smoothed[(drive.drive_id, camera)] = (len(segs), pairs)
        return pairs

    # -- outputs -----------------------------------------------------------------------

    def _escalation(self, drive_id: str, window: Window, evidence: Evidence, base: float) -> Escalation:
        return Escalation(
            drive_id=drive_id,
            window=window.index,
            t_start=window.t_start,
            t_end=window.t_end,
            frames=key_frames(window),
            confidence=base,
            evidence={"features": evidence.features, "objects": evidence.objects, "cameras": evidence.cameras},
        )

    def _close(
        self, drive: Drive, window: Window, evidence: Evidence, answer: VlmAnswer | None, now: float
    ) -> Step:
        frames = [f for fs in window.frames.values() for f in fs]
        conf = confidence(evidence.features, self.coefficients)
        track, estimated = _fixes(frames)
        if not track:
            track, estimated = self._estimate(drive), True
        offset = _utc_offset(frames, drive)
        t_end = self._footage_end(drive, window)
        verdict = Verdict(
            drive_id=drive.drive_id,
            drive_name=_name(drive),
            window=window.index,
            t_start=window.t_start,
            t_end=t_end,
            start_utc=None if offset is None else window.t_start + offset,
            end_utc=None if offset is None else t_end + offset,
            roadwork=conf >= self.settings.threshold,
            confidence=conf,
            cameras=evidence.cameras,
            missing_cameras=sorted(drive.expected_cameras() - set(window.frames)),
            objects=evidence.objects,
            anomaly_score=evidence.anomaly,
            roadwork_prob=evidence.prob,
            vlm=answer.answer if answer else None,
            escalated=window.escalated_at is not None or answer is not None,
            gps=_mean_gps(track, estimated),
            models=self._models(drive, window, frames, answer),
            timings_ms=_timings(frames, answer, now),
            features=evidence.features,
            frames=key_frames(window),
        )
        drive.closed[window.index] = ClosedWindow(
            window.index, window.t_start, t_end, verdict.start_utc, verdict.end_utc,
            verdict.roadwork, conf, track, estimated,
        )  # fmt: skip
        del drive.windows[window.index]
        for camera, camera_frames in window.frames.items():
            drive.frame_counts[camera] = drive.frame_counts.get(camera, 0) + len(camera_frames)
        drive.answers.pop(window.index, None)
        release = window.tokens + drive.answer_tokens.pop(window.index, []) + self._free_anomaly(drive, window)
        return Step(outputs=[verdict], release=release, spent_blobs=self._spent(frames, verdict))

    @staticmethod
    def _footage_end(drive: Drive, window: Window) -> float:
        """The window's end, or the footage's where the footage ends inside it.

        The last window of a 5 s drive cut in 2 s windows is 4–5 s, not 4–6 s: a verdict,
        and the spans built from it, claim no time past the footage. The footage ends one
        sampling step (the window's smallest frame spacing) after the drive's last frame;
        known only once every camera ended (none given up), so no later frame can come.
        """
        if not drive.ended_all or drive.given_up or not drive.watermark:
            return window.t_end
        steps = [b.t - a.t for fs in window.frames.values()
                 for a, b in itertools.pairwise(sorted(fs, key=lambda f: f.t)) if b.t - a.t > 1e-9]  # fmt: skip
        if not steps:
            return window.t_end
        end = round(max(drive.watermark.values()) + min(steps), 6)
        return end if window.t_start < end < window.t_end else window.t_end

    def _spent(self, frames: list[FrameDetections], verdict: Verdict) -> list[str]:
        # With vera on, its segments' key frames may still be read after this window
        # closed: nothing is spent then. Each frame lies in one window only.
        if self.expect_anomaly:
            return []
        kept = {f.blob_key for f in verdict.frames}
        return sorted({f.blob_key for f in frames} - kept)

    def _free_anomaly(self, drive: Drive, window: Window) -> list[Token]:
        freed, kept = [], []
        for token, span in drive.anomaly_tokens:
            span.discard(window.index)
            (kept if span else freed).append((token, span))
        drive.anomaly_tokens = kept
        return [token for token, _ in freed]

    def _estimate(self, drive: Drive) -> list[tuple[float, float]]:
        for marker in drive.markers:
            if marker.est_lat is not None and marker.est_lon is not None:
                return [(marker.est_lat, marker.est_lon)]
        return []

    def _models(
        self, drive: Drive, window: Window, frames: Sequence[FrameDetections], answer: VlmAnswer | None
    ) -> dict[str, str]:
        models = {"detect": next((f.model for f in frames if f.model), "")}
        overlapping = [s for s in drive.segments.values() if s.t_start < window.t_end and s.t_end > window.t_start]
        models["vera"] = next((s.model for s in overlapping if s.model), "")
        models["vlm"] = answer.model if answer else ""
        return {stage: name for stage, name in models.items() if name}

    def _finish(self, drive: Drive) -> Step:
        closed = sorted(drive.closed.values(), key=lambda c: c.index)
        summary = DriveSummary(
            drive_id=drive.drive_id,
            windows=len(closed),
            roadwork_windows=sum(c.roadwork for c in closed),
            spans=build_spans(closed),
            cameras=sorted(drive.expected_cameras()),
            frame_counts=dict(sorted(drive.frame_counts.items())),
            missing=_merged_lists(m.missing for m in drive.markers),
            missed_ticks={c: max(m.missed_ticks.get(c, 0) for m in drive.markers)
                          for c in sorted({c for m in drive.markers for c in m.missed_ticks})},
            problems=self._problems(drive),
            source=next((m.source for m in drive.markers if m.source), ""),
            drive_name=_name(drive),
            start_utc=min((m.start_utc for m in drive.markers if m.start_utc is not None), default=None),
            end_utc=max((m.end_utc for m in drive.markers if m.end_utc is not None), default=None),
        )
        release = list(drive.marker_tokens) + [t for t, _ in drive.anomaly_tokens]
        release += [t for tokens in drive.answer_tokens.values() for t in tokens]
        drive.done = True
        drive.markers, drive.marker_tokens, drive.anomaly_tokens = [], [], []
        drive.answers, drive.answer_tokens, drive.segments = {}, {}, {}
        return Step(outputs=[summary], release=release)

    def _problems(self, drive: Drive) -> list[str]:
        problems = sorted({p for m in drive.markers for p in m.problems})
        sent: dict[str, int] = {}
        for marker in drive.markers:
            for camera, n in marker.frame_counts.items():
                sent[camera] = max(sent.get(camera, 0), n)
        for camera, n in sorted(sent.items()):
            got = drive.frame_counts.get(camera, 0)
            if got < n:
                problems.append(f"{camera}: {n - got} of {n} frames never reached fuse (dead-lettered or late)")
        for camera, windows in sorted(drive.given_up.items()):
            closed = f"; {len(windows)} window(s) closed without it (first {min(windows)})" if windows else ""
            problems.append(
                f"{camera}: gave up waiting for it after {drive.stalled_s:.0f} s without any entry of the drive "
                f"(pipeline lag {drive.lag_s:.0f} s): its partition made no progress and it never ended{closed}"
            )
        if drive.no_anomaly:
            problems.append(
                f"anomaly scores (vera) never arrived for {len(drive.no_anomaly)} window(s) (first "
                f"{min(drive.no_anomaly)}) after {drive.stalled_s:.0f} s without any entry of the drive: "
                "decided without them"
            )
        if drive.late:
            problems.append(f"{drive.late} entries arrived after their window closed")
        return problems

    # -- checkpoint ----------------------------------------------------------------------

    def snapshot(self, drive_id: str) -> dict[str, Any]:
        """What a new owner needs beyond the entries still pending: published windows,
        anomaly history (for smoothing), frame counts. Plain data (msgpack-able)."""
        drive = self.drives[drive_id]
        return {
            "v": 1,
            "done": drive.done,
            "late": drive.late,
            "frame_counts": dict(drive.frame_counts),
            "closed": [
                [c.index, c.t_start, c.t_end, c.start_utc, c.end_utc, c.roadwork, c.confidence,
                 [list(p) for p in c.track], c.estimated]
                for c in sorted(drive.closed.values(), key=lambda c: c.index)
            ],  # fmt: skip
            "segments": [s.model_dump(mode="json") for s in drive.segments.values()],
            "given_up": {camera: list(windows) for camera, windows in drive.given_up.items()},
            "stalled_s": drive.stalled_s,
            "no_anomaly": list(drive.no_anomaly),
            "lag_s": drive.lag_s,
        }

    def progress(self, drive_id: str) -> int:
        """A number that never falls as the drive moves on (its published windows, then
        done): the version of its checkpoint, so that a worker that fell behind (paused
        while another took the drive over) cannot overwrite a newer checkpoint."""
        drive = self.drives[drive_id]
        return 2 * len(drive.closed) + int(drive.done)

    def restore(self, drive_id: str, snapshot: dict[str, Any]) -> None:
        """Start a drive from its checkpoint, before its pending entries are replayed.

        Raises:
            ValueError: the snapshot is not one this version wrote.
        """
        if snapshot.get("v") != 1:
            message = f"fuse checkpoint of drive {drive_id}: unknown version {snapshot.get('v')!r}"
            raise ValueError(message)
        drive = self.drives[drive_id] = Drive(drive_id)
        drive.done, drive.late = bool(snapshot["done"]), int(snapshot["late"])
        drive.frame_counts = {str(k): int(v) for k, v in snapshot["frame_counts"].items()}
        for row in snapshot["closed"]:
            index, t0, t1, u0, u1, roadwork, conf, track, est = row
            drive.closed[index] = ClosedWindow(index, t0, t1, u0, u1, roadwork, conf, [tuple(p) for p in track], est)
        # Written since the stall guard; older checkpoints lack them.
        drive.given_up = {str(c): [int(i) for i in w] for c, w in snapshot.get("given_up", {}).items()}
        drive.stalled_s, drive.lag_s = float(snapshot.get("stalled_s", 0.0)), float(snapshot.get("lag_s", 0.0))
        drive.no_anomaly = [int(i) for i in snapshot.get("no_anomaly", [])]
        for data in snapshot["segments"]:
            seg = AnomalyScore.model_validate(data)
            drive.segments[(seg.camera, seg.index)] = seg
        for key in [k for k in self._smoothed if k[0] == drive_id]:
            del self._smoothed[key]

    def drop(self, drive_id: str) -> None:
        """Forget a drive (its partition went to another worker)."""
        self.drives.pop(drive_id, None)
        for key in [k for k in self._smoothed if k[0] == drive_id]:
            del self._smoothed[key]


def _merged_lists(maps) -> dict[str, list[str]]:
    # The drives hop and every camera partition carry copies of one marker: merge, once each.
    merged: dict[str, list[str]] = {}
    for mapping in maps:
        for key, values in mapping.items():
            merged.setdefault(key, [])
            merged[key] += [v for v in values if v not in merged[key]]
    return {key: sorted(values) for key, values in sorted(merged.items())}


def _mean_gps(track: Sequence[tuple[float, float]], estimated: bool) -> Gps | None:
    if not track:
        return None
    lat = statistics.fmean(p[0] for p in track)
    lon = statistics.fmean(p[1] for p in track)
    return Gps(lat=lat, lon=lon, estimated=estimated)


def _timings(frames: Sequence[FrameDetections], answer: VlmAnswer | None, now: float) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for frame in frames:
        for name, ms in frame.timings_ms.items():
            sums.setdefault(name, []).append(ms)
    timings = {name: statistics.fmean(values) for name, values in sorted(sums.items())}
    ingested = [f.ingested_utc for f in frames if f.ingested_utc is not None]
    if ingested and now >= max(ingested):
        # From the window's first ingested frame and from its last, to this verdict.
        timings["ingest_to_verdict_ms"] = (now - min(ingested)) * 1000
        timings["last_frame_to_verdict_ms"] = (now - max(ingested)) * 1000
    if answer is not None:
        timings["vlm_ms"] = answer.latency_ms
    return timings

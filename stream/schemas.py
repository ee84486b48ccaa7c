"""Versioned message schemas for every hop of the pipeline.

Each message is a frozen pydantic model with a ``KIND`` (its name on the wire) and a
``VERSION``. ``stream.codec`` packs them with msgpack together with kind and version;
an entry whose kind, version or fields do not validate becomes a ``DecodeError`` and
then a dead letter, never a crash.

Times: ``t`` fields are seconds since the drive's first sample (the shared clock of all
cameras); ``*_utc`` fields are POSIX seconds (UTC) or ``None`` when unknown.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

Box = tuple[float, float, float, float]


class Model(BaseModel):
    """Base of every schema object: frozen, strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def copy_with(self, **changes: Any) -> Model:
        """A copy with some fields changed, validated again."""
        return type(self).model_validate({**self.model_dump(), **changes})


class Message(Model):
    """A top-level stream entry."""

    KIND: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1


class Telemetry(Model):
    """Per-frame vehicle data read from the clip's SEI (or an estimate)."""

    version: int | None = None
    gear: Literal["park", "drive", "reverse", "neutral"] | None = None
    frame_seq_no: int | None = None
    speed_mps: float | None = None
    accelerator: float | None = None
    steering_angle: float | None = None
    blinker_left: bool | None = None
    blinker_right: bool | None = None
    brake: bool | None = None
    autopilot: Literal["none", "self_driving", "autosteer", "tacc"] | None = None
    lat: float | None = None
    lon: float | None = None
    heading: float | None = None
    accel_x: float | None = None
    accel_y: float | None = None
    accel_z: float | None = None
    #: True when position comes from the event's estimate rather than the frame.
    estimated: bool = False


class ClipRef(Model):
    """One minute of a drive: the file of each camera present."""

    start: str  # clip name timestamp, e.g. "2024-05-01_10-11-12" (the car's local clock)
    files: dict[str, str]  # camera -> path
    #: The minute's start in UTC (POSIX s) from the clips' MP4 ``creation_time``, or from the
    #: name and the drive's other minutes where no clip has one; ``None``: names only.
    utc: float | None = None


class Span(Model):
    """Which clips of a drive's camera one ingest job decodes (``stages.jobs.split_job``).

    A long drive's camera is split into spans of consecutive minutes, so several ingest
    processes share it; span k's frames reach the camera's partition only after span
    k-1's (``workers.handlers.ingest_spans``).
    """

    index: int = Field(ge=0)  # 0, 1, … in time order
    count: int = Field(ge=1)  # spans of the camera
    first: int = Field(ge=0)  # index in ``Job.clips`` of the span's first minute
    end: int = Field(ge=1)  # one past its last minute
    #: Names the cut (every span's bounds): spans of one cut share a chain; the same
    #: drive cut otherwise (another ``span_s``, more minutes) is another chain.
    cut: str = Field(min_length=1)


class Job(Message):
    """A drive for ingest to decode: put on the jobs stream by ``roadstream submit``."""

    KIND: ClassVar[str] = "job"
    drive_id: str
    root: str
    clips: list[ClipRef]
    event: dict[str, str] | None = None
    submitted_utc: float | None = None
    #: The car's cameras (every camera seen in the footage folder): a camera of these with
    #: no clip in a minute of this drive is reported as absent there.
    car_cameras: list[str] = Field(default_factory=list)
    #: The cameras this job decodes; empty: all of the drive's. A drive split into
    #: per-camera jobs (``stages.jobs.split_job``) keeps every clip in each job, so each
    #: knows the whole drive; the last job to finish publishes the drive's "ended" markers.
    cameras: list[str] = Field(default_factory=list)
    #: The minutes this job decodes (of its one camera); ``None``: all of them.
    span: Span | None = None


class FrameRef(Message):
    """One sampled frame of one camera; the pixels stay in the blob store."""

    KIND: ClassVar[str] = "frame"
    drive_id: str
    camera: str
    clip: str
    seq: int  # per (drive, camera), 0, 1, 2 … with no gaps
    tick: int  # sample tick shared by all cameras of the drive
    t: float  # tick time, seconds since the drive's first tick
    pts: float  # presentation time of the chosen frame inside its clip
    utc: float | None = None
    telemetry: Telemetry | None = None
    blob_key: str
    width: int
    height: int
    encoding: Literal["jpeg", "raw"] = "jpeg"
    nbytes: int = 0
    ingested_utc: float | None = None


class DriveMarker(Message):
    """Start or end of a drive, in band on each partition that carries it."""

    KIND: ClassVar[str] = "drive"
    drive_id: str
    event: Literal["started", "ended"]
    camera: str | None = None  # the camera whose partition carries this copy
    cameras: list[str] = Field(default_factory=list)
    frame_counts: dict[str, int] = Field(default_factory=dict)
    segment_counts: dict[str, int] = Field(default_factory=dict)
    ticks: int = 0
    missing: dict[str, list[str]] = Field(default_factory=dict)  # camera -> minutes without a frame
    missed_ticks: dict[str, int] = Field(default_factory=dict)  # camera -> ticks inside clips with no frame
    problems: list[str] = Field(default_factory=list)  # each names its file and says what was lost
    source: str = ""
    #: The drive as people know it: its event folder's name, else its first clip's local time.
    name: str = ""
    start_utc: float | None = None
    end_utc: float | None = None
    est_lat: float | None = None
    est_lon: float | None = None


class Detection(Model):
    """One detected roadwork object; the box is normalised to [0, 1]."""

    type: str  # roadwork object type (cone, drum, barrier …)
    label: str  # the model's own class name
    score: float
    box: Box


class FrameDetections(Message):
    """The detect stage's result for one frame, sent to fuse."""

    KIND: ClassVar[str] = "detections"
    drive_id: str
    camera: str
    seq: int
    tick: int
    t: float
    utc: float | None = None
    telemetry: Telemetry | None = None
    blob_key: str
    detections: list[Detection] = Field(default_factory=list)
    roadwork_prob: float | None = None
    model: str = ""
    ingested_utc: float | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)


class KeyFrame(Model):
    """A frame a temporal window kept."""

    seq: int
    tick: int
    t: float
    utc: float | None = None
    blob_key: str
    telemetry: Telemetry | None = None
    detections: list[Detection] = Field(default_factory=list)
    roadwork_prob: float | None = None


class Segment(Message):
    """The key frames of one closed temporal window, for the vera stage."""

    KIND: ClassVar[str] = "segment"
    drive_id: str
    camera: str
    index: int
    t_start: float
    t_end: float
    key_frames: list[KeyFrame]
    frames_total: int
    frames_kept: int
    object_counts: dict[str, int] = Field(default_factory=dict)
    descriptor: list[float] = Field(default_factory=list)
    model: str = ""


class AnomalyScore(Message):
    """VERA's score of one segment: P(yes) of its anomaly question."""

    KIND: ClassVar[str] = "anomaly"
    drive_id: str
    camera: str
    index: int
    t_start: float
    t_end: float
    score: float = Field(ge=0.0, le=1.0)
    descriptor: list[float] = Field(default_factory=list)
    model: str = ""
    questions: str = ""  # id of the guiding-question set


class CameraFrame(Model):
    """A key frame of one camera sent to the VLM (and shown in the run report)."""

    camera: str
    blob_key: str
    t: float
    #: The frame's detections, so that a report can draw the boxes.
    detections: list[Detection] = Field(default_factory=list)
    #: The frame scorer's probability for this frame, when a scorer ran.
    roadwork_prob: float | None = None


class Escalation(Message):
    """A window fuse could not decide, for the vlm stage."""

    KIND: ClassVar[str] = "escalation"
    drive_id: str
    window: int
    t_start: float
    t_end: float
    frames: list[CameraFrame]
    confidence: float
    evidence: dict[str, Any] = Field(default_factory=dict)


class ObjectSighting(Model):
    """An object type the VLM reported and the cameras it saw it in."""

    type: str
    cameras: list[str] = Field(default_factory=list)


class VlmAnswerBody(Model):
    """The structured answer the vlm stage asks the model for."""

    roadwork: bool
    confidence: float = Field(ge=0.0, le=1.0)
    objects: list[ObjectSighting] = Field(default_factory=list)
    lanes_affected: int = Field(default=0, ge=0)
    description: str = ""


class VlmAnswer(Message):
    """The vlm stage's answer to one escalation."""

    KIND: ClassVar[str] = "answer"
    drive_id: str
    window: int
    answer: VlmAnswerBody
    model: str = ""
    latency_ms: float = 0.0


class Gps(Model):
    """Position of a window: the mean of its frames' fixes, or the event estimate."""

    lat: float
    lon: float
    estimated: bool = False


class Verdict(Message):
    """One verdict per drive window: the product."""

    KIND: ClassVar[str] = "verdict"
    drive_id: str
    #: The drive's footage name (event folder, else first clip's local time; ``DriveMarker.name``).
    drive_name: str = ""
    window: int
    t_start: float
    t_end: float
    start_utc: float | None = None
    end_utc: float | None = None
    roadwork: bool
    confidence: float = Field(ge=0.0, le=1.0)
    cameras: list[str] = Field(default_factory=list)  # the cameras that support roadwork
    #: The drive's cameras that have no frame in this window (absent, broken, given up).
    missing_cameras: list[str] = Field(default_factory=list)
    objects: dict[str, int] = Field(default_factory=dict)
    anomaly_score: float | None = None
    roadwork_prob: float | None = None
    vlm: VlmAnswerBody | None = None
    escalated: bool = False
    gps: Gps | None = None
    models: dict[str, str] = Field(default_factory=dict)
    timings_ms: dict[str, float] = Field(default_factory=dict)
    #: The evidence features the confidence was computed from (``stages.fuse.FEATURES``).
    features: dict[str, float] = Field(default_factory=dict)
    #: One key frame per supporting camera, with its boxes.
    frames: list[CameraFrame] = Field(default_factory=list)


class RoadworkSpan(Model):
    """A run of consecutive roadwork windows of a drive, with its GPS track."""

    t_start: float
    t_end: float
    start_utc: float | None = None
    end_utc: float | None = None
    confidence: float
    track: list[tuple[float, float]] = Field(default_factory=list)  # (lat, lon)
    estimated: bool = False


class DriveSummary(Message):
    """Published once a drive's last window closed."""

    KIND: ClassVar[str] = "drive_summary"
    drive_id: str
    windows: int
    roadwork_windows: int
    spans: list[RoadworkSpan] = Field(default_factory=list)
    cameras: list[str] = Field(default_factory=list)
    frame_counts: dict[str, int] = Field(default_factory=dict)
    #: camera -> minutes (clip names) that gave it no frame: absent, empty or unreadable.
    missing: dict[str, list[str]] = Field(default_factory=dict)
    #: camera -> ticks inside its clips that got no frame (holes in the stream).
    missed_ticks: dict[str, int] = Field(default_factory=dict)
    problems: list[str] = Field(default_factory=list)
    source: str = ""
    #: The drive's footage name (event folder, else first clip's local time).
    drive_name: str = ""
    #: UTC of the drive's first and last frames, where the clips say.
    start_utc: float | None = None
    end_utc: float | None = None

    def label(self) -> str:
        """The drive for people: ``2024-05-01_10-00-00 · 6 cameras · 1.5 min`` (``· 6 s`` under a
        minute; the id when unnamed)."""
        parts = [self.drive_name or self.drive_id, f"{len(self.cameras)} camera{'s' * (len(self.cameras) != 1)}"]
        if self.start_utc is not None and self.end_utc is not None:
            seconds = self.end_utc - self.start_utc
            parts.append(f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s")
        return " · ".join(parts)


class DeadLetter(Message):
    """An entry that could not be processed, with why."""

    KIND: ClassVar[str] = "deadletter"
    stream: str
    group: str
    entry_id: str
    error: str
    deliveries: int
    consumer: str = ""
    raw: bytes = b""
    at_utc: float = 0.0


MESSAGE_TYPES: tuple[type[Message], ...] = (
    Job,
    FrameRef,
    DriveMarker,
    FrameDetections,
    Segment,
    AnomalyScore,
    Escalation,
    VlmAnswer,
    Verdict,
    DriveSummary,
    DeadLetter,
)

"""A drive ingested as several jobs: each camera's record, and the drive's merged progress.

Every part job, once its cameras are published, stores one small record per camera (frame
count, ticks, missing minutes, missed ticks, problems, first and last UTC) as a value in the broker,
then reads the records of all the drive's cameras. The part that finds them all complete
publishes the drive's "ended" markers, built from the merged records. Two parts finishing
together may both find them complete: both build the same markers under the same dedupe
keys, so one copy is published. Each part writes before it reads, so the last one to
finish always sees every record.

The merge reproduces what one whole-drive job would have reported: counts in camera
order, problems and missing minutes in (minute, camera) order, and the first and last UTC
of the frames in publishing order (minute by minute, camera by camera). The cameras
absent from some minutes, and the car's cameras absent from the whole drive, come from
the job's clip list (``IngestHandler._merged``), not from the records. A part that was
dead-lettered stores failed records for its cameras, so the drive still completes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from stages.discover import CAMERAS

#: The records outlive any plausible ingest of one drive.
RECORD_TTL_MS = 7 * 24 * 3600 * 1000


def record_key(namespace: str, drive_id: str, camera: str) -> str:
    """Broker value key of one camera's record."""
    return f"{namespace}:ingest-part:{drive_id}:{camera}"


@dataclass
class CameraRecord:
    """What one camera of a drive published.

    Attributes:
        frames: frames published (seq 0 … frames-1).
        ticks: the drive ticks those frames sit on.
        missing: clip names (minutes) of the camera that gave no frame.
        problems: (minute index, text) of each problem, in the order met.
        first: (minute index, UTC seconds) of the first frame that had a UTC; ``None``: none had.
        last: (minute index, UTC seconds) of the last frame that had a UTC.
        missed_ticks: ticks inside the camera's clips that got no frame.
        failed: the camera's part was dead-lettered: its frame count is unknown (left out
            of the merged counts, as a whole drive's dead-letter marker leaves them out).
    """

    frames: int = 0
    ticks: list[int] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    problems: list[tuple[int, str]] = field(default_factory=list)
    first: tuple[int, float] | None = None
    last: tuple[int, float] | None = None
    missed_ticks: int = 0
    failed: bool = False

    def encode(self) -> bytes:
        """JSON bytes."""
        return json.dumps(self.__dict__).encode()

    @classmethod
    def decode(cls, data: bytes) -> CameraRecord:
        """From ``encode``'s bytes."""
        raw = json.loads(data)
        first, last = raw.get("first"), raw.get("last")
        return cls(
            frames=int(raw["frames"]), ticks=[int(t) for t in raw["ticks"]], missing=list(raw["missing"]),
            problems=[(int(i), str(p)) for i, p in raw["problems"]],
            first=(int(first[0]), float(first[1])) if first else None,
            last=(int(last[0]), float(last[1])) if last else None,
            missed_ticks=int(raw.get("missed_ticks", 0)), failed=bool(raw.get("failed", False)),
        )


@dataclass
class Merged:
    """A drive's "ended" marker content, merged from its cameras' records."""

    frame_counts: dict[str, int]
    ticks: set[int]
    missing: dict[str, list[str]]
    missed_ticks: dict[str, int]
    problems: list[str]
    first_utc: float | None
    last_utc: float | None


def merge(cameras: list[str], records: dict[str, CameraRecord]) -> Merged:
    """Merge the records of every camera of a drive.

    Parameters:
        cameras: the drive's cameras, in camera order.
        records: camera -> record, one for each of ``cameras``.

    Raises:
        KeyError: a camera has no record.
    """
    position = {c: CAMERAS.index(c) for c in cameras}
    ordered = [(c, records[c]) for c in cameras]
    problems = sorted(((i, position[c], text) for c, r in ordered for i, text in r.problems), key=lambda p: p[:2])
    firsts = [(r.first[0], position[c], r.first[1]) for c, r in ordered if r.first is not None]
    lasts = [(r.last[0], position[c], r.last[1]) for c, r in ordered if r.last is not None]
    return Merged(
        frame_counts={c: r.frames for c, r in ordered if not r.failed},
        ticks={t for _, r in ordered for t in r.ticks},
        missing={c: list(r.missing) for c, r in ordered if r.missing},
        missed_ticks={c: r.missed_ticks for c, r in ordered if r.missed_ticks},
        problems=[text for _, _, text in problems],
        first_utc=min(firsts)[2] if firsts else None,
        last_utc=max(lasts)[2] if lasts else None,
    )

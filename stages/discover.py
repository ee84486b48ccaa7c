"""Find drives in a footage folder: clips grouped by minute, minutes chained into drives.

Accepts a ``TeslaCam`` root (``RecentClips`` flat, ``SavedClips/<event>/``,
``SentryClips/<event>/``), a single event folder, or any folder of
``YYYY-MM-DD_HH-MM-SS-<camera>.mp4`` files (also the pre-2019 ``YYYY-MM-DD_HH-MM`` form).
Event folders repeat minutes that are still in ``RecentClips``: each (minute, camera) is
kept once, the ``RecentClips`` copy first. Encrypted clips and names that match no camera
are reported, never decoded. Pure: reads the file tree, calls no broker.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from stream.errors import FootageError
from stream.ids import drive_id
from stream.schemas import ClipRef, Job

CAMERAS = ("front", "back", "left_repeater", "right_repeater", "left_pillar", "right_pillar")
#: Old names of cameras, mapped to today's.
ALIASES = {"rear_view": "back"}
NAME = re.compile(r"^(?P<stamp>\d{4}-\d{2}-\d{2}_\d{2}-\d{2}(?:-\d{2})?)-(?P<camera>.+)\.mp4$", re.IGNORECASE)
STAMP_FORMAT = "%Y-%m-%d_%H-%M-%S"
#: Consecutive minutes of one drive start about 60.3–60.5 s apart; names have 1 s steps.
MAX_STEP_S = 75.0
#: Which copy of a repeated minute wins: the rolling buffer first, then saved, sentry.
SOURCE_RANK = {"recent": 0, "saved": 1, "sentry": 2, "other": 3}


@dataclass(frozen=True)
class ClipFile:
    """One camera's clip of one minute, as found on disk."""

    path: Path
    stamp: str  # normalised name timestamp, YYYY-MM-DD_HH-MM-SS
    camera: str
    source: str  # recent | saved | sentry | other
    event_dir: Path | None = None

    @property
    def start(self) -> datetime:
        """The clip's start from its name (the car's local clock)."""
        return datetime.strptime(self.stamp, STAMP_FORMAT)


@dataclass
class FoundDrive:
    """A chain of consecutive minutes: what one ingest job decodes."""

    drive_id: str
    root: str
    minutes: list[ClipRef]
    event: dict[str, str] | None = None

    @property
    def cameras(self) -> list[str]:
        """Every camera seen in any minute, in the canonical order."""
        seen = {camera for clip in self.minutes for camera in clip.files}
        return [c for c in CAMERAS if c in seen]

    def to_job(self, submitted_utc: float | None = None) -> Job:
        """The ingest job of this drive."""
        return Job(drive_id=self.drive_id, root=self.root, clips=self.minutes, event=self.event,
                   submitted_utc=submitted_utc)


@dataclass
class Discovery:
    """What a footage folder holds: drives, plus what cannot be used and why."""

    root: Path
    drives: list[FoundDrive] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    encrypted: list[Path] = field(default_factory=list)
    duplicates: int = 0  # minutes an event folder repeated


def parse_name(path: Path) -> tuple[str, str] | None:
    """``(stamp, camera)`` from a clip name, the stamp normalised to seconds; ``None`` if no match."""
    match = NAME.match(path.name)
    if match is None:
        return None
    stamp = match["stamp"] if len(match["stamp"]) == 19 else match["stamp"] + "-00"
    camera = match["camera"].lower()
    return stamp, ALIASES.get(camera, camera)


def _source_of(path: Path) -> tuple[str, Path | None]:
    parts = [p.lower() for p in path.parts]
    if "recentclips" in parts:
        return "recent", None
    for name, source in (("savedclips", "saved"), ("sentryclips", "sentry")):
        if name in parts:
            return source, path.parent
    if (path.parent / "event.json").exists():
        return "other", path.parent
    return "other", None


def _walk(root: Path, found: Discovery) -> list[ClipFile]:
    clips: list[ClipFile] = []
    paths = [root] if root.is_file() else _files(root, found)
    for path in paths:
        if path.suffix.lower() != ".mp4":
            continue
        if "encryptedclips" in (p.lower() for p in path.parts):
            found.encrypted.append(path)
            continue
        clip = _clip_file(path, found)
        if clip is not None:
            clips.append(clip)
    return clips


def _files(root: Path, found: Discovery) -> list[Path]:
    def on_error(exc: OSError) -> None:
        found.problems.append(f"{exc.filename}: cannot list folder ({exc.strerror})")

    paths = []
    for folder, dirs, names in os.walk(root, onerror=on_error):
        dirs.sort()
        paths.extend(Path(folder) / name for name in sorted(names))
    return paths


def _clip_file(path: Path, found: Discovery) -> ClipFile | None:
    parsed = parse_name(path)
    if parsed is None or parsed[1] not in CAMERAS:
        expected = ", ".join(CAMERAS)
        found.problems.append(
            f"{path}: name matches no camera (expected YYYY-MM-DD_HH-MM-SS-<camera>.mp4, camera one of {expected})"
        )
        return None
    source, event_dir = _source_of(path)
    return ClipFile(path, parsed[0], parsed[1], source, event_dir)


def _dedupe(clips: list[ClipFile], found: Discovery) -> dict[str, dict[str, ClipFile]]:
    minutes: dict[str, dict[str, ClipFile]] = {}
    for clip in sorted(clips, key=lambda c: (SOURCE_RANK[c.source], str(c.path))):
        cameras = minutes.setdefault(clip.stamp, {})
        if clip.camera in cameras:
            found.duplicates += 1
            continue
        cameras[clip.camera] = clip
    return minutes


def _chains(minutes: dict[str, dict[str, ClipFile]]) -> list[list[str]]:
    chains: list[list[str]] = []
    previous: datetime | None = None
    for stamp in sorted(minutes):
        start = datetime.strptime(stamp, STAMP_FORMAT)
        if previous is None or (start - previous).total_seconds() > MAX_STEP_S:
            chains.append([])
        chains[-1].append(stamp)
        previous = start
    return chains


def read_event(folder: Path) -> dict[str, str]:
    """Read an ``event.json``: numbers stay strings as the car writes them.

    Raises:
        FootageError: the file does not parse or is not an object.
    """
    path = folder / "event.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FootageError(path, f"unreadable event.json ({exc})") from exc
    if not isinstance(data, dict):
        raise FootageError(path, "event.json is not a JSON object")
    return {str(k): str(v) for k, v in data.items()}


def _event_for(chain: list[str], clips: list[ClipFile], found: Discovery) -> dict[str, str] | None:
    # An event belongs to a drive when its folder holds one of the drive's minutes,
    # whether or not that copy won the de-duplication.
    stamps = set(chain)
    folders = sorted({c.event_dir for c in clips if c.event_dir and c.stamp in stamps})
    for folder in folders:
        if (folder / "event.json").exists():
            try:
                return read_event(folder)
            except FootageError as exc:
                found.problems.append(str(exc))
    return None


def discover(path: str | Path) -> Discovery:
    """Find the drives under a footage folder (or one clip file).

    Parameters:
        path: a TeslaCam root, an event folder, a folder of clips, or one clip.

    Returns:
        Drives in time order (each with a stable id), plus problems: encrypted clips,
        names that match no camera, unreadable folders, bad event files.

    Raises:
        FootageError: the path does not exist.
    """
    root = Path(path).expanduser().resolve()
    if not root.exists():
        raise FootageError(root, "no such file or folder")
    found = Discovery(root)
    clips = _walk(root, found)
    minutes = _dedupe(clips, found)
    for chain in _chains(minutes):
        refs = [ClipRef(start=s, files={cam: str(minutes[s][cam].path) for cam in CAMERAS if cam in minutes[s]})
                for s in chain]
        first = next(minutes[chain[0]][c] for c in CAMERAS if c in minutes[chain[0]])
        ident = drive_id(str(first.path.parent), chain[0])
        found.drives.append(FoundDrive(ident, str(root), refs, _event_for(chain, clips, found)))
    _report_encrypted(found)
    return found


def _report_encrypted(found: Discovery) -> None:
    for folder in sorted({p.parent for p in found.encrypted}):
        count = sum(1 for p in found.encrypted if p.parent == folder)
        found.problems.append(
            f"{folder}: {count} encrypted clip(s) (EncryptedClips) cannot be decoded without the maker's key; skipped"
        )

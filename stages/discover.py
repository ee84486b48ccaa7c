"""Find drives in a footage folder: clips grouped by minute, minutes chained into drives.

Accepts a ``TeslaCam`` root (``RecentClips`` flat, ``SavedClips/<event>/``,
``SentryClips/<event>/``), a single event folder, or any folder of
``YYYY-MM-DD_HH-MM-SS-<camera>.mp4`` files (also the pre-2019 ``YYYY-MM-DD_HH-MM`` form).
Event folders repeat minutes that are still in ``RecentClips``: each (minute, camera) is
kept once, the ``RecentClips`` copy first. Encrypted clips and names that match no camera
are reported, never decoded. Pure: reads the file tree and the clips' headers, calls no
broker.

Time. Names are the car's local clock: a daylight-saving fall-back repeats an hour of
names, a time-zone crossing or clock jump shifts them. Minutes are therefore ordered and
chained into drives by their UTC start, the MP4 ``creation_time`` (GPS-based), and the name
is used only where no clip of a minute has one (shifted by the offset between names and
UTC that the drive's other minutes show). Clips of one name whose UTC starts lie apart are
different minutes.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import av

from stream.errors import FootageError
from stream.ids import drive_id
from stream.schemas import ClipRef, Job

CAMERAS = ("front", "back", "left_repeater", "right_repeater", "left_pillar", "right_pillar")
#: Old names of cameras, mapped to today's.
ALIASES = {"rear_view": "back"}
NAME = re.compile(r"^(?P<stamp>\d{4}-\d{2}-\d{2}_\d{2}-\d{2}(?:-\d{2})?)-(?P<camera>.+)\.mp4$", re.IGNORECASE)
STAMP_FORMAT = "%Y-%m-%d_%H-%M-%S"
#: An event folder (SavedClips/SentryClips) is named by its time.
EVENT_FOLDER = re.compile(r"^\d{4}-\d{2}-\d{2}_\d{2}-\d{2}(?:-\d{2})?$")
#: Consecutive minutes of one drive start about 60.3–60.5 s apart; names have 1 s steps.
MAX_STEP_S = 75.0
#: Which copy of a repeated minute wins: the rolling buffer first, then saved, sentry.
SOURCE_RANK = {"recent": 0, "saved": 1, "sentry": 2, "other": 3}
#: Clips of one name whose UTC starts lie further apart than this are different minutes.
SAME_MINUTE_S = 30.0


@dataclass(frozen=True)
class ClipFile:
    """One camera's clip of one minute, as found on disk."""

    path: Path
    stamp: str  # normalised name timestamp, YYYY-MM-DD_HH-MM-SS
    camera: str
    source: str  # recent | saved | sentry | other
    event_dir: Path | None = None
    utc: float | None = None  # MP4 creation_time, POSIX seconds

    @property
    def start(self) -> datetime:
        """The clip's start from its name (the car's local clock)."""
        return datetime.strptime(self.stamp, STAMP_FORMAT)


@dataclass
class _Minute:
    """The clips recorded together: one name, one UTC start (where known)."""

    stamp: str
    files: dict[str, ClipFile] = field(default_factory=dict)
    utc: float | None = None  # known or estimated UTC start

    @property
    def known_utc(self) -> float | None:
        times = [c.utc for c in self.files.values() if c.utc is not None]
        return min(times) if times else None


@dataclass
class FoundDrive:
    """A chain of consecutive minutes: what one ingest job decodes."""

    drive_id: str
    root: str
    minutes: list[ClipRef]
    event: dict[str, str] | None = None
    car_cameras: list[str] = field(default_factory=list)  # every camera seen in the footage folder

    @property
    def name(self) -> str:
        """The drive for people (``footage_name``)."""
        return footage_name(self.minutes)

    @property
    def cameras(self) -> list[str]:
        """Every camera seen in any minute, in the canonical order."""
        seen = {camera for clip in self.minutes for camera in clip.files}
        return [c for c in CAMERAS if c in seen]

    def to_job(self, submitted_utc: float | None = None) -> Job:
        """The ingest job of this drive."""
        return Job(drive_id=self.drive_id, root=self.root, clips=self.minutes, event=self.event,
                   submitted_utc=submitted_utc, car_cameras=self.car_cameras)


@dataclass
class Discovery:
    """What a footage folder holds: drives, plus what cannot be used and why."""

    root: Path
    drives: list[FoundDrive] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    encrypted: list[Path] = field(default_factory=list)
    duplicates: int = 0  # minutes an event folder repeated
    notes: list[str] = field(default_factory=list)  # worth saying, nothing skipped


def footage_name(clips: list[ClipRef]) -> str:
    """A drive's name for people: its event folder's name (``SavedClips/2024-05-01_10-00-00``)
    when its first clip lies in one, else the first clip's local time (its name's stamp)."""
    if not clips:
        return ""
    first = clips[0]
    folder = Path(next(iter(first.files.values()))).parent.name if first.files else ""
    return folder if EVENT_FOLDER.match(folder) else first.start


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
    with_clips = {p.parent for p in paths if p.suffix.lower() == ".mp4"}
    for path in paths:
        if path.name == "event.json" and path.parent not in with_clips:
            # The car deletes an event's clips before its event.json and thumbnail.
            found.problems.append(f"{path.parent}: event folder without clips (only its event.json is left)")
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
    return ClipFile(path, parsed[0], parsed[1], source, event_dir, creation_utc(path))


def footage_seconds(drive: FoundDrive) -> float:
    """How much footage a drive holds: the longest clip of each minute, summed (headers only).

    A clip that cannot be opened counts 0 (the decoder reports it).
    """
    total = 0.0
    for minute in drive.minutes:
        longest = 0.0
        for path in minute.files.values():
            try:
                with av.open(path) as container:
                    longest = max(longest, (container.duration or 0) / av.time_base)
            except (av.FFmpegError, OSError):
                continue
        total += longest
    return total


def creation_utc(path: Path) -> float | None:
    """A clip's MP4 ``creation_time`` as POSIX seconds (UTC); ``None`` if absent or unreadable.

    Only the header is read; a clip that cannot be opened is the decoder's to report.
    """
    try:
        with av.open(str(path)) as container:
            value = container.metadata.get("creation_time")
    except (av.FFmpegError, OSError):
        return None
    if not value:
        return None
    try:
        stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)).timestamp()


def _dedupe(clips: list[ClipFile], found: Discovery) -> list[_Minute]:
    minutes: dict[str, list[_Minute]] = {}
    for clip in sorted(clips, key=lambda c: (SOURCE_RANK[c.source], str(c.path))):
        same_name = minutes.setdefault(clip.stamp, [])
        minute = next((m for m in same_name if _same_minute(m, clip)), None)
        if minute is None:
            minute = _Minute(clip.stamp)
            same_name.append(minute)
        if clip.camera in minute.files:
            found.duplicates += 1
            continue
        minute.files[clip.camera] = clip
    return [m for group in minutes.values() for m in group]


def _same_minute(minute: _Minute, clip: ClipFile) -> bool:
    # A repeated name is one minute unless the clips' UTC starts say otherwise (DST fall-back).
    known = minute.known_utc
    return known is None or clip.utc is None or abs(known - clip.utc) <= SAME_MINUTE_S


def _place(minutes: list[_Minute]) -> None:
    """Give every minute a UTC start: its clips' own, else its name shifted by the
    median offset between names and UTC of the minutes that have one."""
    offsets = [m.known_utc - _naive_posix(m.stamp) for m in minutes if m.known_utc is not None]
    offset = statistics.median(offsets) if offsets else None
    for minute in minutes:
        known = minute.known_utc
        if known is not None:
            minute.utc = known
        elif offset is not None:
            minute.utc = _naive_posix(minute.stamp) + offset


def _naive_posix(stamp: str) -> float:
    return datetime.strptime(stamp, STAMP_FORMAT).replace(tzinfo=timezone.utc).timestamp()


def _chains(minutes: list[_Minute]) -> list[list[_Minute]]:
    chains: list[list[_Minute]] = []
    previous: float | None = None
    ordered = sorted(minutes, key=lambda m: (m.utc if m.utc is not None else _naive_posix(m.stamp), m.stamp))
    for minute in ordered:
        start = minute.utc if minute.utc is not None else _naive_posix(minute.stamp)
        if previous is None or start - previous > MAX_STEP_S:
            chains.append([])
        chains[-1].append(minute)
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


def _event_for(chain: list[_Minute], clips: list[ClipFile], found: Discovery) -> dict[str, str] | None:
    # An event belongs to a drive when its folder holds one of the drive's minutes,
    # whether or not that copy won the de-duplication.
    folders = sorted({c.event_dir for c in clips if c.event_dir and any(_same(c, m) for m in chain)})
    for folder in folders:
        if (folder / "event.json").exists():
            try:
                return read_event(folder)
            except FootageError as exc:
                found.problems.append(str(exc))
    return None


def _same(clip: ClipFile, minute: _Minute) -> bool:
    return clip.stamp == minute.stamp and _same_minute(minute, clip)


def discover(path: str | Path) -> Discovery:
    """Find the drives under a footage folder (or one clip file).

    Parameters:
        path: a TeslaCam root, an event folder, a folder of clips, or one clip.

    Returns:
        Drives in UTC order (each with a stable id; minutes carry their UTC start), plus
        problems: encrypted clips, names that match no camera, unreadable folders, bad
        event files; and notes (clock changes between drives).

    Raises:
        FootageError: the path does not exist.
    """
    root = Path(path).expanduser().resolve()
    if not root.exists():
        raise FootageError(root, "no such file or folder")
    found = Discovery(root)
    clips = _walk(root, found)
    minutes = _dedupe(clips, found)
    _place(minutes)
    chains = _chains(minutes)
    repeated = _repeated_names(chains)
    for chain in chains:
        refs = [ClipRef(start=m.stamp, files={cam: str(m.files[cam].path) for cam in CAMERAS if cam in m.files},
                        utc=m.utc) for m in chain]  # fmt: skip
        first = next(chain[0].files[c] for c in CAMERAS if c in chain[0].files)
        # Ids stay as they were (folder, first name) unless a clock change repeats the name.
        key = chain[0].stamp if chain[0].stamp not in repeated else f"{chain[0].stamp}@{chain[0].utc}"
        ident = drive_id(str(first.path.parent), key)
        found.drives.append(FoundDrive(ident, str(root), refs, _event_for(chain, clips, found)))
    car = [c for c in CAMERAS if any(c in m.files for m in minutes)]
    for drive in found.drives:
        drive.car_cameras = car
    _report_clock_changes(chains, found)
    _report_encrypted(found)
    return found


def _repeated_names(chains: list[list[_Minute]]) -> set[str]:
    firsts = [chain[0].stamp for chain in chains]
    return {s for s in firsts if firsts.count(s) > 1}


def _report_clock_changes(chains: list[list[_Minute]], found: Discovery) -> None:
    # Names that go back in time between drives ordered by UTC: say so, it explains the order.
    for before, after in zip(chains, chains[1:]):
        if before[-1].stamp >= after[0].stamp and after[0].utc is not None:
            found.notes.append(
                f"{after[0].files[next(iter(after[0].files))].path.parent}: clip names go back from "
                f"{before[-1].stamp} to {after[0].stamp} while their UTC times (MP4 creation_time) go on: "
                "the car's clock changed (daylight saving or time zone); drives are ordered by UTC"
            )


def _report_encrypted(found: Discovery) -> None:
    for folder in sorted({p.parent for p in found.encrypted}):
        count = sum(1 for p in found.encrypted if p.parent == folder)
        found.problems.append(
            f"{folder}: {count} encrypted clip(s) (EncryptedClips) cannot be decoded without the maker's key; skipped"
        )

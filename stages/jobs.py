"""Ingest jobs finer than a drive: one per camera, and for long drives one per span of minutes.

Each part keeps the drive's whole clip list (so it knows every camera of the drive and
where each minute starts) and names the cameras it decodes in ``Job.cameras``; a span
part also names its minutes in ``Job.span``.
"""

from __future__ import annotations

import hashlib

from stages.decode import minute_offsets
from stages.discover import CAMERAS
from stream.schemas import Job, Span

SPLITS = ("span", "camera", "drive")
#: Footage seconds per span job: long enough that a span's start (open, probe, first
#: keyframe) is a small share of its work, short enough that a 10-minute drive's six
#: cameras become 30 jobs for 16 processes.
SPAN_S = 120.0


def drive_cameras(job: Job) -> list[str]:
    """The drive's cameras in the fixed camera order (whatever part ``job`` is)."""
    return [c for c in CAMERAS if any(c in clip.files for clip in job.clips)]


def job_cameras(job: Job) -> list[str]:
    """The cameras this job decodes, in camera order."""
    cameras = drive_cameras(job)
    return [c for c in cameras if c in job.cameras] if job.cameras else cameras


def span_bounds(job: Job, span_s: float) -> list[tuple[int, int]]:
    """The drive's minutes cut into spans of at least ``span_s`` footage seconds.

    A span is whole minutes (clips), from the minutes' UTC offsets (``minute_offsets``):
    a new span starts at the first minute ``span_s`` or more after the current span's
    start. The last span may be shorter.

    Returns:
        ``(first, end)`` clip index ranges in time order; one range for a short drive, and
        for one whose minutes cannot be placed in time (its ingest job then fails and
        says why, as an unsplit one does).
    """
    try:
        offsets = minute_offsets(job)
    except ValueError:  # a clip name that is no time, without a UTC start
        return [(0, len(job.clips))]
    bounds, first = [], 0
    for index, offset in enumerate(offsets):
        if offset - offsets[first] >= span_s:
            bounds.append((first, index))
            first = index
    bounds.append((first, len(offsets)))
    return bounds


def split_job(job: Job, split: str = "camera", span_s: float = SPAN_S) -> list[Job]:
    """The jobs one drive becomes.

    Parameters:
        job: a whole drive's job.
        split: ``camera`` (one job per camera that has a clip), ``span`` (per camera, and
            per span of ``span_s`` footage seconds for a longer drive) or ``drive`` (the
            job itself).
        span_s: footage seconds per span (``split="span"``).

    Returns:
        The jobs: per camera in camera order; with spans, span by span (each span's
        cameras in camera order), so a drive's cameras advance together and earlier spans
        start first. A one-camera drive of one span stays one whole job.

    Raises:
        ValueError: ``split`` is not one of ``SPLITS``, or ``span_s`` is not positive.
    """
    if split not in SPLITS:
        message = f"split must be one of {', '.join(SPLITS)}, got {split!r}"
        raise ValueError(message)
    if span_s <= 0:
        message = f"span_s must be positive, got {span_s}"
        raise ValueError(message)
    cameras = drive_cameras(job)
    bounds = span_bounds(job, span_s) if split == "span" else [(0, len(job.clips))]
    if split == "drive" or (len(cameras) < 2 and len(bounds) < 2):
        return [job]
    if len(bounds) < 2:
        return [job.copy_with(cameras=[camera]) for camera in cameras]
    cut = hashlib.blake2b(repr(bounds).encode(), digest_size=4).hexdigest()
    return [
        job.copy_with(cameras=[camera], span=Span(index=k, count=len(bounds), first=first, end=end, cut=cut))
        for k, (first, end) in enumerate(bounds)
        for camera in cameras  # a camera with no clip in a span still gets it: it reports the gap
    ]


def part_name(job: Job) -> str:
    """What distinguishes the job among its drive's parts (for dedupe keys); "" for a whole drive.

    A span is named with its index and its cut (``Span.cut``): the same drive cut otherwise
    (another ``span_s``) is another chain (``workers.handlers.ingest_spans``), not spans
    that would join this one's.
    """
    name = ",".join(job_cameras(job)) if job.cameras else ""
    return f"{name}#{job.span.index}@{job.span.cut}" if job.span is not None else name

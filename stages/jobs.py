"""Ingest jobs finer than a drive: one per camera.

Each part keeps the drive's whole clip list (so it knows every camera of the drive and
where each minute starts) and names the cameras it decodes in ``Job.cameras``.
"""

from __future__ import annotations

from stages.discover import CAMERAS
from stream.schemas import Job

SPLITS = ("camera", "drive")


def drive_cameras(job: Job) -> list[str]:
    """The drive's cameras in the fixed camera order (whatever part ``job`` is)."""
    return [c for c in CAMERAS if any(c in clip.files for clip in job.clips)]


def job_cameras(job: Job) -> list[str]:
    """The cameras this job decodes, in camera order."""
    cameras = drive_cameras(job)
    return [c for c in cameras if c in job.cameras] if job.cameras else cameras


def split_job(job: Job, split: str = "camera") -> list[Job]:
    """The jobs one drive becomes.

    Parameters:
        job: a whole drive's job.
        split: ``camera`` (one job per camera that has a clip) or ``drive`` (the job itself).

    Returns:
        The jobs, in camera order; a one-camera drive stays one whole job.

    Raises:
        ValueError: ``split`` is not one of ``SPLITS``.
    """
    if split not in SPLITS:
        message = f"split must be one of {', '.join(SPLITS)}, got {split!r}"
        raise ValueError(message)
    cameras = drive_cameras(job)
    if split == "drive" or len(cameras) < 2:
        return [job]
    return [job.copy_with(cameras=[camera]) for camera in cameras]


def part_name(job: Job) -> str:
    """What distinguishes the job among its drive's parts (for dedupe keys); "" for a whole drive."""
    return ",".join(job_cameras(job)) if job.cameras else ""

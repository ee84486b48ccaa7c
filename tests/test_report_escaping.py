"""report.html escapes every name that came from Redis (cameras, drives, problems)."""

from __future__ import annotations

from stages.report import report_html
from stream.schemas import CameraFrame, DriveSummary, Verdict

EVIL = '<script>alert("x")</script>'


def test_names_from_redis_are_escaped_in_the_report() -> None:
    # Given a summary and a verdict whose camera, drive and problem carry markup
    frames = [CameraFrame(camera=EVIL, blob_key="k", t=0.0)]
    verdict = Verdict(drive_id=f"d{EVIL}", window=0, t_start=0.0, t_end=2.0, roadwork=True, confidence=0.9,
                      frames=frames, missing_cameras=[EVIL])  # fmt: skip
    summary = DriveSummary(drive_id=f"d{EVIL}", windows=1, roadwork_windows=1, cameras=[EVIL, "front"],
                           problems=[f"{EVIL}: broken"])  # fmt: skip

    # When the page is made
    page = report_html([verdict], [summary], {"k": b"not shown"})

    # Then no markup from them reaches the page (the page's own scripts, Leaflet and the
    # map's, are not theirs); their text does, escaped
    assert EVIL not in page and '<script>alert("x")' not in page
    assert "&lt;script&gt;alert" in page

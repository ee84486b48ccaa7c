"""The output folder: verdicts.jsonl, drives.geojson and the self-contained report.html."""

from __future__ import annotations

import base64
import json
import re

import cv2
import numpy as np

from stages.report import draw_boxes, read_verdicts, thumbnail_keys, write_report
from stream.schemas import CameraFrame, Detection, DriveSummary, RoadworkSpan, Verdict

BOX = Detection(type="cone", label="cone", score=0.8, box=(0.25, 0.25, 0.75, 0.75))


def jpeg(color: int = 40) -> bytes:
    image = np.full((120, 160, 3), color, np.uint8)
    return cv2.imencode(".jpg", image)[1].tobytes()


def verdict(window: int, roadwork: bool, drive: str = "d1") -> Verdict:
    frames = [CameraFrame(camera="front", blob_key=f"{drive}:front:{window}", t=window * 2.0, detections=[BOX])]
    return Verdict(
        drive_id=drive, window=window, t_start=window * 2.0, t_end=window * 2.0 + 2,
        roadwork=roadwork, confidence=0.9 if roadwork else 0.2, frames=frames,
    )  # fmt: skip


def summary(track) -> DriveSummary:
    span = RoadworkSpan(t_start=2.0, t_end=4.0, confidence=0.9, track=track, estimated=len(track) == 1)
    return DriveSummary(drive_id="d1", windows=3, roadwork_windows=1, spans=[span], cameras=["front"])


def test_the_three_files_are_written_and_verdicts_read_back(tmp_path):
    # Given three windows of one drive, the middle one roadwork, with a GPS track
    verdicts = [verdict(2, False), verdict(0, False), verdict(1, True)]
    # When the report is written
    paths = write_report(tmp_path / "out", verdicts, [summary([(30.0, -97.0), (30.001, -97.001)])], {})
    # Then verdicts.jsonl holds them in window order, and reads back the same
    assert [v.window for v in read_verdicts(paths["verdicts"])] == [0, 1, 2]
    assert read_verdicts(paths["verdicts"])[1] == verdicts[2]
    # and the span is a LineString in [lon, lat] order
    (feature,) = json.loads(paths["geojson"].read_text())["features"]
    assert feature["geometry"] == {"type": "LineString", "coordinates": [[-97.0, 30.0], [-97.001, 30.001]]}
    assert feature["properties"]["drive_id"] == "d1" and feature["properties"]["estimated"] is False


def test_an_estimated_position_is_a_point(tmp_path):
    # Given a span whose only position is the event's estimate
    paths = write_report(tmp_path, [verdict(1, True)], [summary([(30.2, -97.6)])])
    # Then its feature is a Point marked estimated
    (feature,) = json.loads(paths["geojson"].read_text())["features"]
    assert feature["geometry"]["type"] == "Point" and feature["properties"]["estimated"] is True


def test_report_embeds_a_timeline_and_thumbnails_of_roadwork_windows_only(tmp_path):
    # Given blobs for every window's key frame
    verdicts = [verdict(i, i == 1) for i in range(3)]
    images = {f"d1:front:{i}": jpeg() for i in range(3)}
    # When the report is written
    page = write_report(tmp_path, verdicts, [summary([])], images)["html"].read_text()
    # Then it has an inline SVG and exactly one embedded thumbnail (the roadwork window's)
    assert "<svg" in page and "<polyline" in page
    assert len(re.findall(r'src="data:image/jpeg;base64,', page)) == 1
    assert thumbnail_keys(verdicts) == ["d1:front:1"]
    # Self-contained: scripts and styles inline (only the map's tiles come from the network)
    assert "<script src" not in page and "<link" not in page and "<img src=\"http" not in page


def test_boxes_are_drawn_on_the_thumbnail():
    # Given a grey frame with one detection in its centre
    frame = CameraFrame(camera="front", blob_key="k", t=0.0, detections=[BOX])
    # When the thumbnail is drawn
    thumb = cv2.imdecode(np.frombuffer(draw_boxes(jpeg(), frame), np.uint8), cv2.IMREAD_COLOR)
    # Then the box's edge is orange, the centre stays grey
    h, w = thumb.shape[:2]
    edge = thumb[h // 2, round(w * 0.25)]
    centre = thumb[h // 2, w // 2]
    assert edge[2] > 200 and edge[0] < 80
    assert abs(int(centre[2]) - 40) < 15


def test_undecodable_blobs_are_left_out(tmp_path):
    # Given a blob that is not an image / Then no thumbnail, and the page still renders
    assert draw_boxes(b"not a jpeg", CameraFrame(camera="front", blob_key="k", t=0.0)) is None
    page = write_report(tmp_path, [verdict(1, True)], [], {"d1:front:1": b"junk"})["html"].read_text()
    assert "No roadwork key frames" in page and base64.b64encode(b"junk").decode() not in page


def test_the_report_names_skipped_files_and_windows_decided_without_a_camera(tmp_path):
    # Given verdicts where back had no frame in windows 1 and 2, and a skipped file
    verdicts = [verdict(0, False)] + [verdict(i, True).copy_with(missing_cameras=["back"]) for i in (1, 2)]
    summary = DriveSummary(drive_id="d1", windows=3, roadwork_windows=2, problems=["/f/x-back.mp4: holds no frames"])
    skipped = "/f/y-fisheye.mp4: name matches no camera"
    # When the report is written
    paths = write_report(tmp_path, verdicts, [summary], footage=[skipped])
    page = paths["html"].read_text()
    # Then it names the skipped file, the drive's problem and back's windows; drives.jsonl
    # carries the summary for machines
    assert skipped in page and "/f/x-back.mp4: holds no frames" in page
    assert "back: no frame in 2 of 3 windows (1–2)" in page
    assert DriveSummary.model_validate_json(paths["drives"].read_text()) == summary


def test_the_timeline_leaves_gaps_without_frames_undrawn():
    from stages.report_page import timeline_svg

    # Given windows 0-2 and 5-6 of a drive (no frame, hence no verdict, in windows 3 and 4) and a lone window 9
    svg = timeline_svg([verdict(i, False) for i in (0, 1, 2, 5, 6, 9)])
    # Then each run of windows is its own line, none across the gaps, and the lone window a dot
    lines = [[float(p.split(",")[0]) for p in pts.split()] for pts in re.findall(r'<polyline[^>]*points="([^"]*)"', svg)]
    assert [len(line) for line in lines] == [3, 2]
    assert lines[0][-1] < lines[1][0]
    assert len(re.findall(r'<circle class="point"', svg)) == 1

"""Outputs people expect: ``verdicts.csv`` beside the JSONL, ``--save-frames``' annotated
key frames, and ``classify`` over folders and video files, as a table or JSON."""

from __future__ import annotations

import csv
import json
from datetime import datetime, timezone

import cv2
import numpy as np
from click.testing import CliRunner

from fixtures.teslacam import ClipSpec, write_clip
from stages.report import CSV_COLUMNS, write_report
from stream.schemas import CameraFrame, Detection, Gps, Verdict
from workers.cli import _register_commands, cli

BOX = Detection(type="cone", label="cone", score=0.8, box=(0.25, 0.25, 0.75, 0.75))


def verdict(window: int, roadwork: bool) -> Verdict:
    frames = [CameraFrame(camera="front", blob_key=f"front:{window}", t=window * 2.0, detections=[BOX])]
    return Verdict(drive_id="d1", drive_name="2024-05-01_10-00-00", window=window, t_start=window * 2.0,
                   t_end=window * 2.0 + 2, start_utc=1_714_575_600.0 + window * 2, roadwork=roadwork,
                   confidence=0.9 if roadwork else 0.2, cameras=["front", "back"] if roadwork else [],
                   objects={"cone": 3} if roadwork else {}, gps=Gps(lat=30.2, lon=-97.6), frames=frames)  # fmt: skip


def jpeg(width: int = 320, height: int = 240) -> bytes:
    return cv2.imencode(".jpg", np.full((height, width, 3), 90, np.uint8))[1].tobytes()


def test_verdicts_csv_holds_every_verdict_beside_the_jsonl(tmp_path):
    # Given two windows / When written
    paths = write_report(tmp_path, [verdict(1, True), verdict(0, False)], [], {})
    # Then verdicts.csv has a header and one row a window, in window order, readable as CSV
    rows = list(csv.DictReader(paths["csv"].open()))
    assert paths["csv"] == tmp_path / "verdicts.csv" and tuple(rows[0]) == CSV_COLUMNS
    assert [(r["window"], r["roadwork"], r["objects"], r["cameras"]) for r in rows] == [
        ("0", "0", "", ""), ("1", "1", "cone=3", "front;back")]
    assert rows[1]["drive_name"] == "2024-05-01_10-00-00" and rows[1]["start_utc"] == "2024-05-01T15:00:02+00:00"
    assert (rows[1]["lat"], rows[1]["lon"]) == ("30.2", "-97.6")


def test_save_frames_writes_the_key_frames_full_size_with_their_boxes(tmp_path):
    # Given a roadwork window whose key frame is 320x240 / When written with save_frames
    paths = write_report(tmp_path, [verdict(0, True)], [], {"front:0": jpeg()}, save_frames=True)
    # Then one JPEG, named by drive name, window and camera, full size, with the box drawn
    (saved,) = sorted(paths["frames"].iterdir())
    assert saved.name == "2024-05-01_10-00-00_w0000_front.jpg"
    image = cv2.imread(str(saved))
    assert image.shape == (240, 320, 3)
    assert image[60, 120].tolist() != image[120, 160].tolist()  # the box edge differs from the inside


def test_classify_takes_a_folder_of_images_and_videos(tmp_path):
    # Given a folder with an image and a 3 s video
    folder = tmp_path / "pictures"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.full((120, 160, 3), 128, np.uint8))
    write_clip(folder / "b.mp4", "front", ClipSpec(duration_s=3.0, fps=10.0, sei=False),
               start_utc=datetime(2024, 5, 1, tzinfo=timezone.utc), t0_s=0.0)  # fmt: skip
    _register_commands()
    # When classified as JSON, a frame a second
    result = CliRunner().invoke(cli, ["classify", "--detector", "", "--every", "1", "--json", str(folder)])
    # Then the image, and frames at 0, 1 and 2 s of the video, with the fields kept
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [(r["image"].rsplit("/", 1)[1], r.get("video_time_s")) for r in rows] == [
        ("a.png", None), ("b.mp4", 0.0), ("b.mp4", 1.0), ("b.mp4", 2.0)]
    assert all({"image", "roadwork_probability", "roadwork", "scorer_probability", "objects"} <= set(r) for r in rows)
    # When printed as a table / Then one row a picture, the video frames named with their time
    table = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["classify", "--detector", "", str(folder)])
    assert table.exit_code == 0, table.output
    assert "4 pictures" in table.output and "b.mp4@2.0s" in table.output and "a.png" in table.output


def test_classify_names_a_path_that_is_not_there(tmp_path):
    _register_commands()
    result = CliRunner().invoke(cli, ["classify", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "nope: no such file or folder" in result.output


def test_save_video_cuts_each_roadwork_span_from_the_footage_with_its_verdicts(tmp_path):
    # Given a 6 s drive (10 fps, UTC start 15:00:00) with a roadwork span over 2-6 s
    from fixtures.teslacam import make_drive
    from stages.discover import discover
    from stages.span_video import write_span_videos
    from stream.schemas import DriveSummary, RoadworkSpan

    make_drive(tmp_path / "footage", cameras=("front", "back"), minutes=1, spec=ClipSpec(duration_s=6.0, fps=10.0))
    (drive,) = discover(tmp_path / "footage").drives
    start = drive.minutes[0].utc
    verdicts = [verdict(w, w >= 1).copy_with(drive_id=drive.drive_id, start_utc=start + 2 * w, end_utc=start + 2 * w + 2)
                for w in range(3)]  # fmt: skip
    spans = [RoadworkSpan(t_start=2.0, t_end=6.0, start_utc=start + 2, end_utc=start + 6, confidence=0.9),
             RoadworkSpan(t_start=8.0, t_end=9.0, confidence=0.9)]  # the second has no UTC time  # fmt: skip
    summary = DriveSummary(drive_id=drive.drive_id, drive_name=drive.name, windows=3, roadwork_windows=2, spans=spans)
    # When the span videos are written at 5 frames a second
    done = write_span_videos(tmp_path / "videos", {drive.drive_id: drive}, verdicts, [summary], fps=5.0)
    # Then one video of the supporting camera, 4 s = 20 frames, and a note for the span without UTC
    assert [p.name for p in done.paths] == [f"{drive.name}_span0_front.mp4"]
    import av

    with av.open(str(done.paths[0])) as video:
        assert sum(1 for _ in video.decode(video=0)) == 20
    assert done.notes == [f"{drive.name}_span1: no UTC time for the span; no video"]


def test_classify_names_a_bad_image_and_goes_on_with_the_others(tmp_path):
    # Given a folder of two images and, between them, a file named .jpg that is no image
    folder = tmp_path / "pictures"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.full((120, 160, 3), 128, np.uint8))
    (folder / "b.jpg").write_bytes(b"not a picture at all")
    cv2.imwrite(str(folder / "c.png"), np.full((120, 160, 3), 30, np.uint8))
    _register_commands()
    # When classified as JSON
    result = CliRunner().invoke(cli, ["classify", "--detector", "", "--json", str(folder)])
    # Then both images are classified, the bad file is an error entry in its place and named
    # on stderr, and the exit code says something failed
    assert result.exit_code == 1, result.output
    rows = json.loads(result.stdout)
    assert [r["image"].rsplit("/", 1)[1] for r in rows] == ["a.png", "b.jpg", "c.png"]
    assert "roadwork_probability" in rows[0] and "roadwork_probability" in rows[2]
    assert "not a readable image" in rows[1]["error"] and "roadwork_probability" not in rows[1]
    assert "b.jpg: not a readable image" in result.stderr and "1 of 3 files could not be classified" in result.stderr
    # When printed as a table / Then the two good ones are rows, the bad one named on stderr
    table = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["classify", "--detector", "", str(folder)])
    assert table.exit_code == 1 and "2 pictures" in table.stdout and "c.png" in table.stdout
    assert "b.jpg: not a readable image" in table.stderr

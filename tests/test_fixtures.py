"""The TeslaCam generator writes what it says: names, cameras, times, event, broken cases."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import av
import numpy as np
import pytest

from fixtures import teslacam as tc

FOOTAGE = Path("/work/shared/footage/roadwork/mi3_workzone_boston.mp4")


def test_a_drive_has_one_clip_per_camera_and_minute(tmp_path: Path) -> None:
    # Given a six-camera, two-minute drive with one camera minute missing
    drive = tc.make_drive(tmp_path, minutes=2, cameras=tc.CAMERAS, missing={(1, "back")})
    # When its folder is listed
    names = sorted(p.name for p in drive.folder.iterdir())
    # Then the names follow the car's pattern, minutes 60 s apart, 11 clips
    assert len(names) == 11
    assert "2024-05-01_10-01-00-left_pillar.mp4" in names
    assert "2024-05-01_10-01-00-back.mp4" not in names


def test_creation_time_is_utc_while_the_name_is_local(tmp_path: Path) -> None:
    # Given a drive recorded five hours behind UTC
    drive = tc.make_drive(tmp_path, minutes=1, cameras=("front",), utc_offset_h=-5)
    # When the clip's creation_time is read
    with av.open(str(drive.clip(0, "front"))) as clip:
        created = datetime.fromisoformat(clip.metadata["creation_time"].replace("Z", "+00:00"))
    # Then it is the name's time plus five hours
    assert created == datetime(2024, 5, 1, 15, 0, tzinfo=timezone.utc)


def test_event_json_keeps_numbers_as_strings(tmp_path: Path) -> None:
    # Given a saved event
    drive = tc.make_drive(tmp_path, minutes=1, layout="saved", cameras=("front",))
    # When its event.json is read
    event = json.loads((drive.folder / "event.json").read_text())
    # Then numbers are strings and the time has no zone
    assert event["est_lat"] == "30.2226" and event["camera"] == "0"
    assert event["timestamp"] == "2024-05-01T10:00:00"


@pytest.mark.skipif(not FOOTAGE.exists(), reason="shared footage not mounted")
def test_a_real_clip_can_be_a_cameras_content(tmp_path: Path) -> None:
    # Given the front camera showing a real work-zone clip, the back one synthetic
    drive = tc.make_drive(tmp_path, minutes=1, cameras=("front", "back"), sources={"front": FOOTAGE},
                          spec=tc.ClipSpec(duration_s=1.0, size=(192, 108)))
    # When a frame of each is decoded
    def first(camera: str) -> np.ndarray:
        with av.open(str(drive.clip(0, camera))) as clip:
            return next(clip.decode(video=0)).to_ndarray(format="rgb24")
    with av.open(str(FOOTAGE)) as clip:
        source = next(clip.decode(video=0)).reformat(192, 108).to_ndarray(format="rgb24")
    # Then the front shows the real picture (up to coding loss) and the back does not
    def distance(image: np.ndarray) -> float:
        return float(np.abs(image.astype(int) - source.astype(int)).mean())
    assert first("front").shape == (108, 192, 3)
    assert distance(first("front")) < 10 < distance(first("back"))
    # and it keeps the clip's own frame times (one frame per 1/30 s)
    with av.open(str(drive.clip(0, "front"))) as clip:
        times = [float(f.time) for f in clip.decode(video=0)]
    assert times == pytest.approx([i / 30 for i in range(30)], abs=1e-3)


def test_broken_cases_are_what_they_claim(tmp_path: Path) -> None:
    # Given clips broken by each helper
    drive = tc.make_drive(tmp_path, minutes=1, cameras=tc.FOUR, layout="flat",
                          specs={(0, "back"): tc.ClipSpec(codec="hevc"),
                                 (0, "left_repeater"): tc.ClipSpec(duration_s=3, keyint=1000)})
    size = drive.clip(0, "right_repeater").stat().st_size
    tc.truncate(drive.clip(0, "right_repeater"), 0.5)
    tc.zero_byte(drive.clip(0, "front"))
    # When they are inspected
    with av.open(str(drive.clip(0, "back"))) as clip:
        codec = clip.streams.video[0].codec_context.name
    with av.open(str(drive.clip(0, "left_repeater"))) as clip:
        keyframes = [p.pts for p in clip.demux(video=0) if p.is_keyframe]
    # Then each is broken the way it says
    assert codec == "hevc"
    assert keyframes == [0]
    assert drive.clip(0, "right_repeater").stat().st_size == size // 2
    assert drive.clip(0, "front").stat().st_size == 0

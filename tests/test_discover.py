"""Discovery: folders to drives to minute clip sets, with repeats dropped and bad names reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures import teslacam as tc
from stages.discover import discover, parse_name
from stream.errors import FootageError

TINY = tc.ClipSpec(duration_s=0.4, size=(64, 48))


def test_a_teslacam_root_yields_one_drive_per_chain_of_minutes(tmp_path: Path) -> None:
    # Given two drives in RecentClips, an hour apart
    tc.make_drive(tmp_path, start="2024-05-01_10-00-00", minutes=3, spec=TINY)
    tc.make_drive(tmp_path, start="2024-05-01_11-00-00", minutes=2, spec=TINY)
    # When the TeslaCam folder is discovered
    found = discover(tmp_path / "TeslaCam")
    # Then there are two drives in time order, with their minutes and four cameras each
    assert [len(d.minutes) for d in found.drives] == [3, 2]
    assert [d.minutes[0].start for d in found.drives] == ["2024-05-01_10-00-00", "2024-05-01_11-00-00"]
    assert all(d.cameras == list(tc.FOUR) for d in found.drives)


def test_minutes_an_event_folder_repeats_are_kept_once_with_the_event(tmp_path: Path) -> None:
    # Given RecentClips with three minutes and a SavedClips event repeating the last two
    tc.make_drive(tmp_path, start="2024-05-01_10-00-00", minutes=3, spec=TINY)
    tc.make_drive(tmp_path, start="2024-05-01_10-01-00", minutes=2, layout="saved", spec=TINY)
    # When discovered
    found = discover(tmp_path)
    # Then one drive of three minutes, eight clips counted as repeats, the event attached
    (drive,) = found.drives
    assert [m.start for m in drive.minutes] == ["2024-05-01_10-00-00", "2024-05-01_10-01-00", "2024-05-01_10-02-00"]
    assert all("RecentClips" in path for m in drive.minutes for path in m.files.values())
    assert found.duplicates == 8
    assert drive.event["est_lat"] == "30.2226"


def test_a_single_event_folder_is_a_drive(tmp_path: Path) -> None:
    # Given a Sentry event folder
    drive = tc.make_drive(tmp_path, minutes=2, layout="sentry", spec=TINY, cameras=tc.THREE)
    # When that folder alone is discovered
    found = discover(drive.folder)
    # Then it is one drive with the event's fields as strings
    (one,) = found.drives
    assert one.cameras == ["front", "left_repeater", "right_repeater"]
    assert one.event["reason"] == "user_interaction_dashcam_icon_tapped"


def test_old_names_and_the_rear_view_camera_are_understood() -> None:
    # Given a pre-2019 name and the early rear camera name
    # When parsed
    # Then the stamp gains seconds and rear_view is the back camera
    assert parse_name(Path("2018-11-02_09-15-rear_view.mp4")) == ("2018-11-02_09-15-00", "back")
    assert parse_name(Path("2024-05-01_10-00-00-left_pillar.mp4")) == ("2024-05-01_10-00-00", "left_pillar")


def test_names_that_match_no_camera_are_reported(tmp_path: Path) -> None:
    # Given a drive plus a clip of an unknown camera and a stray mp4
    drive = tc.make_drive(tmp_path, minutes=1, spec=TINY)
    bad = tc.bad_camera_name(drive.folder, drive.minutes[0])
    stray = drive.folder / "holiday.mp4"
    stray.write_bytes(b"x")
    # When discovered
    found = discover(tmp_path)
    # Then both are reported by name and the drive is unaffected
    assert any(p.startswith(f"{bad}: name matches no camera") for p in found.problems)
    assert any(p.startswith(f"{stray}: name matches no camera") for p in found.problems)
    assert found.drives[0].cameras == list(tc.FOUR)


def test_encrypted_clips_are_reported_not_queued(tmp_path: Path) -> None:
    # Given a drive and an EncryptedClips minute
    tc.make_drive(tmp_path, minutes=1, spec=TINY)
    paths = tc.encrypted_clips(tmp_path, "2024-05-01_12-00-00")
    # When discovered
    found = discover(tmp_path)
    # Then the encrypted files are listed and reported, and no drive holds them
    assert sorted(found.encrypted) == sorted(paths)
    assert any("4 encrypted clip(s)" in p for p in found.problems)
    assert [d.minutes[0].start for d in found.drives] == ["2024-05-01_10-00-00"]


def test_drive_ids_are_stable_and_depend_on_location(tmp_path: Path) -> None:
    # Given the same drive written in two places
    tc.make_drive(tmp_path / "a", minutes=1, spec=TINY)
    tc.make_drive(tmp_path / "b", minutes=1, spec=TINY)
    # When each is discovered twice
    a1, a2 = discover(tmp_path / "a").drives[0], discover(tmp_path / "a").drives[0]
    b = discover(tmp_path / "b").drives[0]
    # Then the id repeats for one place and differs between places
    assert a1.drive_id == a2.drive_id != b.drive_id


def test_a_folder_without_footage_has_no_drives(tmp_path: Path) -> None:
    # Given a folder with only a text file
    (tmp_path / "notes.txt").write_text("nothing here")
    # When discovered
    # Then there are no drives
    assert discover(tmp_path).drives == []


def test_a_missing_folder_is_an_error_naming_it(tmp_path: Path) -> None:
    # Given a path that does not exist
    # When discovered
    # Then the error names it
    with pytest.raises(FootageError, match="no such file or folder"):
        discover(tmp_path / "nope")


def _dst_fallback(root: Path) -> tuple[tc.Drive, tc.Drive]:
    # 01:00:10 and 01:01:10 CDT (UTC-5), then an hour later 01:00:40 .. 01:02:40 CST (UTC-6):
    # local names of the two drives interleave, their UTC times do not.
    first = tc.make_drive(root, start="2024-11-03_01-00-10", minutes=2, cameras=("front",), spec=TINY, utc_offset_h=-5)
    second = tc.make_drive(root, start="2024-11-03_01-00-40", minutes=3, cameras=("front",), spec=TINY, utc_offset_h=-6)
    return first, second


def test_drives_across_a_daylight_saving_fall_back_are_ordered_and_chained_by_utc(tmp_path: Path) -> None:
    # Given two drives an hour apart whose local clip names repeat (the clocks went back)
    first, second = _dst_fallback(tmp_path)
    # When discovered
    found = discover(tmp_path)
    # Then they are two drives, each with its own minutes in order, 60 s apart in UTC
    assert [[m.start for m in d.minutes] for d in found.drives] == [first.minutes, second.minutes]
    assert [[m.utc - d.minutes[0].utc for m in d.minutes] for d in found.drives] == [[0, 60], [0, 60, 120]]
    assert found.drives[1].minutes[0].utc - found.drives[0].minutes[0].utc == 3600 + 30
    # and the run is told why names go back
    assert any("clip names go back" in note for note in found.notes)


def test_a_repeated_clip_name_with_another_utc_time_is_another_minute(tmp_path: Path) -> None:
    # Given two drives whose first clips have the same local name, an hour apart in UTC
    tc.make_drive(tmp_path, start="2024-11-03_01-00-10", minutes=1, cameras=("front",), spec=TINY, utc_offset_h=-5)
    tc.make_drive(tmp_path / "b", start="2024-11-03_01-00-10", minutes=1, cameras=("front",), spec=TINY,
                  utc_offset_h=-6)  # fmt: skip
    # When discovered
    found = discover(tmp_path)
    # Then neither is dropped as a repeat, and they have different ids
    assert len(found.drives) == 2 and found.duplicates == 0
    assert found.drives[0].drive_id != found.drives[1].drive_id


def test_an_event_folder_whose_clips_are_gone_is_reported(tmp_path: Path) -> None:
    # Given a saved event with clips and one with only event.json and thumb.png left
    tc.make_drive(tmp_path, minutes=1, cameras=("front",), layout="saved", spec=TINY)
    gone = tc.clip_folder(tmp_path, "saved", "2024-05-02_09-00-00")
    gone.mkdir(parents=True)
    tc.write_event(gone, tc.default_event("2024-05-02_09-00-00"))
    # When discovered
    found = discover(tmp_path)
    # Then the empty event is named, the other is a drive
    assert len(found.drives) == 1
    assert found.problems == [f"{gone.resolve()}: event folder without clips (only its event.json is left)"]

"""The ingest worker on real Redis: generated drives in, ordered synced frame streams out."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from brokers.redis import RedisBlobStore, RedisBroker
from fixtures import teslacam as tc
from stages.discover import discover
from stages.frames import decode_jpeg
from stages.sei import to_telemetry
from stream import codec, names
from stream.schemas import DriveMarker, FrameRef, Job
from stream.settings import IngestSettings, Settings
from workers.handlers.ingest import build
from workers.runtime import Worker

pytestmark = pytest.mark.redis
NS = "rsingest"
SHORT = tc.ClipSpec(duration_s=1.0)


@dataclass
class Published:
    """Everything ingest published, by (drive, camera) partition order."""

    frames: dict[str, list[FrameRef]] = field(default_factory=lambda: defaultdict(list))
    kinds: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    drives: list[DriveMarker] = field(default_factory=list)
    dead: list = field(default_factory=list)
    entries: int = 0

    def ended(self) -> DriveMarker:
        """The drive's "ended" marker on the drives hop."""
        (marker,) = [m for m in self.drives if m.event == "ended"]
        return marker


async def _collect(broker: RedisBroker) -> Published:
    out = Published()
    for stream in await broker.streams(f"{NS}:frames:*"):
        for entry in await broker.range(stream, count=100_000):
            message = codec.decode(entry.data)
            out.entries += 1
            camera = message.camera
            out.kinds[camera].append(message.KIND if message.KIND == "frame" else message.event)
            if isinstance(message, FrameRef):
                out.frames[camera].append(message)
    out.drives = [codec.decode(e.data) for e in await broker.range(f"{NS}:drives", count=100)]
    out.dead = [codec.decode(e.data) for e in await broker.range(broker.dead_letter_stream, count=100)]
    return out


@pytest.fixture
async def ingest(redis_url: str, tmp_path: Path):
    """Run the ingest worker (burst) over jobs, through the real runtime; return what it published."""
    broker = RedisBroker(url=redis_url, namespace=NS)
    blobs = RedisBlobStore(redis_url, namespace=NS)

    async def run(jobs: list[Job], max_deliveries_for_test: int | None = None, **ingest_settings) -> Published:
        ingest_settings.setdefault("roots", [str(tmp_path)])  # the footage is not under the cwd
        settings = Settings(namespace=NS, ingest=IngestSettings(**ingest_settings))
        if max_deliveries_for_test is not None:
            settings.broker.max_deliveries = max_deliveries_for_test
        for job in jobs:
            await broker.publish(names.stream_name(names.JOBS, ns=NS), codec.encode(job))
        worker = Worker(build(settings, blobs), broker, blobs, settings, burst=True)
        await asyncio.wait_for(worker.run(), 60)
        published = await _collect(broker)
        published.blobs = blobs
        return published

    yield run
    await broker.close()
    await blobs.close()


def _jobs(root: Path) -> list[Job]:
    return [drive.to_job() for drive in discover(root).drives]


@pytest.mark.parametrize("cameras", [tc.CAMERAS, tc.FOUR, tc.THREE], ids=["six", "four", "three"])
async def test_each_camera_gets_its_frames_in_order_between_markers(tmp_path: Path, ingest, cameras) -> None:
    # Given a two-minute drive of six, four or three cameras
    tc.make_drive(tmp_path, minutes=2, cameras=cameras, spec=SHORT)
    # When ingested
    out = await ingest(_jobs(tmp_path))
    # Then each camera's partition reads started, its frames with seq 0..n-1, ended
    assert sorted(out.frames) == sorted(cameras)
    for camera in cameras:
        seqs = [f.seq for f in out.frames[camera]]
        assert out.kinds[camera] == ["started"] + ["frame"] * 10 + ["ended"]
        assert seqs == list(range(10))
    assert out.ended().frame_counts == {c: 10 for c in cameras}
    assert out.ended().missing == {} and out.ended().problems == []


async def test_frame_pixels_are_in_the_blob_store(tmp_path: Path, ingest) -> None:
    # Given a drive at 320x240, ingested with a long side of 160
    tc.make_drive(tmp_path, minutes=1, cameras=("front",), spec=tc.ClipSpec(duration_s=0.6, size=(320, 240)))
    out = await ingest(_jobs(tmp_path), long_side=160)
    # When a frame's blob is fetched
    frame = out.frames["front"][0]
    blob = await out.blobs.get(frame.blob_key)
    # Then it is a JPEG of the published size
    assert decode_jpeg(blob).shape == (frame.height, frame.width, 3) == (120, 160, 3)
    assert frame.nbytes == len(blob)


async def test_a_missing_camera_minute_is_reported_and_the_others_go_on(tmp_path: Path, ingest) -> None:
    # Given a drive whose back camera lacks the second minute
    drive = tc.make_drive(tmp_path, minutes=2, spec=SHORT, missing={(1, "back")})
    # When ingested
    out = await ingest(_jobs(tmp_path))
    # Then the marker names the minute, back has one minute of frames, the rest two
    assert out.ended().missing == {"back": [drive.minutes[1]]}
    assert out.ended().frame_counts == {"front": 10, "back": 5, "left_repeater": 10, "right_repeater": 10}


async def test_cameras_of_unequal_length_keep_all_their_ticks(tmp_path: Path, ingest) -> None:
    # Given one minute where the front clip runs 2 s and the back clip 1 s
    specs = {(0, "front"): tc.ClipSpec(duration_s=2.0), (0, "back"): tc.ClipSpec(duration_s=1.0)}
    tc.make_drive(tmp_path, minutes=1, cameras=("front", "back"), specs=specs)
    # When ingested
    out = await ingest(_jobs(tmp_path))
    # Then front has ticks 0..9, back 0..4, on the same tick times, no problem reported
    assert [f.tick for f in out.frames["front"]] == list(range(10))
    assert [f.tick for f in out.frames["back"]] == list(range(5))
    assert out.ended().problems == []


def _minute_offset(frame: FrameRef, first: str) -> float:
    fmt = "%Y-%m-%d_%H-%M-%S"
    return (datetime.strptime(frame.clip, fmt) - datetime.strptime(first, fmt)).total_seconds()


async def test_every_tick_is_in_sync_within_half_a_frame_interval(tmp_path: Path, ingest) -> None:
    # Given cameras at 36, 30, 24 and 29.97 fps over two minutes
    rates = {"front": 36.0, "back": 30.0, "left_repeater": 24.0, "right_repeater": 30000 / 1001}
    specs = {(m, c): tc.ClipSpec(duration_s=1.2, fps=fps) for m in range(2) for c, fps in rates.items()}
    drive = tc.make_drive(tmp_path, minutes=2, specs=specs)
    # When ingested
    out = await ingest(_jobs(tmp_path))
    # Then every published frame lies within half its camera's frame interval of its tick,
    # and cameras sharing a tick share its time
    by_tick = defaultdict(set)
    for camera, frames in out.frames.items():
        for frame in frames:
            tick_in_clip = frame.t - _minute_offset(frame, drive.minutes[0])
            assert abs(frame.pts - tick_in_clip) < 0.5 / rates[camera] + 1e-6
            by_tick[frame.tick].add(frame.t)
    assert all(len(times) == 1 for times in by_tick.values())
    assert len(by_tick) == 12


async def test_published_telemetry_is_what_the_generator_wrote(tmp_path: Path, ingest) -> None:
    # Given a drive with telemetry on every frame
    drive = tc.make_drive(tmp_path, minutes=2, cameras=tc.THREE, spec=SHORT)
    # When ingested
    out = await ingest(_jobs(tmp_path))
    # Then each frame's telemetry is the one written for that frame's time
    checked = 0
    for camera, frames in out.frames.items():
        for frame in frames:
            written = drive.clips[(drive.minutes.index(frame.clip), camera)].telemetry
            assert frame.telemetry == to_telemetry(written[frame.pts])
            checked += 1
    assert checked == 30


async def test_without_telemetry_the_event_estimate_is_used(tmp_path: Path, ingest) -> None:
    # Given a saved event whose clips carry no SEI
    tc.make_drive(tmp_path, minutes=1, cameras=("front",), layout="saved", spec=tc.ClipSpec(duration_s=0.6, sei=False))
    # When ingested
    out = await ingest(_jobs(tmp_path))
    # Then frames carry the event's position, marked as an estimate
    telemetry = out.frames["front"][0].telemetry
    assert (telemetry.lat, telemetry.lon, telemetry.estimated) == (30.2226, -97.6188, True)
    assert out.ended().est_lat == 30.2226


async def test_broken_clips_are_reported_by_name_and_the_rest_goes_on(tmp_path: Path, ingest) -> None:
    # Given a three-minute drive with every kind of broken clip
    specs = {(1, "back"): tc.ClipSpec(duration_s=1.0, codec="hevc"),
             (1, "left_repeater"): tc.ClipSpec(duration_s=1.0, keyint=1000),
             (2, "front"): tc.ClipSpec(duration_s=1.0, faststart=True)}
    drive = tc.make_drive(tmp_path, minutes=3, spec=SHORT, specs=specs)
    empty = tc.zero_byte(drive.clip(0, "front"))
    garbage = tc.not_a_video(drive.clip(0, "back"))
    cut = tc.truncate(drive.clip(2, "front"), 0.5)
    # When ingested
    out = await ingest(_jobs(tmp_path))
    problems = out.ended().problems
    # Then each unusable file is named with its problem, the H.265 and keyframe-less
    # clips are decoded, and the other cameras have all their frames
    assert f"{empty}: empty file (0 bytes): the clip was never written" in problems
    assert any(p.startswith(f"{garbage}: not a readable video") for p in problems)
    assert any(p.startswith(f"{cut}: truncated clip") for p in problems)
    assert len(problems) == 3
    counts = out.ended().frame_counts
    assert counts["back"] == 10 and counts["left_repeater"] == 15 and counts["right_repeater"] == 15
    assert 5 < counts["front"] < 10  # minute 2 only, cut short
    assert out.ended().missing == {"front": [drive.minutes[0]], "back": [drive.minutes[0]]}


async def test_rerunning_a_job_publishes_nothing_twice(tmp_path: Path, ingest) -> None:
    # Given a drive ingested once
    tc.make_drive(tmp_path, minutes=1, cameras=tc.THREE, spec=SHORT)
    first = await ingest(_jobs(tmp_path))
    # When the same job is put on the jobs hop and ingested again
    second = await ingest(_jobs(tmp_path))
    # Then the frame partitions and the drives hop hold the same entries as before
    assert second.entries == first.entries == 3 * (5 + 2)
    assert len(second.drives) == 2


async def test_footage_outside_the_roots_is_dead_lettered(tmp_path: Path, ingest) -> None:
    # Given allowed roots that do not hold the drive
    tc.make_drive(tmp_path / "elsewhere", minutes=1, cameras=("front",), spec=SHORT)
    (tmp_path / "allowed").mkdir()
    # When ingested
    out = await ingest(_jobs(tmp_path / "elsewhere"), roots=[str(tmp_path / "allowed")])
    # Then nothing is published and the job is a dead letter naming the file
    assert out.entries == 0
    (letter,) = out.dead
    assert "outside the allowed footage roots" in letter.error and "front.mp4" in letter.error


def _cli():
    from workers.cli import cli
    from workers.cli.ingest import register

    if "submit" not in cli.commands:
        register(cli)
    return cli


def test_submit_refuses_a_folder_without_footage(tmp_path: Path, redis_url: str) -> None:
    # Given an empty folder
    # When submitted
    result = CliRunner().invoke(_cli(), ["submit", str(tmp_path), "--redis", redis_url])
    # Then the command says so and exits with code 2
    assert result.exit_code == 2
    assert "no TeslaCam footage found" in result.output


async def test_submit_queues_one_job_per_drive_once(tmp_path: Path, redis_url: str) -> None:
    # Given two drives
    tc.make_drive(tmp_path, start="2024-05-01_10-00-00", minutes=1, cameras=("front",), spec=SHORT)
    tc.make_drive(tmp_path, start="2024-05-01_12-00-00", minutes=1, cameras=("front",), spec=SHORT)
    # When the folder is submitted twice
    for _ in range(2):
        result = await asyncio.to_thread(
            CliRunner().invoke, _cli(), ["--set", f"namespace={NS}", "submit", str(tmp_path), "--redis", redis_url]
        )
        assert result.exit_code == 0, result.output
    # Then the jobs hop holds one job per drive
    broker = RedisBroker(url=redis_url, namespace=NS)
    jobs = [codec.decode(e.data) for e in await broker.range(f"{NS}:jobs")]
    await broker.close()
    assert sorted(j.clips[0].start for j in jobs) == ["2024-05-01_10-00-00", "2024-05-01_12-00-00"]


async def test_header_only_and_absent_clips_are_named_in_the_drive_marker(tmp_path: Path, ingest) -> None:
    # Given a two-minute drive: minute 1's back clip holds a header and no frame, and
    # minute 1 has no left_repeater clip at all
    drive = tc.make_drive(tmp_path, minutes=2, spec=SHORT, missing={(1, "left_repeater")})
    empty = tc.header_only(drive.clip(1, "back"))
    # When ingested
    ended = (await ingest(_jobs(tmp_path))).ended()
    # Then the marker names the header-only file and the absent camera's minute, and
    # lists both minutes as missing for machines
    assert f"{empty}: holds no frames ({empty.stat().st_size} bytes: a header and no video; " \
           "the clip was never written)" in ended.problems
    assert any(p.startswith("left_repeater: no clip in 1 of 2 minute(s)") and drive.minutes[1] in p
               for p in ended.problems)
    assert ended.missing == {"back": [drive.minutes[1]], "left_repeater": [drive.minutes[1]]}


async def test_ticks_a_variable_rate_camera_has_no_frame_for_are_counted_and_named(tmp_path: Path, ingest) -> None:
    # Given a camera whose stream has a 1 s hole (frames every 28 ms around it)
    spec = tc.ClipSpec(duration_s=2.5, fps=35.7, gaps_ms=(28,) * 40 + (1000,))
    drive = tc.make_drive(tmp_path, minutes=1, cameras=("front",), spec=spec)
    # When ingested at 5 ticks per second
    ended = (await ingest(_jobs(tmp_path))).ended()
    # Then the five ticks inside the hole are counted and the file is named
    assert ended.missed_ticks == {"front": 5}
    assert any(p.startswith(f"{drive.clip(0, 'front')}: 5 tick(s) had no frame") for p in ended.problems)


async def test_clips_are_placed_by_their_utc_times_not_by_their_local_names(tmp_path: Path, ingest) -> None:
    # Given a drive whose clip names step 1 s (a clock that jumped) while each 2 s clip's
    # MP4 creation_time (UTC) starts 2 s after the one before
    start = datetime(2024, 5, 1, 15, 0, 0, tzinfo=timezone.utc)
    specs = {(m, c): tc.ClipSpec(duration_s=2.0, creation_utc=start + timedelta(seconds=2 * m))
             for m in range(3) for c in tc.THREE}  # fmt: skip
    tc.make_drive(tmp_path, minutes=3, cameras=tc.THREE, specs=specs, step_s=1)
    # When ingested
    out = await ingest(_jobs(tmp_path))
    # Then no clip is cut at the next name: every camera has all 30 ticks, on UTC time
    assert out.ended().frame_counts == {c: 30 for c in tc.THREE}
    assert [f.tick for f in out.frames["front"]] == list(range(30))
    assert [round(f.utc - start.timestamp(), 3) for f in out.frames["front"]][::10] == [0.0, 2.0, 4.0]


@pytest.mark.parametrize("decoder", ["pyav", "decord"])
async def test_a_rotated_clip_is_published_upright(tmp_path: Path, ingest, decoder: str) -> None:
    # Given a clip coded sideways (120x160) with a -90 degree display rotation
    spec = tc.ClipSpec(duration_s=0.4, size=(160, 120), rotation=-90)
    tc.make_drive(tmp_path, minutes=1, cameras=("front",), spec=spec)
    # When ingested with the decoder
    out = await ingest(_jobs(tmp_path), decoder=decoder, long_side=160)
    # Then the stored frames are upright, as a player shows them
    frame = out.frames["front"][0]
    image = decode_jpeg(await out.blobs.get(frame.blob_key))
    upright = tc.upright_frame(spec, "front", 0)
    assert (frame.width, frame.height) == (160, 120) and image.shape == upright.shape
    assert abs(image.astype(int) - upright).mean() < 8


async def test_a_truncated_clip_keeps_its_frames_with_decord_and_says_how_many_were_lost(
    tmp_path: Path, ingest
) -> None:
    # Given a fast-start clip cut to 60% of its bytes
    drive = tc.make_drive(tmp_path, minutes=1, cameras=("front",), spec=tc.ClipSpec(duration_s=3.0, faststart=True))
    cut = tc.truncate(drive.clip(0, "front"), 0.6)
    # When ingested with decord
    ended = (await ingest(_jobs(tmp_path), decoder="decord")).ended()
    # Then the frames before the cut are published and the file is named with the loss
    assert ended.frame_counts["front"] > 5
    assert any(p.startswith(f"{cut}: truncated clip: decoded") and "lost" in p for p in ended.problems)
    assert any(p.startswith(f"{cut}: decord could not read it") for p in ended.problems)


async def test_a_job_dead_lettered_for_good_ends_its_drive_with_the_failure_named(tmp_path: Path, ingest) -> None:
    # Given a drive's job whose clip name cannot be read as a time (and no UTC to go by),
    # with one delivery allowed
    tc.make_drive(tmp_path, minutes=1, cameras=tc.THREE, spec=SHORT)
    (job,) = _jobs(tmp_path)
    broken = job.model_copy(update={"clips": [job.clips[0].model_copy(update={"start": "no-time", "utc": None})]})
    # When ingested and it fails
    out = await ingest([broken], max_deliveries_for_test=1)
    # Then the job is a dead letter and every camera's partition carries an "ended" marker
    # that names the failure, so fuse need not wait for the drive
    (letter,) = out.dead
    assert "no-time" in letter.error
    (ended,) = [m for m in out.drives if m.event == "ended"]
    assert any("ingest of this drive failed and was dead-lettered" in p and "no-time" in p for p in ended.problems)
    assert all(kinds[-1] == "ended" for kinds in out.kinds.values()) and sorted(out.kinds) == sorted(tc.THREE)


async def test_a_drive_without_some_of_the_cars_cameras_says_which(tmp_path: Path, ingest) -> None:
    # Given a folder with a six-camera drive and, later, a drive of front and back only
    tc.make_drive(tmp_path, minutes=1, cameras=tc.CAMERAS, spec=SHORT)
    late = tc.make_drive(tmp_path, start="2024-05-01_11-00-00", minutes=1, cameras=("front", "back"), spec=SHORT)
    # When both are ingested
    out = await ingest(_jobs(tmp_path))
    # Then the second drive's marker names the four cameras that recorded nothing in it
    (ended,) = [m for m in out.drives if m.event == "ended" and m.cameras == ["front", "back"]]
    absent = sorted(p.split(":")[0] for p in ended.problems if "the camera did not record them" in p)
    assert absent == ["left_pillar", "left_repeater", "right_pillar", "right_repeater"]
    assert all(late.minutes[0] in p for p in ended.problems)
    assert sorted(ended.missing) == absent


async def test_a_bad_job_among_good_ones_fails_alone_with_its_own_reason(tmp_path: Path, ingest) -> None:
    # Given, in one batch, two good drives' jobs around a job whose clip name cannot be
    # read as a time (an unexpected error in the stage), a job naming /etc/passwd and one
    # whose path climbs out of the footage folder with ../..
    footage = tmp_path / "footage"
    tc.make_drive(footage, minutes=1, cameras=("front",), spec=SHORT)
    tc.make_drive(footage, start="2024-05-01_11-00-00", minutes=1, cameras=("front",), spec=SHORT)
    first, second = _jobs(footage)
    clip = first.clips[0]
    broken = first.model_copy(update={"drive_id": "broken", "clips": [clip.model_copy(update={"start": "no-time", "utc": None})]})
    passwd = first.model_copy(update={"drive_id": "passwd", "clips": [clip.model_copy(update={"files": {"front": "/etc/passwd"}})]})
    climbing = f"{footage}/../../{clip.files['front']}"
    escape = first.model_copy(update={"drive_id": "escape", "clips": [clip.model_copy(update={"files": {"front": climbing}})]})

    # When ingested (one delivery allowed, so a failure is final)
    out = await ingest([first, broken, passwd, escape, second], max_deliveries_for_test=1, roots=[str(footage)])

    # Then only the three bad jobs are dead letters, each with its own reason
    errors = {codec.decode(letter.raw, Job).drive_id: letter.error for letter in out.dead}
    assert sorted(errors) == ["broken", "escape", "passwd"], errors
    assert "no-time" in errors["broken"]
    assert "/etc/passwd: outside the allowed footage roots" in errors["passwd"]
    assert "outside the allowed footage roots" in errors["escape"]
    # and both good drives were ingested and ended, once each
    ended = sorted(m.drive_id for m in out.drives if m.event == "ended")
    assert ended == sorted([first.drive_id, second.drive_id, "broken"])  # the broken one ends, naming its failure
    assert out.frames["front"]


async def test_a_worker_without_roots_dead_letters_footage_outside_the_current_folder(tmp_path: Path, ingest) -> None:
    # Given a drive outside the current folder, and no ingest.roots
    tc.make_drive(tmp_path, minutes=1, cameras=("front",), spec=SHORT)
    assert not tmp_path.resolve().is_relative_to(Path.cwd().resolve())
    # When its job is ingested
    out = await ingest(_jobs(tmp_path), roots=[])
    # Then it is a dead letter whose reason names the rule, and nothing was published
    (letter,) = out.dead
    assert "outside the allowed footage roots (none configured: only the current folder" in letter.error
    assert not out.frames and not out.drives

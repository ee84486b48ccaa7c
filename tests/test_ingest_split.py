"""A drive ingested as per-camera jobs by two workers, against the same drive as one job.

Real Redis (the tests' private servers), the real ingest handler and runtime: each
namespace gets its own streams, so the two ingests can be compared entry by entry.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from brokers.redis import RedisBlobStore, RedisBroker
from fixtures import teslacam as tc
from stages.discover import discover
from stages.jobs import part_name, span_bounds, split_job
from stream import codec, names
from stream.schemas import ClipRef, FrameRef, Job
from stream.settings import IngestSettings, Settings
from workers.handlers.ingest import build
from workers.handlers.ingest_parts import CameraRecord, merge
from workers.runtime import Worker

pytestmark = pytest.mark.redis
SHORT = tc.ClipSpec(duration_s=1.0)


async def _ingest(
    redis_url: str, ns: str, jobs: list[Job], workers: int, max_deliveries: int | None = None, parallel_clips: int = 1
) -> dict:
    """Run ``workers`` burst ingest workers over the jobs; everything published, by stream."""
    broker = RedisBroker(url=redis_url, namespace=ns)
    blobs = RedisBlobStore(redis_url, namespace=ns)
    # The footage is not under the cwd: its folders are the roots.
    roots = sorted({str(Path(p).resolve().parent) for job in jobs for clip in job.clips for p in clip.files.values()})
    settings = Settings(namespace=ns, ingest=IngestSettings(roots=roots, parallel_clips=parallel_clips))
    if max_deliveries is not None:  # and one job a batch: a failed batch fails all its jobs
        settings.broker.max_deliveries = max_deliveries
        settings.worker.batch_size = 1
    try:
        for job in jobs:
            await broker.publish(names.stream_name(names.JOBS, ns=ns), codec.encode(job))
        running = [Worker(build(settings, blobs), broker, blobs, settings, burst=True) for _ in range(workers)]
        await asyncio.wait_for(asyncio.gather(*(w.run() for w in running)), 120)
        out: dict = {}
        for stream in [*await broker.streams(f"{ns}:frames:*"), f"{ns}:drives"]:
            for entry in await broker.range(stream, count=100_000):
                message = codec.decode(entry.data)
                # The publishing time differs between runs; everything else must not.
                # Blob keys may differ (a span's name it); the pixels they hold must not.
                if isinstance(message, FrameRef):
                    pixels = await blobs.get(message.blob_key)
                    assert pixels is not None, message.blob_key
                    message = message.copy_with(ingested_utc=None, blob_key=hashlib.sha256(pixels).hexdigest())
                # Cameras may share a partition; the order promised is per (drive, camera).
                out.setdefault((stream.removeprefix(ns), message.camera), []).append(message)
        out["dead"] = await broker.range(broker.dead_letter_stream, count=10)
        return out
    finally:
        await broker.close()
        await blobs.close()


def assert_same(one: dict, split: dict) -> object:
    """Both ingests published the same entries in the same order on every partition and
    the drives hop, none dead-lettered, and the drives hop one "started" and one "ended";
    returns that "ended" marker."""
    assert one["dead"] == split["dead"] == []
    assert sorted(one, key=str) == sorted(split, key=str)
    for stream in one:
        assert split[stream] == one[stream], stream
    assert [m.event for m in split[(":drives", None)]] == ["started", "ended"]
    return one[(":drives", None)][-1]


async def test_a_drive_split_per_camera_yields_the_frames_order_and_markers_of_the_whole_drive(
    tmp_path: Path, redis_url: str
) -> None:
    # Given a three-minute six-camera drive with a missing camera minute and broken clips
    drive = tc.make_drive(tmp_path, minutes=3, cameras=tc.CAMERAS, spec=SHORT, missing={(1, "back")})
    tc.zero_byte(drive.clip(0, "front"))
    tc.truncate(drive.clip(2, "left_pillar"), 0.5)
    (whole,) = [d.to_job() for d in discover(tmp_path).drives]
    parts = split_job(whole, "camera")
    assert [p.cameras for p in parts] == [[c] for c in tc.CAMERAS]
    # When ingested as one job by one worker, and as per-camera jobs by two workers
    one = await _ingest(redis_url, "rswhole", [whole], workers=1)
    split = await _ingest(redis_url, "rssplit", parts, workers=2)
    # Then every partition holds the same entries in the same order, markers included,
    # and the drives hop holds one "started" and one "ended", equal to the whole drive's
    ended = assert_same(one, split)
    assert ended.problems and ended.missing and sum(ended.frame_counts.values()) > 0


async def test_clips_decoded_in_parallel_publish_the_frames_order_and_markers_of_one_after_another(
    tmp_path: Path, redis_url: str
) -> None:
    # Given a four-minute drive of three cameras with a missing camera minute, a zero-byte
    # clip and a truncated one
    drive = tc.make_drive(tmp_path, minutes=4, cameras=tc.THREE, spec=SHORT, missing={(1, "front")})
    tc.zero_byte(drive.clip(2, "left_repeater"))
    tc.truncate(drive.clip(3, "front"), 0.5)
    (whole,) = [d.to_job() for d in discover(tmp_path).drives]
    # When ingested with clips one after another, and three at a time (whole and per camera)
    one = await _ingest(redis_url, "rsseq", [whole], workers=1)
    par = await _ingest(redis_url, "rspar", [whole], workers=1, parallel_clips=3)
    parts = await _ingest(redis_url, "rsparts", split_job(whole, "camera"), workers=2, parallel_clips=3)
    # Then every partition and the drives hop hold the same entries in the same order
    assert one["dead"] == par["dead"] == parts["dead"] == []
    assert sorted(one, key=str) == sorted(par, key=str) == sorted(parts, key=str)
    for stream in one:
        assert par[stream] == one[stream] == parts[stream], stream
    ended = one[(":drives", None)][-1]
    assert ended.problems and ended.missing and sum(ended.frame_counts.values()) > 0


async def test_a_split_drive_reports_the_problems_absences_and_missed_ticks_of_the_whole_drive(
    tmp_path: Path, redis_url: str
) -> None:
    # Given a folder with a six-camera drive and, later, a two-minute drive of three cameras
    # with: a 1 s hole in front's stream (missed ticks), left_repeater's telemetry without a
    # GPS fix, a header-only right_repeater clip, and no left_repeater clip in minute 1
    tc.make_drive(tmp_path, minutes=1, cameras=tc.CAMERAS, spec=SHORT)
    hole = tc.ClipSpec(duration_s=2.5, fps=35.7, gaps_ms=(28,) * 40 + (1000,))
    late = tc.make_drive(
        tmp_path, start="2024-05-01_11-00-00", minutes=2, cameras=tc.THREE, spec=SHORT,
        specs={(0, "front"): hole, (0, "left_repeater"): tc.ClipSpec(duration_s=1.0, gps_fix=False)},
        missing={(1, "left_repeater")},
    )  # fmt: skip
    empty = tc.header_only(late.clip(1, "right_repeater"))
    whole = [j for j in (d.to_job() for d in discover(tmp_path).drives) if len(j.clips[0].files) == 3]
    assert len(whole) == 1 and sorted(whole[0].car_cameras) == sorted(tc.CAMERAS)
    parts = split_job(whole[0], "camera")
    assert len(parts) == 3
    # When ingested as one job by one worker, and as per-camera jobs by two workers
    one = await _ingest(redis_url, "rswhole2", whole, workers=1)
    split = await _ingest(redis_url, "rssplit2", parts, workers=2)
    # Then every partition and the drives hop hold the same entries, markers included
    assert one["dead"] == split["dead"] == []
    assert sorted(one, key=str) == sorted(split, key=str)
    for stream in one:
        assert split[stream] == one[stream], stream
    (ended,) = [m for m in split[(":drives", None)] if m.event == "ended"]
    assert ended == one[(":drives", None)][-1]
    # and the merged marker says everything the whole drive's does
    assert ended.missed_ticks == {"front": 5}
    assert any(p.startswith(f"{late.clip(0, 'front')}: 5 tick(s) had no frame") for p in ended.problems)
    assert any(p.startswith(f"{late.clip(0, 'left_repeater')}: telemetry of") and "no GPS fix" in p
               for p in ended.problems)  # fmt: skip
    assert any(p.startswith(f"{empty}: holds no frames") for p in ended.problems)
    absent = sorted(p.split(":")[0] for p in ended.problems if "the camera did not record them" in p)
    assert absent == ["back", "left_pillar", "left_repeater", "right_pillar"]
    assert ended.missing["left_repeater"] == [late.minutes[1]] and ended.missing["right_repeater"] == [late.minutes[1]]
    assert ended.missing["back"] == late.minutes


@pytest.mark.parametrize("failing", ["left_repeater", "right_repeater"], ids=["before-the-last", "the-last"])
async def test_a_dead_lettered_part_ends_its_own_cameras_and_the_drive_still_ends(
    tmp_path: Path, redis_url: str, failing: str
) -> None:
    # Given a three-camera drive split per camera, where one camera's part (queued before
    # the last part, or last) cannot be placed in time (its clip name is no time, and it
    # has no UTC) and fails for good
    tc.make_drive(tmp_path, minutes=1, cameras=tc.THREE, spec=SHORT)
    (whole,) = [d.to_job() for d in discover(tmp_path).drives]
    parts = split_job(whole, "camera")
    broken = [p.copy_with(clips=[p.clips[0].model_copy(update={"start": "no-time", "utc": None})])
              if p.cameras == [failing] else p for p in parts]  # fmt: skip
    # When ingested in order by one worker that allows one delivery
    out = await _ingest(redis_url, f"rsdead{failing}", broken, workers=1, max_deliveries=1)
    # Then the part is a dead letter, every camera's partition ends, and the drives hop
    # carries one merged "ended" marker with the failure named and the others' counts
    (letter,) = out["dead"]
    assert "no-time" in codec.decode(letter.data).error
    for camera in tc.THREE:
        (stream,) = [k for k in out if k != "dead" and k[0].startswith(":frames:") and k[1] == camera]
        kinds = [getattr(m, "event", "frame") for m in out[stream]]
        assert kinds[0] == "started" and kinds[-1] == "ended" and kinds.count("ended") == 1, camera
    (ended,) = [m for m in out[(":drives", None)] if m.event == "ended"]
    assert any(f"ingest of camera(s) {failing} of this drive failed and was dead-lettered" in p
               for p in ended.problems)  # fmt: skip
    assert sorted(ended.frame_counts) == sorted(c for c in tc.THREE if c != failing)
    assert all(n > 0 for n in ended.frame_counts.values())


def test_the_drive_ends_only_when_every_camera_has_a_record() -> None:
    # Given records of two of a drive's three cameras
    records = {"front": CameraRecord(frames=3, ticks=[0, 1, 2]), "back": CameraRecord(frames=1, ticks=[4])}
    # When merged / Then the missing camera is a KeyError (the part waits for it)
    with pytest.raises(KeyError):
        merge(["front", "back", "left_repeater"], records)


def test_merged_problems_and_utc_follow_the_publishing_order() -> None:
    # Given records whose problems and UTCs come from different minutes and cameras
    records = {
        "front": CameraRecord(frames=2, problems=[(2, "front broke in minute 2")], first=(1, 50.0), last=(1, 51.0)),
        "back": CameraRecord(frames=2, problems=[(0, "back broke in minute 0")], first=(0, 40.0), last=(2, 60.0)),
    }
    # When merged
    merged = merge(["front", "back"], records)
    # Then problems go by minute, the first UTC is minute 0's and the last is minute 2's
    assert merged.problems == ["back broke in minute 0", "front broke in minute 2"]
    assert (merged.first_utc, merged.last_utc) == (40.0, 60.0)
    assert merged.frame_counts == {"front": 2, "back": 2}


async def test_submit_with_split_camera_queues_one_job_per_camera_once(tmp_path: Path, redis_url: str) -> None:
    from click.testing import CliRunner

    from workers.cli import cli
    from workers.cli.ingest import register

    if "submit" not in cli.commands:
        register(cli)
    # Given a three-camera drive
    tc.make_drive(tmp_path, minutes=1, cameras=tc.THREE, spec=SHORT)
    # When submitted twice with ingest.split=camera
    args = ["--set", "namespace=rssubmit", "--set", "ingest.split=camera", "submit", str(tmp_path), "--redis", redis_url]
    for _ in range(2):
        result = await asyncio.to_thread(CliRunner().invoke, cli, args)
        assert result.exit_code == 0, result.output
    assert "1 drive(s) as 3 job(s)" in result.output
    # Then the jobs hop holds one job per camera, each with the whole clip list
    broker = RedisBroker(url=redis_url, namespace="rssubmit")
    jobs = [codec.decode(e.data) for e in await broker.range("rssubmit:jobs")]
    await broker.close()
    assert sorted(j.cameras[0] for j in jobs) == sorted(tc.THREE)
    assert all(len(j.clips[0].files) == 3 for j in jobs)


@pytest.mark.parametrize("order", ["in-order", "last-span-first"])
async def test_a_drive_split_per_span_yields_the_frames_order_and_markers_of_the_whole_drive(
    tmp_path: Path, redis_url: str, order: str
) -> None:
    # Given a five-minute three-camera drive with a missing camera minute, a zero-byte clip
    # and a truncated one, split into spans of two minutes per camera (3 spans x 3 cameras)
    drive = tc.make_drive(tmp_path, minutes=5, cameras=tc.THREE, spec=SHORT, missing={(2, "front")})
    tc.zero_byte(drive.clip(1, "left_repeater"))
    tc.truncate(drive.clip(4, "right_repeater"), 0.5)
    (whole,) = [d.to_job() for d in discover(tmp_path).drives]
    spans = split_job(whole, "span", span_s=120)
    assert [(j.span.index, j.span.first, j.span.end) for j in spans[::3]] == [(0, 0, 2), (1, 2, 4), (2, 4, 5)]
    assert [j.cameras[0] for j in spans[:3]] == list(tc.THREE)
    # When ingested as one job, and as span jobs by two workers; in the second case the
    # later spans are queued first, so they finish first and wait for the earlier ones
    one = await _ingest(redis_url, f"rswholespan{order}", [whole], workers=1)
    jobs = spans if order == "in-order" else spans[::-1]
    split = await _ingest(redis_url, f"rsspan{order}", jobs, workers=2, parallel_clips=2)
    # Then every partition and the drives hop hold the same entries in the same order
    # (seq renumbered across spans, markers included)
    ended = assert_same(one, split)
    assert ended.problems and ended.missing["front"] == [drive.minutes[2]]


async def test_a_dead_lettered_span_leaves_a_gap_the_chain_moves_past_and_the_drive_ends(
    tmp_path: Path, redis_url: str
) -> None:
    # Given a three-minute two-camera drive split into one-minute spans, where front's
    # middle span fails for good (its clip's name is no time and it has no UTC)
    tc.make_drive(tmp_path, minutes=3, cameras=("front", "back"), spec=SHORT)
    (whole,) = [d.to_job() for d in discover(tmp_path).drives]
    spans = split_job(whole, "span", span_s=60)
    assert len(spans) == 6

    def broken(job: Job) -> Job:
        clips = [c.model_copy(update={"start": "no-time", "utc": None}) if i == 1 else c
                 for i, c in enumerate(job.clips)]  # fmt: skip
        return job.copy_with(clips=clips)

    jobs = [broken(j) if (j.cameras, j.span.index) == (["front"], 1) else j for j in spans]
    # When ingested by one worker that allows one delivery
    out = await _ingest(redis_url, "rsspandead", jobs, workers=1, max_deliveries=1)
    # Then the span is a dead letter, front's partition carries minutes 0 and 2 numbered
    # without a gap, then one "ended"; back's carries all three minutes
    (letter,) = out["dead"]
    assert "no-time" in codec.decode(letter.data).error
    for camera in ("front", "back"):
        (stream,) = [k for k in out if k != "dead" and k[0].startswith(":frames:") and k[1] == camera]
        frames = [m for m in out[stream] if isinstance(m, FrameRef)]
        kinds = [getattr(m, "event", "frame") for m in out[stream]]
        assert kinds[0] == "started" and kinds[-1] == "ended" and kinds.count("ended") == 1, camera
        assert [f.seq for f in frames] == list(range(len(frames)))
        assert sorted({f.clip for f in frames}) == sorted(whole.clips[i].start for i in ((0, 2) if camera == "front"
                                                                                      else (0, 1, 2)))  # fmt: skip
        assert [f.tick for f in frames] == sorted(f.tick for f in frames)
    # and the drives hop's one "ended" names the failed minutes and counts what was published
    (ended,) = [m for m in out[(":drives", None)] if m.event == "ended"]
    assert any("ingest of camera front, minute no-time," in p and "dead-lettered" in p for p in ended.problems)
    front = [m for k, v in out.items() if k != "dead" and k[1] == "front" for m in v if isinstance(m, FrameRef)]
    assert ended.frame_counts["front"] == len(front) > 0


def test_spans_cut_whole_minutes_of_at_least_the_span_length() -> None:
    # Given a job of seven minutes 60 s apart, one 30 s after its predecessor
    clips = [ClipRef(start=f"m{i}", files={"front": f"/f{i}.mp4", "back": f"/b{i}.mp4"}, utc=u)
             for i, u in enumerate([0, 60, 120, 150, 210, 270, 330])]  # fmt: skip
    job = Job(drive_id="d", root="/", clips=clips)
    # When cut into spans of 120 s / Then spans start at the first minute 120 s on
    assert span_bounds(job, 120) == [(0, 2), (2, 5), (5, 7)]
    assert span_bounds(job, 1000) == [(0, 7)]
    # and the jobs go span by span, cameras in camera order, each named apart
    jobs = split_job(job, "span", span_s=120)
    assert [(j.span.index, j.cameras[0]) for j in jobs] == [(k, c) for k in range(3) for c in ("front", "back")]
    assert len({part_name(j) for j in jobs}) == 6 and all(j.span.count == 3 for j in jobs)
    # and a drive shorter than a span is split per camera only; split "camera" never spans
    assert [j.span for j in split_job(job, "span", span_s=1000)] == [None, None]
    assert all(j.span is None for j in split_job(job, "camera"))
    with pytest.raises(ValueError, match="span_s"):
        split_job(job, "span", span_s=0)
    # and a drive whose minutes cannot be placed in time is one span (its ingest says why)
    unplaced = job.copy_with(clips=[c.model_copy(update={"start": "no-time", "utc": None}) for c in clips])
    assert span_bounds(unplaced, 120) == [(0, 7)]


async def test_a_held_span_whose_chain_is_stuck_stops_waiting_for_memory(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import workers.handlers.ingest as ingest_module

    # Given a two-minute one-camera drive in one-minute spans of 40 frames (two chunks),
    # and a blob bound of one byte (every held chunk after the first would wait for
    # memory room for ever), and a short stuck limit
    tc.make_drive(tmp_path, minutes=2, cameras=("front",), spec=tc.ClipSpec(duration_s=8.0))
    (whole,) = [d.to_job() for d in discover(tmp_path).drives]
    first, second = split_job(whole, "span", span_s=60)
    monkeypatch.setattr(ingest_module, "HELD_STUCK_S", 1.0)
    ns = "rsstuck"
    broker = RedisBroker(url=redis_url, namespace=ns)
    blobs = RedisBlobStore(redis_url, namespace=ns)
    roots = [str(Path(p).resolve().parent) for p in whole.clips[0].files.values()]
    settings = Settings(namespace=ns, ingest=IngestSettings(roots=roots))
    settings.broker.max_blob_bytes = 1
    jobs = names.stream_name(names.JOBS, ns=ns)
    try:
        # When only the second span is queued (the first one's worker "died"), then the first
        await broker.publish(jobs, codec.encode(second))
        worker = Worker(build(settings, blobs), broker, blobs, settings, burst=True)
        await asyncio.wait_for(worker.run(), 60)
        frames = [s for s in await broker.streams(f"{ns}:frames:*")]
        published = [m for st in frames for e in await broker.range(st) if isinstance(m := codec.decode(e.data), FrameRef)]
        # Then the second span stored its frames over the bound, saying so, and published none
        assert "has not moved for 1 s" in caplog.text and published == []
        await broker.publish(jobs, codec.encode(first))
        worker = Worker(build(settings, blobs), broker, blobs, settings, burst=True)
        await asyncio.wait_for(worker.run(), 60)
        # and the first span, next to publish, never waits: both spans' frames go out in order
        frames = [s for s in await broker.streams(f"{ns}:frames:*")]
        published = [m for st in frames for e in await broker.range(st) if isinstance(m := codec.decode(e.data), FrameRef)]
        assert [f.seq for f in published] == list(range(len(published)))
        assert {f.clip for f in published} == {c.start for c in whole.clips}
    finally:
        await broker.close()
        await blobs.close()

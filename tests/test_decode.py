"""Decoding and sampling by presentation time, and every broken clip a drive can hold."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from fixtures import teslacam as tc
from stages.decode import ClipStats, _Candidate, pick_nearest, sample_clip
from stages.frames import decode_jpeg, encode_frame
from stream.errors import FootageError


def _frames(times: list[float]) -> list[_Candidate]:
    return [_Candidate(t, i, None) for i, t in enumerate(times)]


def test_each_tick_takes_the_nearest_frame() -> None:
    # Given frames at an uneven rate
    frames = _frames([0.0, 0.09, 0.21, 0.33, 0.38, 0.52])
    # When sampled at 5 per second with a wide tolerance
    picks = [(k, f.pts_s) for k, _, f in pick_nearest(frames, 0.2, 0.1, float("inf"))]
    # Then each tick has the frame closest to it
    assert picks == [(0, 0.0), (1, 0.21), (2, 0.38), (3, 0.52)]


def test_a_tick_with_no_frame_near_it_is_skipped() -> None:
    # Given a gap in the stream around 0.4 s
    frames = _frames([0.0, 0.2, 0.6, 0.8])
    # When sampled with a small tolerance
    picks = [k for k, _, _ in pick_nearest(frames, 0.2, 0.02, float("inf"))]
    # Then the tick in the gap is missing, the others are there
    assert picks == [0, 1, 3, 4]


def test_no_tick_is_sampled_past_the_limit() -> None:
    # Given a clip longer than the step to the next minute
    frames = _frames([i / 10 for i in range(30)])
    # When sampled with a limit of 1 s
    picks = [tick for _, tick, _ in pick_nearest(frames, 0.2, 0.05, 1.0)]
    # Then the last tick lies before the limit
    assert max(picks) < 1.0 and len(picks) == 5


def test_a_clip_is_sampled_at_the_requested_rate_with_telemetry(tmp_path: Path) -> None:
    # Given a 2 s clip at 36 fps
    drive = tc.make_drive(tmp_path, minutes=1, cameras=("front",), layout="flat", spec=tc.ClipSpec(fps=36))
    # When sampled at 5 per second
    samples = list(sample_clip(drive.clip(0, "front"), sample_fps=5))
    # Then there are ten ticks, each within half a frame interval, each with telemetry
    assert [s.k for s in samples] == list(range(10))
    assert all(abs(s.pts_s - s.tick_s) <= 0.5 / 36 for s in samples)
    assert all(s.telemetry is not None and s.telemetry.lat for s in samples)


def test_decord_samples_the_same_ticks_as_pyav(tmp_path: Path) -> None:
    # Given one clip
    drive = tc.make_drive(tmp_path, minutes=1, cameras=("front",), layout="flat", spec=tc.ClipSpec(fps=24))
    path = drive.clip(0, "front")
    # When both backends sample it
    pyav = [(s.k, s.pts_s, s.telemetry) for s in sample_clip(path)]
    decord = [(s.k, s.pts_s, s.telemetry) for s in sample_clip(path, decoder="decord", size=(80, 60))]
    # Then they agree on ticks, frames and telemetry
    assert decord == pyav


def test_frames_are_resized_to_the_long_side_and_jpeg_encoded(tmp_path: Path) -> None:
    # Given a 320x240 clip
    drive = tc.make_drive(tmp_path, minutes=1, cameras=("front",), layout="flat", spec=tc.ClipSpec(size=(320, 240)))
    sample = next(sample_clip(drive.clip(0, "front")))
    # When encoded with a long side of 160, as JPEG and raw
    jpeg = encode_frame(sample.image, long_side=160)
    raw = encode_frame(sample.image, long_side=160, encoding="raw")
    # Then both are 160x120 and the JPEG decodes to that size
    assert (jpeg.width, jpeg.height) == (raw.width, raw.height) == (160, 120)
    assert decode_jpeg(jpeg.data).shape == (120, 160, 3)
    assert len(raw.data) == 160 * 120 * 3


def test_h265_clips_are_decoded(tmp_path: Path) -> None:
    # Given an H.265 clip (some 2019 cars)
    drive = tc.make_drive(tmp_path, minutes=1, cameras=("front",), layout="flat", spec=tc.ClipSpec(codec="hevc"))
    # When sampled
    samples = list(sample_clip(drive.clip(0, "front")))
    # Then every tick is there
    assert len(samples) == 10


def test_a_clip_without_keyframe_in_its_second_half_decodes_whole(tmp_path: Path) -> None:
    # Given a clip whose only keyframe is its first frame
    spec = tc.ClipSpec(duration_s=3.0, keyint=1000)
    drive = tc.make_drive(tmp_path, minutes=1, cameras=("front",), layout="flat", spec=spec)
    # When sampled (decoding straight through, never seeking)
    samples = list(sample_clip(drive.clip(0, "front")))
    # Then the second half is sampled too
    assert len(samples) == 15


def test_a_truncated_clip_keeps_its_frames_then_names_the_file(tmp_path: Path) -> None:
    # Given a clip cut to half its bytes (index first, as a fast-start file)
    spec = tc.ClipSpec(duration_s=3.0, faststart=True)
    drive = tc.make_drive(tmp_path, minutes=1, cameras=("front",), layout="flat", spec=spec)
    path = tc.truncate(drive.clip(0, "front"), 0.5)
    # When sampled
    got = []
    with pytest.raises(FootageError, match="truncated") as caught:
        for sample in sample_clip(path):
            got.append(sample)
    # Then the frames before the cut came out and the error names the file
    assert 0 < len(got) < 15
    assert caught.value.path == str(path)


@pytest.mark.parametrize(
    ("breaker", "problem"),
    [(tc.zero_byte, "empty file"), (tc.not_a_video, "not a readable video")],
)
def test_unusable_files_raise_an_error_naming_them(tmp_path: Path, breaker, problem: str) -> None:
    # Given a clip broken in one way
    drive = tc.make_drive(tmp_path, minutes=1, cameras=("front",), layout="flat")
    path = breaker(drive.clip(0, "front"))
    # When sampled
    # Then the error names the file and the problem
    with pytest.raises(FootageError, match=problem) as caught:
        list(sample_clip(path))
    assert caught.value.path == str(path)


def _message_as_nobody(path: Path) -> str:
    # Root reads any file, so the check runs in a forked child that gave up root.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        message = "no error"
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            list(sample_clip(path))
        except Exception as exc:  # noqa: BLE001 - any error is the answer
            message = str(exc)
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        message = pipe.read()
    os.waitpid(pid, 0)
    return message


def test_an_unreadable_file_is_reported_as_such() -> None:
    # Given a clip without read permission, in a folder anyone may enter
    folder = Path(tempfile.mkdtemp(prefix="rs-unreadable-"))
    folder.chmod(0o755)
    try:
        drive = tc.make_drive(folder, minutes=1, cameras=("front",), layout="flat", spec=tc.ClipSpec(duration_s=0.5))
        path = tc.unreadable(drive.clip(0, "front"))
        # When an unprivileged process samples it
        message = _message_as_nobody(path)
        # Then the message names the file and says it cannot be read
        assert message == f"{path}: cannot read the file: permission denied"
    finally:
        shutil.rmtree(folder)


def test_variable_frame_rate_ticks_take_the_nearest_frame_within_half_the_local_spacing(tmp_path: Path) -> None:
    # Given a 4 s clip at about 35.7 fps whose frame intervals vary 22-34 ms (as Tesla's)
    spec = tc.ClipSpec(duration_s=4.0, fps=35.7, gaps_ms=(22, 34, 28, 31, 25))
    drive = tc.make_drive(tmp_path, minutes=1, cameras=("left_repeater",), layout="flat", spec=spec)
    times = [t / 1000 for t in tc.frame_times_ms(spec)]
    # When sampled at 5 per second with each decoder
    for decoder in ("pyav", "decord"):
        stats = ClipStats()
        samples = list(sample_clip(drive.clip(0, "left_repeater"), sample_fps=5, decoder=decoder, stats=stats))
        # Then every one of the 20 ticks takes its nearest frame, and none is missed
        assert [s.k for s in samples] == list(range(20)), decoder
        for s in samples:
            assert abs(s.pts_s - s.tick_s) == pytest.approx(min(abs(t - s.tick_s) for t in times), abs=1e-3)
        assert stats.missed == []


def test_ticks_in_a_hole_of_the_stream_are_missed_and_counted() -> None:
    # Given frames every 28 ms with a 1 s hole after 1.12 s
    times = [i * 0.028 for i in range(41)] + [2.12 + i * 0.028 for i in range(20)]
    # When sampled at 5 per second with the local spacing as tolerance
    missed: list[float] = []
    picks = [k for k, _, _ in pick_nearest(_frames(times), 0.2, None, float("inf"), missed=missed)]
    # Then the five ticks inside the hole get no frame and are counted, the others do
    assert [round(t, 1) for t in missed] == [1.2, 1.4, 1.6, 1.8, 2.0]
    assert picks == [0, 1, 2, 3, 4, 5, 11, 12, 13]


def test_a_header_only_clip_is_named_as_holding_no_frames(tmp_path: Path) -> None:
    # Given a clip with its header and no frame (the car lost power after opening it)
    drive = tc.make_drive(tmp_path, minutes=1, cameras=("front",), layout="flat")
    path = tc.header_only(drive.clip(0, "front"))
    # When sampled with either decoder
    for decoder in ("pyav", "decord"):
        # Then the error names the file and says it holds no frames
        with pytest.raises(FootageError, match="holds no frames") as caught:
            list(sample_clip(path, decoder=decoder))
        assert caught.value.path == str(path)


def test_a_truncated_clip_keeps_the_same_frames_with_decord_and_says_how_many_were_lost(tmp_path: Path) -> None:
    # Given a fast-start clip cut to 60% of its bytes
    spec = tc.ClipSpec(duration_s=3.0, faststart=True)
    drive = tc.make_drive(tmp_path, minutes=1, cameras=("front",), layout="flat", spec=spec)
    path = tc.truncate(drive.clip(0, "front"), 0.6)
    kept = {}
    # When sampled with each decoder
    for decoder in ("pyav", "decord"):
        got, stats = [], ClipStats()
        with pytest.raises(FootageError, match=r"truncated clip: decoded \d+ of 90 frames \(\d+ lost\)") as caught:
            for sample in sample_clip(path, decoder=decoder, stats=stats):
                got.append(sample.k)
        kept[decoder] = got
        assert caught.value.path == str(path)
    # Then decord keeps the ticks PyAV keeps
    assert kept["decord"] == kept["pyav"] and len(kept["pyav"]) > 5


def test_a_rotated_clip_is_sampled_upright_with_every_decoder(tmp_path: Path) -> None:
    # Given a clip coded sideways with a -90 degree display rotation (players show it upright)
    spec = tc.ClipSpec(duration_s=0.4, size=(160, 120), rotation=-90)
    drive = tc.make_drive(tmp_path, minutes=1, cameras=("front",), layout="flat", spec=spec)
    upright = tc.upright_frame(spec, "front", 0)
    # When its first frame is sampled and encoded with each decoder
    for decoder in ("pyav", "decord"):
        sample = next(iter(sample_clip(drive.clip(0, "front"), decoder=decoder, size=(160, 120))))
        image = decode_jpeg(encode_frame(sample.image, long_side=160).data)
        # Then it is the upright picture, as a player shows it
        assert image.shape == upright.shape, decoder
        assert abs(image.astype(int) - upright).mean() < 8, decoder


def test_a_clip_cut_before_its_index_is_named_as_such(tmp_path: Path) -> None:
    # Given a clip written index-last and cut at 60% (the index never written)
    drive = tc.make_drive(tmp_path, minutes=1, cameras=("front",), layout="flat", spec=tc.ClipSpec(duration_s=2.0))
    path = tc.truncate(drive.clip(0, "front"), 0.6)
    # When sampled with either decoder / Then the error names the file and says why
    for decoder in ("pyav", "decord"):
        with pytest.raises(FootageError, match="cut before its index was written") as caught:
            list(sample_clip(path, decoder=decoder))
        assert caught.value.path == str(path)

"""NVDEC decoding: which decoder a worker uses, which clips NVDEC takes, the PyAV fallback.

The CPU tests run without PyNvVideoCodec; the GPU test runs where CUDA and the library are
(the device machines) and is skipped elsewhere.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from pathlib import Path

import pytest

from fixtures import teslacam as tc
from stages.decode import ClipInfo, ClipStats, sample_clip, sample_keyframes
from stages.frames import decode_jpeg, target_size
from stages.nvdec import (
    choose_decoder,
    decodes_with_nvdec,
    nvdec_refuses,
    nvdec_unavailable,
    timeline,
    wanted,
)
from stream.errors import FootageError
from stream.settings import IngestSettings, Settings
from workers.handlers.ingest import IngestHandler


def _info(codec: str = "h264", width: int = 1280, height: int = 960) -> ClipInfo:
    return ClipInfo(codec=codec, width=width, height=height, fps=36.0, frames=0, creation_utc=None)


def test_auto_and_nvdec_fall_back_to_pyav_with_a_note_when_nvdec_is_missing() -> None:
    assert choose_decoder("auto", "no CUDA device") == ("pyav", "ingest.decoder=auto: no CUDA device; decoding with PyAV")
    decoder, note = choose_decoder("nvdec", "PyNvVideoCodec cannot be imported")
    assert decoder == "pyav" and "PyNvVideoCodec" in note
    assert choose_decoder("auto", None) == ("nvdec", None)
    assert choose_decoder("pyav", None) == ("pyav", None)
    assert choose_decoder("decord", "no CUDA device") == ("decord", None)


def test_this_machine_reports_why_nvdec_is_unavailable() -> None:
    import torch

    reason = nvdec_unavailable()
    if importlib.util.find_spec("PyNvVideoCodec") is None:
        assert reason is not None and "PyNvVideoCodec" in reason
    elif not torch.cuda.is_available():
        assert reason == "no CUDA device"


@pytest.mark.parametrize(("info", "taken"), [
    (_info(), True), (_info("hevc", 2896, 1876), True), (_info("mpeg4"), False),
    (_info("h264", 8192, 4320), False), (_info("h264", 32, 32), False),
])  # fmt: skip
def test_nvdec_takes_h264_and_hevc_within_its_sizes(info: ClipInfo, taken: bool) -> None:
    assert (nvdec_refuses(info) is None) == taken


def test_the_nvdec_timeline_picks_the_frames_pyav_picks(tmp_path: Path) -> None:
    # Given a clip at 36 fps with B-frames (decode order differs from display order)
    drive = tc.make_drive(tmp_path, minutes=1, cameras=("front",),
                          spec=tc.ClipSpec(duration_s=2.0, fps=36.0, bframes=2, keyint=12))  # fmt: skip
    clip = drive.clip(0, "front")
    # When the demux-only timeline picks the frame of each tick
    picks = wanted(timeline(clip), sample_fps=5.0, limit_s=float("inf"))
    # Then they are PyAV's picks: same ticks, same presentation times
    reference = list(sample_clip(clip, sample_fps=5.0))
    assert [(k, item.pts_s) for k, _, item in picks] == [(s.k, s.pts_s) for s in reference]
    assert len(picks) == 10


def test_a_clip_nvdec_refuses_is_decoded_by_pyav_with_a_log_line(tmp_path: Path, caplog) -> None:
    # Given a clip smaller than NVDEC's H.264 minimum and an ingest handler told to use NVDEC
    drive = tc.make_drive(tmp_path, minutes=1, cameras=("front",), spec=tc.ClipSpec(duration_s=1.0, size=(40, 32)))
    clip = str(drive.clip(0, "front"))
    handler = IngestHandler(Settings(ingest=IngestSettings(decoder="pyav")), blobs=None)
    handler.decoder = "nvdec"
    # When its samples are made
    with caplog.at_level(logging.WARNING, logger="roadstream.ingest"):
        samples = list(handler._samples(clip, float("inf")))
    # Then PyAV decoded it, the same samples as PyAV alone, and the log says why
    assert [(s.k, s.pts_s) for s in samples] == [(s.k, s.pts_s) for s in sample_clip(clip, sample_fps=5.0)]
    assert handler.fallbacks == 1
    assert "outside NVDEC's h264 range" in caplog.text and clip in caplog.text


HOLE = tc.ClipSpec(duration_s=2.5, fps=35.7, gaps_ms=(28,) * 40 + (1000,))


def test_the_nvdec_timeline_misses_the_ticks_pyav_misses(tmp_path: Path) -> None:
    # Given a clip with a 1 s hole in its stream
    clip = tc.make_drive(tmp_path, minutes=1, cameras=("front",), spec=HOLE).clip(0, "front")
    # When the timeline picks its ticks, and PyAV samples it
    missed: list[float] = []
    picks = wanted(timeline(clip), sample_fps=5.0, limit_s=float("inf"), missed=missed)
    stats = ClipStats()
    reference = list(sample_clip(clip, sample_fps=5.0, stats=stats))
    # Then both take the same frames and miss the same five ticks
    assert [(k, item.pts_s) for k, _, item in picks] == [(s.k, s.pts_s) for s in reference]
    assert missed == stats.missed and len(missed) == 5


def test_a_clip_nvdec_refuses_keeps_its_sampling_stats(tmp_path: Path) -> None:
    # Given a clip too small for NVDEC, with a 1 s hole, and a handler told to use NVDEC
    spec = tc.ClipSpec(duration_s=2.5, size=(40, 32), gaps_ms=HOLE.gaps_ms)
    clip = str(tc.make_drive(tmp_path, minutes=1, cameras=("front",), spec=spec).clip(0, "front"))
    handler = IngestHandler(Settings(ingest=IngestSettings(decoder="pyav")), blobs=None)
    handler.decoder = "nvdec"
    # When its samples are made through the PyAV fallback
    stats = ClipStats()
    samples = list(handler._samples(clip, float("inf"), stats))
    # Then the stats say what PyAV found: the frames and the five ticks in the hole
    assert samples and len(stats.missed) == 5 and stats.decoded == stats.expected > 0


def test_keyframe_sampling_names_a_header_only_clip(tmp_path: Path) -> None:
    # Given a clip that holds a header and no frame
    clip = tc.header_only(tc.make_drive(tmp_path, minutes=1, cameras=("front",)).clip(0, "front"))
    # When sampled in keyframe mode / Then it is a problem naming the file, as in tick mode
    with pytest.raises(FootageError, match="holds no frames"):
        list(sample_keyframes(clip, stats=ClipStats()))


def test_a_worker_asked_for_nvdec_without_it_decodes_with_pyav(caplog) -> None:
    if nvdec_unavailable() is None:
        pytest.skip("NVDEC is available here")
    # Asked by name: a warning
    with caplog.at_level(logging.WARNING, logger="roadstream.ingest"):
        handler = IngestHandler(Settings(ingest=IngestSettings(decoder="nvdec")), blobs=None)
    assert handler.decoder == "pyav"
    assert "ingest.decoder=nvdec" in caplog.text and "decoding with PyAV" in caplog.text
    # auto (the default): PyAV, the reason only at INFO
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="roadstream.ingest"):
        handler = IngestHandler(Settings(), blobs=None)
    assert handler.decoder == "pyav" and caplog.text == ""


@pytest.mark.skipif(nvdec_unavailable() is not None, reason="needs CUDA and PyNvVideoCodec")
def test_nvdec_samples_are_pyavs_frames_encoded_on_the_gpu(tmp_path: Path) -> None:
    from stages.nvdec import NvdecSampler

    # Given a 1280x960 clip at 36 fps
    drive = tc.make_drive(tmp_path, minutes=1, cameras=("front",),
                          spec=tc.ClipSpec(duration_s=2.0, fps=36.0, size=(1280, 960)))  # fmt: skip
    clip = drive.clip(0, "front")
    # When sampled by NVDEC at 5 per second, resized to 640 on the long side, after the
    # worker's warm-up
    sampler = NvdecSampler("cuda:0", long_side=640)
    sampler.warm_up()
    samples = list(sampler.sample(clip, sample_fps=5.0))
    # Then the ticks and times are PyAV's and each JPEG decodes to the target size
    reference = list(sample_clip(clip, sample_fps=5.0))
    assert [(s.k, s.pts_s) for s in samples] == [(s.k, s.pts_s) for s in reference]
    for sample in samples:
        assert decode_jpeg(sample.image.data).shape[:2][::-1] == target_size(1280, 960, 640)
    assert [s.telemetry for s in samples] == [s.telemetry for s in reference]


@pytest.mark.parametrize(
    ("decoder", "sample", "encoding", "nvdec"),
    [
        ("nvdec", "ticks", "jpeg", True),
        ("nvdec", "keyframes", "jpeg", False),  # keyframe sampling is PyAV's
        ("nvdec", "ticks", "raw", False),  # raw frames too
        ("pyav", "ticks", "jpeg", False),
    ],
)
def test_only_ticks_into_jpeg_are_decoded_with_nvdec(decoder: str, sample: str, encoding: str, nvdec: bool) -> None:
    assert decodes_with_nvdec(decoder, sample, encoding) is nvdec


class _Sampler:
    """Stands in for ``NvdecSampler`` on a machine without CUDA: counts warm-ups."""

    def __init__(self, fails: bool = False) -> None:
        self.warmed, self.fails = 0, fails

    def warm_up(self) -> None:
        self.warmed += 1
        if self.fails:
            raise RuntimeError("CUDA error: no kernel image")


def _nvdec_handler(sampler: _Sampler, **ingest: str) -> IngestHandler:
    handler = IngestHandler(Settings(ingest=IngestSettings(**ingest)), blobs=None)
    handler.decoder, handler._sampler = "nvdec", sampler  # as resolved on a GPU box with the library
    return handler


def test_an_nvdec_worker_warms_cuda_and_nvjpeg_up_before_it_takes_a_job(caplog) -> None:
    # Given an ingest handler that decodes with NVDEC
    sampler = _Sampler()
    handler = _nvdec_handler(sampler)
    # When the worker starts it (before joining its group and reading jobs: workers/runtime.py)
    with caplog.at_level(logging.INFO, logger="roadstream.startup"):
        asyncio.run(handler.start())
    # Then the sampler was warmed up once, and it said so
    assert sampler.warmed == 1
    assert "NVDEC and nvJPEG ready on cuda:0" in caplog.text


def test_a_worker_that_decodes_with_pyav_all_the_same_warms_nothing_up() -> None:
    for ingest in ({"sample": "keyframes"}, {"encoding": "raw"}):
        sampler = _Sampler()
        asyncio.run(_nvdec_handler(sampler, **ingest).start())
        assert sampler.warmed == 0, ingest


def test_a_failed_nvdec_warm_up_is_logged_and_the_worker_starts(caplog) -> None:
    sampler = _Sampler(fails=True)
    with caplog.at_level(logging.WARNING, logger="roadstream.ingest"):
        asyncio.run(_nvdec_handler(sampler).start())  # does not raise
    assert sampler.warmed == 1
    assert "NVDEC warm-up on cuda:0 failed (CUDA error: no kernel image)" in caplog.text

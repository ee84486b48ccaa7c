"""``ingest.sample = keyframes``: only keyframes are decoded, each on its nearest tick."""

from __future__ import annotations

from pathlib import Path

import av

from fixtures import teslacam as tc
from stages.decode import sample_keyframes


def _keyframe_times(path: Path) -> list[float]:
    """Presentation times of the key frames, from a full decode (the reference)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        base, tb = stream.start_time or 0, float(stream.time_base)
        return [round((f.pts - base) * tb, 6) for f in container.decode(stream) if f.key_frame]


def test_only_keyframes_are_decoded_at_their_own_times(tmp_path: Path) -> None:
    # Given a 3 s clip at 30 fps with a keyframe every 10 frames (and B-frames)
    drive = tc.make_drive(tmp_path, minutes=1, cameras=("front",),
                          spec=tc.ClipSpec(duration_s=3.0, fps=30.0, keyint=10, bframes=2))  # fmt: skip
    clip = drive.clip(0, "front")
    expected = _keyframe_times(clip)
    # When sampled in keyframe mode on a 5 Hz tick grid
    samples = list(sample_keyframes(clip, sample_fps=5.0))
    # Then every sample is a keyframe, at the keyframe's time, on its nearest tick
    assert len(expected) == 9
    assert [s.pts_s for s in samples] == expected
    assert all(s.image.key_frame for s in samples)
    assert [s.k for s in samples] == [round(t * 5.0) for t in expected]
    assert all(abs(s.tick_s - s.pts_s) <= 0.1 + 1e-9 for s in samples)
    # and the telemetry of each keyframe is the one written for it
    written = drive.clips[(0, "front")].telemetry
    assert all(s.telemetry is not None and s.telemetry == tc_telemetry(written[s.pts_s]) for s in samples)


def test_keyframes_stop_at_the_limit(tmp_path: Path) -> None:
    drive = tc.make_drive(tmp_path, minutes=1, cameras=("front",),
                          spec=tc.ClipSpec(duration_s=3.0, fps=30.0, keyint=30))  # fmt: skip
    samples = list(sample_keyframes(drive.clip(0, "front"), sample_fps=5.0, limit_s=2.0))
    assert [s.pts_s for s in samples] == [0.0, 1.0]


def tc_telemetry(meta):
    from stages.sei import to_telemetry

    return to_telemetry(meta)


def test_the_ingest_worker_in_keyframe_mode_publishes_keyframes_only(tmp_path: Path) -> None:
    import asyncio

    from brokers.connect import connect, forget_memory
    from stages.discover import discover
    from stream import codec, names
    from stream.schemas import FrameRef
    from stream.settings import IngestSettings, Settings
    from workers.handlers.ingest import build
    from workers.runtime import Worker

    # Given a two-camera drive of 3 s clips with a keyframe every second
    tc.make_drive(tmp_path, minutes=1, cameras=("front", "back"),
                  spec=tc.ClipSpec(duration_s=3.0, fps=30.0, keyint=30))  # fmt: skip
    settings = Settings(namespace="rskey", ingest=IngestSettings(sample="keyframes", roots=[str(tmp_path)]))

    async def ingest() -> list[FrameRef]:
        broker, blobs = connect("memory://keyframes", namespace="rskey", settings=settings.broker)
        for job in [d.to_job() for d in discover(tmp_path).drives]:
            await broker.publish(names.stream_name(names.JOBS, ns="rskey"), codec.encode(job))
        await asyncio.wait_for(Worker(build(settings, blobs), broker, blobs, settings, burst=True).run(), 60)
        frames = []
        for stream in await broker.streams("rskey:frames:*"):
            frames += [m for e in await broker.range(stream, count=1000) if isinstance(m := codec.decode(e.data), FrameRef)]
        return frames

    try:
        frames = asyncio.run(ingest())
    finally:
        forget_memory("keyframes")
    # When ingested in keyframe mode / Then each camera has its 3 keyframes, on ticks 0, 5, 10
    for camera in ("front", "back"):
        mine = [f for f in frames if f.camera == camera]
        assert [(f.seq, f.tick, f.pts) for f in mine] == [(0, 0, 0.0), (1, 5, 1.0), (2, 10, 2.0)]

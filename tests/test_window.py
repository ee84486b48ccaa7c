"""PureKV-style temporal windows on synthetic descriptors (no model, no IO)."""

from __future__ import annotations

import numpy as np

from stages.step import Step
from stages.window import CameraWindows, WindowConfig, WindowFrame, importance
from stream.schemas import Detection

CONFIG = WindowConfig(length_s=10.0, stride_s=5.0, similarity_threshold=0.9, per_frame_budget=3, model="m")


def scene(n: int, dim: int = 16) -> np.ndarray:
    """A unit descriptor for scene ``n``; different scenes are orthogonal."""
    vector = np.zeros(dim, np.float32)
    vector[n % dim] = 1.0
    return vector


def det(type_: str, score: float, side: float) -> Detection:
    return Detection(type=type_, label=type_, score=score, box=(0.0, 0.0, side, side))


def frame(seq: int, t: float, descriptor: np.ndarray, detections: list[Detection] | None = None) -> WindowFrame:
    return WindowFrame(seq, seq, t, f"d:front:{seq}", descriptor, detections or [])


def feed(windows: CameraWindows, frames: list[WindowFrame], *, end: bool = True) -> Step:
    update = Step()
    for f in frames:
        update.extend(windows.add(f, f.seq))
    if end:
        update.extend(windows.flush())
    return update


def test_static_scene_collapses_to_one_key_frame_per_window() -> None:
    # Given 10 s of one unchanging scene at 2 fps
    frames = [frame(i, i * 0.5, scene(0)) for i in range(20)]

    # When the drive ends
    update = feed(CameraWindows("d", "front", CONFIG), frames)

    # Then each window kept only its first frame
    assert [s.index for s in update.outputs] == [0, 1]
    assert [s.frames_kept for s in update.outputs] == [1, 1]
    assert [s.key_frames[0].seq for s in update.outputs] == [0, 10]
    assert update.outputs[0].frames_total == 20


def test_changing_scene_keeps_each_change() -> None:
    # Given a scene that changes every 4 frames (2 s)
    frames = [frame(i, i * 0.5, scene(i // 4)) for i in range(20)]

    # When the drive ends
    update = feed(CameraWindows("d", "front", CONFIG), frames)

    # Then window 0 kept the first frame of each of the five scenes
    assert [k.seq for k in update.outputs[0].key_frames] == [0, 4, 8, 12, 16]
    assert update.outputs[0].frames_kept == 5


def test_small_drift_below_threshold_is_dropped_but_accumulated_drift_is_kept() -> None:
    # Given descriptors rotating slowly: each step ~0.98 similar to the previous
    angles = np.arange(10) * 0.2
    frames = [frame(i, i * 0.5, np.array([np.cos(a), np.sin(a)], np.float32)) for i, a in enumerate(angles)]

    # When they pass through one window
    update = feed(CameraWindows("d", "front", CONFIG), frames)

    # Then a frame is kept only once it drifted far enough from the last kept one
    kept = [k.seq for k in update.outputs[0].key_frames]
    assert kept == [0, 3, 6, 9]


def test_per_frame_detection_budget_keeps_the_most_important() -> None:
    # Given a frame with six detections of different score and size
    many = [det("cone", 0.9, 0.1), det("cone", 0.3, 0.9), det("drum", 0.5, 0.5), det("cone", 0.95, 0.05),
            det("worker", 0.8, 0.4), det("cone", 0.2, 0.1)]

    # When the window keeps it with a budget of 3
    update = feed(CameraWindows("d", "front", CONFIG), [frame(0, 0.0, scene(0), many)])

    # Then three detections remain, ordered by score weighted by box size
    kept = update.outputs[0].key_frames[0].detections
    assert len(kept) == 3
    assert kept == sorted(many, key=importance, reverse=True)[:3]
    assert [d.type for d in kept] == ["worker", "cone", "drum"]


def test_segment_summarises_its_window() -> None:
    # Given two scenes with detections over 0-10 s, and telemetry-free frames
    frames = [frame(i, float(i), scene(i // 5), [det("cone", 0.9, 0.2)] * (1 + i % 3)) for i in range(10)]

    # When window 0 closes
    update = feed(CameraWindows("drive7", "left_repeater", CONFIG), frames)
    seg = update.outputs[0]

    # Then the segment names its window and counts its frames and objects
    assert (seg.drive_id, seg.camera, seg.index, seg.t_start, seg.t_end) == ("drive7", "left_repeater", 0, 0.0, 10.0)
    assert (seg.frames_total, seg.frames_kept) == (10, 2)
    assert seg.object_counts == {"cone": 3}  # most cones seen in one frame
    assert [k.blob_key for k in seg.key_frames] == ["d:front:0", "d:front:5"]
    assert np.isclose(np.linalg.norm(seg.descriptor), 1.0)
    assert np.allclose(seg.descriptor[:2], [2**-0.5, 2**-0.5])  # mean of the two kept scenes
    assert seg.model == "m"


def test_window_closes_when_a_frame_passes_its_end() -> None:
    # Given frames up to just before 10 s
    windows = CameraWindows("d", "front", CONFIG)
    update = feed(windows, [frame(i, i * 1.0, scene(0)) for i in range(10)], end=False)
    assert update.outputs == []

    # When the frame at 10 s arrives
    update = windows.add(frame(10, 10.0, scene(0)), 10)

    # Then window 0 closes, releasing frames 0-4 (held by window 0); 5-9 stay for window 1
    assert [s.index for s in update.outputs] == [0]
    assert update.release == [0, 1, 2, 3, 4]
    assert windows.open_windows == [1, 2]


def test_overlapping_windows_share_frames_and_release_each_once() -> None:
    # Given 20 s of frames at 1 fps
    frames = [frame(i, float(i), scene(i)) for i in range(20)]

    # When the drive ends
    update = feed(CameraWindows("d", "front", CONFIG), frames)

    # Then every frame belongs to two windows (except the first stride) and is released once
    assert [s.index for s in update.outputs] == [0, 1, 2, 3]
    assert [s.frames_total for s in update.outputs] == [10, 10, 10, 5]
    assert sorted(update.release) == list(range(20))


def test_replay_of_unreleased_frames_rebuilds_the_same_segments() -> None:
    # Given a camera whose frames went through one worker that crashed after frame 13
    frames = [frame(i, i * 0.7, scene(i // 3)) for i in range(40)]
    reference = feed(CameraWindows("d", "front", CONFIG), frames)
    first = CameraWindows("d", "front", CONFIG)
    before = feed(first, frames[:14], end=False)

    # When a new worker replays every frame not yet released, then the rest
    released = set(before.release)
    after = feed(CameraWindows("d", "front", CONFIG), [f for f in frames if f.seq not in released])

    # Then published segments together equal the single run's, none twice
    assert [s.index for s in before.outputs + after.outputs] == [s.index for s in reference.outputs]
    assert before.outputs + after.outputs == reference.outputs
    assert sorted(before.release + after.release) == list(range(40))


def test_redelivered_frame_is_not_counted_twice() -> None:
    # Given a window holding frames 0-2
    windows = CameraWindows("d", "front", CONFIG)
    feed(windows, [frame(i, float(i), scene(0)) for i in range(3)], end=False)

    # When frame 1 arrives again
    update = windows.add(frame(1, 1.0, scene(5)), "again")

    # Then nothing changes: the first delivery is released with its window
    assert update.outputs == [] and update.release == []
    assert windows.flush().outputs[0].frames_total == 3


def test_frames_in_a_gap_between_windows_are_released_at_once() -> None:
    # Given windows of 2 s every 5 s
    windows = CameraWindows("d", "front", WindowConfig(length_s=2.0, stride_s=5.0))

    # When a frame at 3 s (in no window) arrives after one at 1 s
    windows.add(frame(0, 1.0, scene(0)), 0)
    update = windows.add(frame(1, 3.0, scene(0)), 1)

    # Then window 0 closed and both frames are released
    assert [s.index for s in update.outputs] == [0]
    assert update.release == [0, 1]

"""The roadwork frame scorer in the detect worker, and the shipped models of ``roadstream run``.

The detector is a YOLO11n built from its yaml (random weights: only its descriptor
matters here); the scorer is the shipped ``stages/models/scorer.pt``. Frames come from the
sample drive: its front camera shows a work zone, its back camera a clear road.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import simplejpeg

import stages
from brokers.base import Entry
from brokers.memory import MemoryBlobStore
from stages.detect import Detector
from stages.scorer import DEFAULT_WEIGHTS, FEATURE_DIM, RoadworkScorer
from stream import codec, names
from stream.errors import ModelError
from stream.schemas import DriveMarker, FrameDetections, FrameRef, Message, Segment
from stream.settings import DetectSettings, Settings, load_settings
from workers.handlers.detect import DetectHandler, warm_up_size
from workers.handler import Delivery
from workers.run import shipped_models

SAMPLE = Path(__file__).parent.parent / "fixtures" / "sample" / "TeslaCam" / "SavedClips" / "2024-05-01_10-00-00"
DETECT = {"model": "yolo11n.yaml", "allow_random_weights": True, "scorer": "", "imgsz": 160, "classes": {"0": "cone"}, "window_s": 2.0, "stride_s": 1.0}
FRAMES = 4


def sample_frames(camera: str, size: tuple[int, int] | None = None) -> list[bytes]:
    """JPEGs of the sample drive's camera, every fifth frame, optionally resized (w, h)."""
    import cv2

    with av.open(str(SAMPLE / f"2024-05-01_10-00-00-{camera}.mp4")) as video:
        images = [f.to_ndarray(format="rgb24") for i, f in enumerate(video.decode(video=0)) if i % 5 == 0]
    if size is not None:
        images = [cv2.resize(im, size, interpolation=cv2.INTER_AREA) for im in images]
    return [simplejpeg.encode_jpeg(np.ascontiguousarray(im)) for im in images[:FRAMES]]


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector(DetectSettings(**DETECT))


@pytest.fixture(scope="module")
def scorer() -> RoadworkScorer:
    return RoadworkScorer.load(DEFAULT_WEIGHTS)


def settings(**detect) -> Settings:
    return load_settings(environ={}, detect={**DETECT, **detect}, broker={"frame_partitions": 2, "fuse_partitions": 2})


def deliveries(blobs: dict[str, bytes], cameras: dict[str, list[bytes]]) -> list[Delivery]:
    """Frames of each camera interleaved by tick, then each camera's end marker."""
    messages: list[Message] = []
    for seq in range(FRAMES):
        for camera, jpegs in cameras.items():
            key = f"d:{camera}:{seq}"
            blobs[key] = jpegs[seq]
            messages.append(FrameRef(drive_id="d", camera=camera, clip="c", seq=seq, tick=seq, t=seq / 2, pts=seq / 2,
                                     blob_key=key, width=0, height=0, nbytes=len(jpegs[seq])))  # fmt: skip
    messages += [DriveMarker(drive_id="d", event="ended", camera=c, cameras=list(cameras)) for c in cameras]
    return [
        Delivery(Entry(names.stream_name(names.FRAMES, 0), f"{i + 1}-0", codec.encode(m)), m, 0)
        for i, m in enumerate(messages)
    ]


async def run_handler(handler: DetectHandler, cameras: dict[str, list[bytes]]) -> list[Message]:
    blobs = MemoryBlobStore()
    stored: dict[str, bytes] = {}
    batch = deliveries(stored, cameras)
    for key, data in stored.items():
        await blobs.put(key, data)
    handler.blobs = blobs
    await handler.start()
    return [o.message for o in (await handler.handle(batch)).outputs]


async def test_each_frame_goes_out_with_its_own_roadwork_probability(detector, scorer):
    # Given one batch of a work-zone camera and a clear camera, the clear one at another size
    cameras = {"front": sample_frames("front"), "back": sample_frames("back", size=(128, 72))}
    handler = DetectHandler(settings(), MemoryBlobStore(), detector=detector, scorer=scorer)
    # When the detect handler runs it
    outputs = await run_handler(handler, cameras)
    # Then every frame carries the probability the scorer gives that frame alone
    frames = [m for m in outputs if isinstance(m, FrameDetections)]
    assert len(frames) == 2 * FRAMES
    for frame in frames:
        alone = scorer.score_frames(detector.decode([cameras[frame.camera][frame.seq]]))[0].item()
        assert frame.roadwork_prob == pytest.approx(alone, abs=1e-4)
    # … roadwork above one half, the clear road below
    assert all(f.roadwork_prob > 0.5 for f in frames if f.camera == "front")
    assert all(f.roadwork_prob < 0.5 for f in frames if f.camera == "back")
    # … and the key frames of the windows keep the frame's probability
    probs = {(f.camera, f.seq): f.roadwork_prob for f in frames}
    keys = [(s.camera, k) for s in outputs if isinstance(s, Segment) for k in s.key_frames]
    assert keys and all(k.roadwork_prob == probs[(camera, k.seq)] for camera, k in keys)


async def test_the_scorer_features_can_be_the_window_descriptor(detector, scorer):
    # Given descriptor = "scorer"
    handler = DetectHandler(settings(descriptor="scorer"), MemoryBlobStore(), detector=detector, scorer=scorer)
    # When frames pass
    outputs = await run_handler(handler, {"front": sample_frames("front")})
    # Then the windows' descriptors are the scorer's pooled features, unit length
    segments = [m for m in outputs if isinstance(m, Segment)]
    assert segments and all(len(s.descriptor) == FEATURE_DIM for s in segments)
    assert all(0.5 < np.linalg.norm(s.descriptor) <= 1.0 + 1e-5 for s in segments)  # means of unit vectors


async def test_without_a_scorer_no_probability_is_published(detector):
    # Given no scorer configured (detect.scorer="")
    handler = DetectHandler(settings(), MemoryBlobStore(), detector=detector)
    # When frames pass / Then they carry no probability
    outputs = await run_handler(handler, {"front": sample_frames("front")})
    assert all(m.roadwork_prob is None for m in outputs if isinstance(m, FrameDetections))


@pytest.mark.parametrize("kind", ["missing", "text", "a detector"])
async def test_a_missing_or_wrong_scorer_file_stops_the_worker_at_start(detector, tmp_path, kind):
    # Given a scorer path that is missing, not weights, or another model's weights
    path = {"missing": tmp_path / "nope.pt", "text": tmp_path / "notes.pt",
            "a detector": DEFAULT_WEIGHTS.parent / "cones_yolo11n.pt"}[kind]  # fmt: skip
    if kind == "text":
        path.write_text("not weights")
    handler = DetectHandler(settings(scorer=str(path)), MemoryBlobStore(), detector=detector)
    # When it starts / Then a ModelError names the file
    with pytest.raises(ModelError, match=path.name):
        await handler.start()


async def test_a_scorer_descriptor_without_a_scorer_is_refused(detector):
    # Given descriptor = "scorer" and no scorer / When started / Then a ModelError says so
    handler = DetectHandler(settings(descriptor="scorer"), MemoryBlobStore(), detector=detector)
    with pytest.raises(ModelError, match="detect.scorer"):
        await handler.start()


async def test_padding_stops_at_the_worker_batch_for_detector_and_scorer():
    # Given a worker reading batches of 8, with the detector and the shipped scorer loaded
    # by the worker itself
    base = settings(scorer="shipped")
    small = base.model_copy(update={"worker": base.worker.model_copy(update={"batch_size": 8})})
    handler = DetectHandler(small, MemoryBlobStore())
    # When it starts
    await handler.start()
    # Then detector and scorer pad no batch past 8 frames (the default pads to 32)
    assert handler.settings.detect.pad_batch_to == 32
    assert handler.detector.max_rows == 8 and handler.scorer.max_rows == 8
    assert handler.scorer.graph_rows == 32
    # and injected models get the worker's bound too
    injected = DetectHandler(small, MemoryBlobStore(), detector=Detector(DetectSettings(**DETECT)),
                             scorer=RoadworkScorer.load(DEFAULT_WEIGHTS))  # fmt: skip
    await injected.start()
    assert injected.detector.max_rows == 8 and injected.scorer.max_rows == 8


def test_the_warm_up_prepares_the_frames_ingest_makes_of_a_tesla_camera():
    # Given the default settings / Then the warm-up's frames are a HW3 camera's after ingest
    assert warm_up_size(Settings()) == (640, 480)
    # and they follow ingest's long side
    assert warm_up_size(load_settings(environ={}, ingest={"long_side": 320})) == (320, 240)


def test_run_uses_the_shipped_models_from_the_package_unless_others_are_named(tmp_path, monkeypatch):
    # Given a current folder far from the package
    monkeypatch.chdir(tmp_path)
    package_models = Path(stages.__file__).parent / "models"
    # When no model is named / Then the shipped files of the package, which exist
    chosen = shipped_models(load_settings(environ={})).detect
    assert Path(chosen.model) == package_models / "cones_yolo11n.pt" and Path(chosen.model).is_file()
    assert Path(chosen.scorer) == package_models / "scorer.pt" and Path(chosen.scorer).is_file()
    # When the config names a detector and turns the scorer off / Then those win
    named = shipped_models(load_settings(environ={"ROADSTREAM_DETECT__MODEL": "yolo11n.yaml"}, detect={"scorer": ""}))
    assert (named.detect.model, named.detect.scorer) == ("yolo11n.yaml", "")


def test_the_shipped_detector_maps_its_cone_class_to_the_cone_type():
    # Given the shipped cone detector with the default class map / Then class cone is type cone
    made = Detector(DetectSettings(model=str(DEFAULT_WEIGHTS.parent / "cones_yolo11n.pt"), device="cpu"))
    assert set(made.class_types.values()) == {"cone"}

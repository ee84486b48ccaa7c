"""The YOLO detector hot path on CPU, with a YOLO11n built from its yaml (random weights)."""

from __future__ import annotations

import numpy as np
import pytest
import simplejpeg
import torch

from stages.detect import Detector, load_yolo, normalise_name
from stages.devices import padded_rows
from stream.errors import InputError, ModelError
from stream.settings import DetectSettings

#: Class "0" and "1" of the yaml model stand for roadwork types; the other 78 are ignored.
CLASSES = {"0": "cone", "1": "worker"}


def make_detector(**changes: object) -> Detector:
    """A small, fast YOLO11n whose random head is nudged to produce boxes."""
    options = {"model": "yolo11n.yaml", "allow_random_weights": True, "imgsz": 160, "conf": 0.2, "classes": CLASSES, **changes}
    detector = Detector(DetectSettings(**options))
    torch.manual_seed(0)
    for branch in detector.net.model[-1].cv3:  # class-score convolutions
        branch[-1].bias.data.fill_(-1.0)
        branch[-1].weight.data.normal_(0, 0.05)
    return detector


@pytest.fixture(scope="module")
def detector() -> Detector:
    return make_detector()


def jpeg(seed: int, height: int = 120, width: int = 160) -> bytes:
    rng = np.random.default_rng(seed)
    return simplejpeg.encode_jpeg(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_only_mapped_classes_come_out_with_their_roadwork_type(detector: Detector) -> None:
    # Given frames with a model whose map names classes "0" and "1"
    results = detector.detect_jpegs([jpeg(1), jpeg(2)])

    # Then every detection is a cone or a worker, labelled with the model's class name
    found = [d for r in results for d in r.detections]
    assert found, "the nudged head should detect something"
    assert {(d.label, d.type) for d in found} <= {("0", "cone"), ("1", "worker")}


def test_detections_respect_threshold_budget_and_normalised_boxes(detector: Detector) -> None:
    # When a batch is detected
    results = detector.detect_jpegs([jpeg(3), jpeg(4, 90, 200)])

    # Then scores pass the threshold, each frame holds at most max_det, boxes lie in [0, 1]
    for result in results:
        assert len(result.detections) <= detector.settings.max_det
        for d in result.detections:
            assert d.score > detector.settings.conf
            x1, y1, x2, y2 = d.box
            assert 0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1


def test_unmapped_model_classes_yield_no_detections() -> None:
    # Given a map that names none of the model's classes
    detector = make_detector(classes={"traffic cone": "cone"})

    # Then nothing is reported, yet the descriptor is still computed
    (result,) = detector.detect_jpegs([jpeg(5)])
    assert result.detections == []
    assert result.descriptor.shape == (256,)


def test_one_forward_pass_serves_the_whole_batch(detector: Detector, monkeypatch) -> None:
    # Given a hook counting calls of the model's first layer
    from stages.detect import graphs

    calls: list[int] = []
    handle = detector.net.model[0].register_forward_hook(lambda _m, i, _o: calls.append(i[0].shape[0]))
    batch = [jpeg(i, 120, 160) for i in range(3)] + [jpeg(9, 64, 64), jpeg(10, 64, 64)]

    # When a batch of five frames of two sizes is detected, with passes of up to 8 frames
    # on the CPU, then with the shipped passes of 4
    try:
        monkeypatch.setattr(graphs, "CPU_FORWARD_ROWS", 8)
        detector.detect_jpegs(batch)
        monkeypatch.setattr(graphs, "CPU_FORWARD_ROWS", 4)
        detector.detect_jpegs(batch)
    finally:
        handle.remove()

    # Then the model ran once on all five, then in a pass of four and one of one
    assert calls == [5, 4, 1]


@pytest.mark.parametrize(("frames", "step", "cap", "rows"), [
    (5, 8, None, 8), (13, 8, None, 16), (5, 32, None, 32),  # a multiple of the step
    (5, 32, 8, 8), (40, 32, 48, 48), (32, 32, 32, 32),  # not past the worker's batch
    (70, 32, 64, 70),  # a batch larger than the bound is never cut
])  # fmt: skip
def test_padding_rounds_up_to_the_step_and_stops_at_the_cap(frames, step, cap, rows) -> None:
    assert padded_rows(frames, step, cap) == rows


def test_the_detector_pads_on_cuda_only_and_not_past_its_max_rows(detector: Detector, monkeypatch) -> None:
    # Given the detector's padding of 32 rows, bounded by a worker's batch of 8
    monkeypatch.setattr(detector, "settings", detector.settings.model_copy(update={"pad_batch_to": 32}))
    monkeypatch.setattr(detector, "max_rows", 8)
    # Then the CPU pads nothing, and CUDA pads five frames to eight, not 32
    assert detector.padded_size(5) == 5
    monkeypatch.setattr(detector, "cuda", True)
    assert detector.padded_size(5) == 8


def test_descriptor_is_unit_length_and_independent_of_batch_mates(detector: Detector) -> None:
    # Given the same frame alone and in a batch with others
    alone = detector.detect_jpegs([jpeg(7)])[0].descriptor
    together = detector.detect_jpegs([jpeg(8), jpeg(7), jpeg(6)])[1].descriptor

    # Then its descriptor is the same unit vector either way
    assert np.isclose(np.linalg.norm(alone), 1.0, atol=1e-5)
    assert np.allclose(alone, together, atol=1e-4)


def test_boxes_map_back_from_letterbox_to_original_frame(detector: Detector) -> None:
    # Given a 360x640 frame letterboxed into 160: scale 0.25, 90x160, padded to 96x160 (top 3)
    image = torch.zeros(3, 360, 640, dtype=torch.uint8)
    _, box = detector.preprocess([image])
    assert box.shape == (96, 160)

    # When a box covering the resized frame exactly is mapped back
    rows = np.array([[0.0, 3.0, 160.0, 93.0, 0.9, 0.0], [40.0, 25.5, 80.0, 48.0, 0.8, 1.0]], dtype=np.float32)
    results = detector._results([rows], box, np.ones((1, 256), dtype=np.float32))

    # Then it covers the whole frame, and a partial box lands where it should
    assert results[0].detections[0].box == pytest.approx((0.0, 0.0, 1.0, 1.0))
    assert results[0].detections[1].box == pytest.approx((0.25, 0.25, 0.5, 0.5))


@pytest.fixture(scope="module")
def host_decoding() -> Detector:
    """The same detector, decoding JPEGs with libjpeg-turbo in threads (``decode="cpu"``)."""
    return make_detector(decode="cpu", decode_threads=2)


def test_host_decoding_gives_the_same_frames_and_detections(detector: Detector, host_decoding: Detector) -> None:
    # Given frames of two sizes, in mixed order
    blobs = [jpeg(21), jpeg(22, 90, 200), jpeg(23), jpeg(24, 90, 200)]

    # When both decoders read them
    torchvision_frames = detector.decode(blobs)
    threaded_frames = host_decoding.decode(blobs)

    # Then each frame comes out as the same CHW uint8 image (libjpeg-turbo both: equal up
    # to rounding), in order, and one model finds the same boxes in both
    for a, b in zip(torchvision_frames, threaded_frames, strict=True):
        assert b.shape == a.shape and b.dtype == torch.uint8 and b.is_contiguous()
        assert (a.int() - b.int()).abs().max() <= 2
    want = [np.array([d.box for d in r.detections]) for r in detector.detect(torchvision_frames)]
    got = [np.array([d.box for d in r.detections]) for r in detector.detect(threaded_frames)]
    assert [len(b) for b in got] == [len(b) for b in want] and any(len(b) for b in want)
    assert all(np.allclose(g, w, atol=1e-4) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("decoder", ["detector", "host_decoding"])
def test_bad_frames_are_named_and_the_rest_of_the_batch_goes_on(decoder: str, request: pytest.FixtureRequest) -> None:
    detector: Detector = request.getfixturevalue(decoder)
    # Given a batch with an expired blob and a truncated JPEG among good frames
    good = jpeg(11)
    blobs = [good, None, good[: len(good) // 2], b"not a jpeg", good]
    names = ["k0", "k1", "k2", "k3", "k4"]

    # When it is decoded and detected
    results = detector.detect_jpegs(blobs, names)

    # Then the bad ones are InputErrors naming their frame, the good ones results
    assert [type(r).__name__ for r in results] == ["FrameResult", "InputError", "InputError", "InputError", "FrameResult"]
    assert "k1" in str(results[1]) and "missing" in str(results[1])
    assert "k2" in str(results[2]) and "k3" in str(results[3])
    assert isinstance(results[2], InputError)


def test_missing_model_file_is_a_model_error_naming_it(tmp_path) -> None:
    # Given a model path that does not exist
    missing = tmp_path / "no_such_weights.pt"

    # Then loading fails with a ModelError naming the file, without a download
    with pytest.raises(ModelError, match="no_such_weights.pt"):
        load_yolo(str(missing))


def test_corrupt_weights_file_is_a_model_error(tmp_path) -> None:
    # Given a .pt file that holds garbage
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"this is not a checkpoint")

    # Then loading names the file and says it does not load
    with pytest.raises(ModelError, match="broken.pt.*does not load"):
        load_yolo(str(bad))


def test_a_classifier_is_not_a_detector() -> None:
    # Given a classification model yaml
    # Then it is refused as not a detector
    with pytest.raises(ModelError, match="yolo11n-cls.yaml.*not a detector"):
        load_yolo("yolo11n-cls.yaml")


def test_class_names_match_loosely() -> None:
    # Given class names written the ways datasets write them
    # Then they all reduce to one key of the class map
    assert normalise_name("Arrow-Board") == normalise_name("arrow_board") == normalise_name(" arrow  board") == "arrow_board"


def test_launches_from_several_threads_keep_their_own_results(detector: Detector) -> None:
    # Given batches of different sizes launched from several threads at once (the worker
    # launches CPU batches in threads, and prepares several batches concurrently)
    from concurrent.futures import ThreadPoolExecutor

    batches = [[jpeg(40 + 10 * b + i) for i in range(2 + b)] for b in range(4)]
    want = [[r.descriptor for r in detector.detect_jpegs(jpegs)] for jpegs in batches]

    def run(jpegs: list[bytes]) -> list[np.ndarray]:
        return [r.descriptor for r in detector.collect(detector.launch(detector.decode(jpegs)))]

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(run, batches * 3))

    # Then every batch got its own frames' descriptors, as when run alone
    for g, w in zip(got, want * 3, strict=True):
        assert len(g) == len(w)
        assert all(np.allclose(a, b, atol=1e-4) for a, b in zip(g, w, strict=True))


def test_cpu_passes_of_a_few_frames_give_the_boxes_and_descriptors_of_one_pass(monkeypatch) -> None:
    # Given ten different frames, detected in one forward pass
    from stages.detect import graphs

    detector = make_detector()
    images = detector.decode([jpeg(20 + i) for i in range(10)])
    monkeypatch.setattr(graphs, "CPU_FORWARD_ROWS", 100)
    whole = detector.launch(images)
    # When the CPU runs them in passes of three (the last one of one frame)
    monkeypatch.setattr(graphs, "CPU_FORWARD_ROWS", 3)
    passes = detector.launch(images)
    # Then candidates and each frame's own descriptor are those of the single pass
    assert torch.allclose(passes.candidates, whole.candidates, atol=1e-4)
    assert torch.allclose(passes.features, whole.features, atol=1e-5)
    assert not torch.allclose(whole.features[0], whole.features[-1])  # the frames do differ


def test_cpu_scorer_passes_give_the_scores_and_features_of_one_pass(monkeypatch) -> None:
    # Given a scorer (ImageNet weights, from the installed package) and seven frames of
    # different brightness
    import stages.scorer as scorer_module
    from stages.scorer import RoadworkScorer, build_model

    scorer = RoadworkScorer(build_model(pretrained=True), "cpu")
    images = [torch.full((3, 96, 128), 30 * i, dtype=torch.uint8) for i in range(7)]
    monkeypatch.setattr(scorer_module, "CPU_FORWARD_ROWS", 100)
    probs, pooled = scorer.score_frames(images)
    # When the CPU scores them in passes of two
    monkeypatch.setattr(scorer_module, "CPU_FORWARD_ROWS", 2)
    probs2, pooled2 = scorer.score_frames(images)
    # Then every frame keeps its own score and features
    assert torch.allclose(probs2, probs, atol=1e-5) and torch.allclose(pooled2, pooled, rtol=1e-4, atol=1e-5)
    assert (pooled[0] - pooled[-1]).abs().max() > 0.1

"""The detector's CUDA path: CUDA graphs, padded batches and pipelined launches give the
same results as a plain eager pass. Skipped without a GPU (run on the device machine).
"""

from __future__ import annotations

import numpy as np
import pytest
import simplejpeg
import torch

from stages.detect import Detector, FrameResult
from stream.settings import DetectSettings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CLASSES = {"0": "cone", "1": "worker"}


@pytest.fixture(scope="module")
def detector() -> Detector:
    """A YOLO11n on the GPU whose random head is nudged to report boxes."""
    # Batches pad to multiples of 8 here (the default is 32, one shape): the tests need
    # several graphs, an older one replayed after a newer capture.
    made = Detector(DetectSettings(model="yolo11n.yaml", allow_random_weights=True, device="cuda", imgsz=320, conf=0.2,
                                   classes=CLASSES, pad_batch_to=8))  # fmt: skip
    torch.manual_seed(0)
    for branch in made.net.model[-1].cv3:
        branch[-1].bias.data.fill_(-1.0)
        branch[-1].weight.data.normal_(0, 0.05)
    return made


def frames(count: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [simplejpeg.encode_jpeg(rng.integers(0, 255, (180, 320, 3), dtype=np.uint8)) for _ in range(count)]


def eager(detector: Detector, jpegs: list[bytes]) -> list[FrameResult]:
    """The reference: no graph, no padding."""
    settings = detector.settings
    detector.settings = settings.model_copy(update={"cuda_graphs": False, "pad_batch_to": 1})
    try:
        return detector.detect_jpegs(jpegs)
    finally:
        detector.settings = settings


def assert_same(got: list[FrameResult], want: list[FrameResult]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert [d.label for d in g.detections] == [d.label for d in w.detections]
        for dg, dw in zip(g.detections, w.detections, strict=True):
            assert dg.box == pytest.approx(dw.box, abs=2e-3)
            assert dg.score == pytest.approx(dw.score, abs=2e-3)
        assert np.allclose(g.descriptor, w.descriptor, atol=2e-3)


def test_graphed_and_padded_batches_match_the_eager_pass(detector: Detector) -> None:
    # Given a batch of 13 frames (padded to 16 on the GPU)
    jpegs = frames(13)
    want = eager(detector, jpegs)
    assert any(r.detections for r in want), "the nudged head should detect something"

    # When it runs through the captured graph
    got = detector.detect_jpegs(jpegs)

    # Then the results are the eager pass's, and one graph of 16 rows was captured
    assert_same(got, want)
    assert any(shape[0] == 16 for shape in detector._graphs)


def test_batches_launched_ahead_each_get_their_own_results(detector: Detector) -> None:
    # Given batches of 8, 5, 13 and 8 frames (graphs of 8 and 16 rows, the one of 16
    # captured first), each launched before any is collected
    batches = [frames(n, seed) for n, seed in ((8, 1), (5, 2), (13, 3), (8, 4))]
    want = [eager(detector, jpegs) for jpegs in batches]
    pending = [detector.launch([im for im in detector.decode(jpegs)]) for jpegs in batches]

    # When they are collected in order
    got = [detector.collect(p) for p in pending]

    # Then none was overwritten by the graph replays behind it, and an older graph still
    # replays correctly after newer captures (the head's anchors of its shape are kept)
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)
    assert {shape[0] for shape in detector._graphs} == {8, 16}


def test_resized_and_mixed_size_batches_match_the_eager_pass(detector: Detector) -> None:
    # Given a batch of larger frames (resized inside the captured graph) and a batch of
    # two sizes (letterboxed op by op, then the forward graph)
    rng = np.random.default_rng(9)
    large = [simplejpeg.encode_jpeg(rng.integers(0, 255, (360, 640, 3), dtype=np.uint8)) for _ in range(6)]
    mixed = frames(3, seed=8) + large[:3]
    for jpegs in (large, mixed):
        want = eager(detector, jpegs)
        # When each runs through the graphs
        got = detector.detect_jpegs(jpegs)
        # Then the results are the eager pass's
        assert_same(got, want)
    assert any(r.detections for r in eager(detector, large))


def test_host_decoding_uploads_the_frames_nvjpeg_would_decode(detector: Detector) -> None:
    # Given JPEGs of two sizes and the same detector decoding with libjpeg-turbo threads
    blobs = frames(3) + [simplejpeg.encode_jpeg(np.full((90, 200, 3), 77, np.uint8))] + frames(2, seed=5)
    settings = detector.settings
    nvjpeg = detector.decode(blobs)
    detector.settings = settings.model_copy(update={"decode": "cpu", "decode_threads": 3})
    try:
        # When the batch is decoded on the host and uploaded
        uploaded = detector.decode(blobs + [b"not a jpeg"], [f"k{i}" for i in range(len(blobs) + 1)])
    finally:
        detector.settings = settings

    # Then each frame is on the GPU, CHW uint8, and matches nvJPEG's up to IDCT rounding;
    # a bad one is an InputError naming it
    for a, b in zip(nvjpeg, uploaded, strict=False):
        assert b.device.type == "cuda" and b.shape == a.shape and b.dtype == torch.uint8
        assert (a.float() - b.float()).abs().mean() < 2.0
    assert "k6" in str(uploaded[-1]) and not isinstance(uploaded[-1], torch.Tensor)


def test_graphed_scorer_matches_the_eager_pass_and_keeps_each_batchs_outputs() -> None:
    # Given one scorer with graphs and one without, When batches of sizes that pad to the
    # same graph (3, 8) and to another (11) are scored back to back, Then every batch's
    # probabilities and features equal the eager pass's, and an earlier batch's outputs
    # are not overwritten by a later replay.
    from stages.scorer import RoadworkScorer, build_model

    torch.manual_seed(0)
    model = build_model(pretrained=False)
    graphed = RoadworkScorer(model, "cuda")
    plain = RoadworkScorer(model, "cuda", cuda_graphs=False)
    rng = np.random.default_rng(0)
    batches = [[torch.from_numpy(rng.integers(0, 255, (3, 180, 320), dtype=np.uint8)).cuda() for _ in range(n)] for n in (3, 8, 11, 3)]
    got = [graphed.score_frames(b) for b in batches]
    assert sorted(graphed._graphs) == [8, 16]
    for batch, (probs, pooled) in zip(batches, got):
        want_probs, want_pooled = plain.score_frames(batch)
        assert probs.shape == (len(batch),) and pooled.shape == (len(batch), 1280)
        torch.testing.assert_close(probs, want_probs, atol=2e-3, rtol=0)
        torch.testing.assert_close(pooled, want_pooled, atol=2e-2, rtol=2e-2)

"""The roadwork frame scorer: loading, scoring tensors and images, the classify command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("efficientnet_lite_pytorch")

from click.testing import CliRunner

from stages.scorer import DEFAULT_WEIGHTS, FEATURE_DIM, RoadworkScorer, build_model
from stream.errors import InputError, ModelError

FOOTAGE = Path(__file__).resolve().parents[2] / "shared" / "footage"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A scorer weights file as the trainer writes it: ImageNet backbone, seeded head, fp16."""
    torch.manual_seed(0)
    model = build_model(pretrained=True)
    path = tmp_path_factory.mktemp("scorer") / "scorer.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def scorer(weights) -> RoadworkScorer:
    return RoadworkScorer.load(weights, "cpu")


def _frames(n: int = 2, height: int = 180, width: int = 320) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 3, height, width), generator=gen, dtype=torch.uint8)


def test_score_gives_a_probability_and_pooled_features_per_frame(scorer):
    # Given two frames of a size other than 224
    frames = _frames()
    # When they are scored
    probs, features = scorer.score(frames)
    # Then each has a probability in [0, 1] and a 1280-long descriptor
    assert probs.shape == (2,)
    assert ((probs >= 0) & (probs <= 1)).all()
    assert features.shape == (2, FEATURE_DIM)


def test_uint8_and_unit_float_frames_score_the_same(scorer):
    # Given the same frames as uint8 and as floats in [0, 1]
    frames = _frames()
    # When both are scored
    from_uint8, _ = scorer.score(frames)
    from_float, _ = scorer.score(frames.float() / 255)
    # Then the scores agree
    torch.testing.assert_close(from_uint8, from_float, atol=1e-5, rtol=0)


def test_score_rejects_a_batch_that_is_not_nchw_rgb(scorer):
    # Given a grey batch; When scored; Then an InputError names the shape
    with pytest.raises(InputError, match="NCHW"):
        scorer.score(torch.zeros(1, 1, 64, 64, dtype=torch.uint8))


def test_score_images_reads_paths_pil_images_and_arrays_alike(scorer, tmp_path):
    # Given one picture as a PNG file, a PIL image and an array
    from PIL import Image

    array = _frames(1)[0].permute(1, 2, 0).numpy()
    path = tmp_path / "frame.png"
    Image.fromarray(array).save(path)
    # When each is scored
    probs = scorer.score_images([path, Image.fromarray(array), array])
    # Then they get the same probability
    assert probs == pytest.approx([probs[0]] * 3, abs=1e-5)


def test_score_images_names_an_unreadable_file(scorer, tmp_path):
    # Given a file that is not an image
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    # When scored; Then the error names it
    with pytest.raises(InputError, match="notes.jpg"):
        scorer.score_images([bad])


def test_load_names_a_missing_weights_file(tmp_path):
    # Given no file; When loaded; Then ModelError names the path
    with pytest.raises(ModelError, match="absent.pt"):
        RoadworkScorer.load(tmp_path / "absent.pt")


def test_load_rejects_a_state_dict_of_another_model(tmp_path):
    # Given the state dict of some other network
    path = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    # When loaded as a scorer; Then ModelError says it is not one
    with pytest.raises(ModelError, match="not an efficientnet-lite0"):
        RoadworkScorer.load(path)


def test_fp16_weights_round_trip_to_the_same_scores(weights):
    # Given the fp32 model the weights came from (same seed)
    torch.manual_seed(0)
    original = RoadworkScorer(build_model(pretrained=True), "cpu")
    # When the saved fp16 weights are loaded
    loaded = RoadworkScorer.load(weights, "cpu")
    # Then both score a frame alike, up to fp16 rounding
    frames = _frames(1)
    assert float(loaded.score(frames)[0]) == pytest.approx(float(original.score(frames)[0]), abs=0.02)


def test_classify_prints_each_images_probability_as_json(scorer, weights, tmp_path):
    # Given two images on disk
    import click
    from PIL import Image

    from workers.cli.models import register

    paths = []
    for i, frame in enumerate(_frames(2)):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(frame.permute(1, 2, 0).numpy()).save(paths[-1])
    cli = click.Group()
    register(cli)
    # When classify runs with --json
    result = CliRunner().invoke(
        cli, ["classify", "--weights", str(weights), "--detector", "", "--json", *map(str, paths)]
    )
    # Then, without a detector, it prints one row per image with the scorer's probability
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["image"] for r in rows] == [str(p) for p in paths]
    expected = scorer.score_images(paths)
    assert [r["roadwork_probability"] for r in rows] == pytest.approx(expected, abs=1e-5)
    assert [r["roadwork"] for r in rows] == [p > 0.5 for p in expected]


def _frame_at(clip: Path, second: float) -> np.ndarray:
    import av

    with av.open(str(clip)) as container:
        for frame in container.decode(video=0):
            if frame.time >= second:
                return frame.to_ndarray(format="rgb24")
    pytest.fail(f"{clip} is shorter than {second} s")


@pytest.mark.skipif(
    not DEFAULT_WEIGHTS.is_file(), reason="shipped weights stages/models/scorer.pt not trained yet"
)
@pytest.mark.skipif(not FOOTAGE.is_dir(), reason="shared footage not present")
def test_shipped_weights_tell_a_roadwork_frame_from_a_clear_one():
    # Given the shipped scorer, a frame full of cones and crews (Phoenix at 6 s)
    # and a plain divided highway (muchlisin_driving at 6 s)
    scorer = RoadworkScorer.load(DEFAULT_WEIGHTS, "cpu")
    roadwork = _frame_at(FOOTAGE / "roadwork" / "mi3_workzone_phoenix.mp4", 6.0)
    clear = _frame_at(FOOTAGE / "clear" / "muchlisin_driving.mp4", 6.0)
    # When both are scored
    p_roadwork, p_clear = scorer.score_images([roadwork, clear])
    # Then the roadwork frame is above 0.5 and the clear one below
    assert p_roadwork > 0.5
    assert p_clear < 0.5


def test_classify_json_keeps_its_fields_and_adds_the_objects_and_the_scorers_own_probability(weights, tmp_path):
    # Given two images, the scorer above, the shipped cone detector and a rule file
    import click
    from PIL import Image

    from stages.classify import DEFAULT_DETECTOR, apply_rule, rule_features
    from workers.cli.models import register

    pytest.importorskip("ultralytics")
    paths = []
    for i, frame in enumerate(_frames(2)):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(frame.permute(1, 2, 0).numpy()).save(paths[-1])
    coefficients = {"bias": -0.5, "scorer_logit": 0.7, "det_max": 1.3, "det_count": 1.1}
    rule = tmp_path / "rule.json"
    rule.write_text(json.dumps({"coefficients": coefficients}))
    cli = click.Group()
    register(cli)
    # When classify runs with --json
    args = ["classify", "--weights", str(weights), "--detector", str(DEFAULT_DETECTOR), "--rule", str(rule), "--json"]
    result = CliRunner().invoke(cli, [*args, *map(str, paths)])
    # Then each row keeps image / roadwork_probability / roadwork and adds the objects and
    # the scorer's own probability; the probability is the rule over both models
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["image"] for r in rows] == [str(p) for p in paths]
    for row in rows:
        assert {"image", "roadwork_probability", "roadwork", "scorer_probability", "objects"} <= set(row)
        assert row["roadwork"] == (row["roadwork_probability"] > 0.5)
        assert all({"type", "confidence", "box"} <= set(o) and o["confidence"] >= 0.25 for o in row["objects"])
        # Noise has no cone: with no box, the rule sees det_max (weak boxes only) and no count.
        if not row["objects"]:
            lowest = apply_rule(rule_features(row["scorer_probability"], 0.0, 0), coefficients)
            highest = apply_rule(rule_features(row["scorer_probability"], 0.25, 0), coefficients)
            assert lowest - 1e-5 <= row["roadwork_probability"] <= highest + 1e-5


@pytest.mark.skipif(not FOOTAGE.is_dir(), reason="shared footage not present")
def test_shipped_classify_finds_the_cones_of_a_work_zone_and_none_on_a_plain_highway(tmp_path):
    # Given a frame full of cones and crews (Phoenix at 6 s) and a plain highway (muchlisin at 6 s)
    pytest.importorskip("ultralytics")
    from stages.classify import DEFAULT_DETECTOR, DEFAULT_RULE, FrameClassifier
    from stages.scorer import read_image

    classifier = FrameClassifier.load(DEFAULT_WEIGHTS, DEFAULT_DETECTOR, DEFAULT_RULE)
    roadwork = read_image(_frame_at(FOOTAGE / "roadwork" / "mi3_workzone_phoenix.mp4", 6.0))
    clear = read_image(_frame_at(FOOTAGE / "clear" / "muchlisin_driving.mp4", 6.0))
    # When both are classified with the shipped models and rule
    work, plain = classifier.classify([roadwork, clear])
    # Then the work zone is roadwork with cones found, the highway is not
    assert work.roadwork_probability > 0.5 and any(t == "cone" for t, _, _ in work.objects)
    assert plain.roadwork_probability < 0.5 and not plain.objects

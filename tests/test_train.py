"""Training of the scorer and the detector: data handling, metrics, and end-to-end runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from stages.train import scorer as train_scorer
from stream.errors import FootageError, InputError

SHARED = Path(__file__).resolve().parents[2] / "shared"
FOOTAGE = SHARED / "footage"
CONES = SHARED / "labelled" / "cones"
needs_footage = pytest.mark.skipif(
    not (FOOTAGE / "MANIFEST.tsv").is_file(), reason="shared footage not present"
)
needs_cones = pytest.mark.skipif(not (CONES / "data.yaml").is_file(), reason="shared cones data not present")
TINY_CLIPS = ["mi3_workzone_phoenix", "mi3_workzone_boston", "muchlisin_driving", "vankata_road"]


def test_frame_metrics_score_perfect_and_inverted_predictions():
    # Given labels and predictions that match them, then the opposite ones
    labels = [1, 1, 0, 0, 0]
    good = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.3])
    # When the metrics are computed
    right = train_scorer.frame_metrics(labels, good)
    wrong = train_scorer.frame_metrics(labels, 1 - good)
    # Then MCC, accuracy and AUC are perfect for one and reversed for the other
    assert (right["mcc"], right["accuracy"], right["roc_auc"]) == pytest.approx((1.0, 1.0, 1.0))
    assert (wrong["mcc"], wrong["accuracy"], wrong["roc_auc"]) == pytest.approx((-1.0, 0.0, 0.0))


def test_distortions_keep_the_image_shape_and_change_its_pixels():
    # Given a 224x224 frame with structure
    image = torch.arange(3 * 224 * 224).reshape(3, 224, 224).remainder(251).to(torch.uint8)
    # When each subnet-style distortion is applied
    for name, distort in train_scorer.distortions().items():
        out = distort(image)
        # Then it is still a 224x224 uint8 image, but a different one
        assert out.shape == image.shape and out.dtype == torch.uint8, name
        assert not torch.equal(out, image), name


def test_read_manifest_names_a_missing_manifest(tmp_path):
    # Given a folder without MANIFEST.tsv; When read; Then FootageError names the file
    with pytest.raises(FootageError, match="MANIFEST.tsv"):
        train_scorer.read_manifest(tmp_path)


@needs_footage
def test_folds_split_by_clip_keep_near_duplicates_together_and_hold_both_labels():
    # Given every clip of the shared footage
    clips = train_scorer.read_manifest(FOOTAGE)
    # When they are split into 4 folds
    folds = train_scorer.make_folds(clips, 4, seed=0)
    # Then each clip is held out exactly once, with both labels in every fold,
    names = [c.name for fold in folds for c in fold]
    assert sorted(names) == sorted(c.name for c in clips)
    assert all({c.label for c in fold} == {0, 1} for fold in folds)
    # and the two cuts of one Mio drive fall in the same fold
    fold_of = {c.name: i for i, fold in enumerate(folds) for c in fold}
    assert fold_of["kartikey_dashcam1"] == fold_of["kartikey_dashcam2"]


@needs_footage
def test_roadwork_clip_frames_are_labelled_by_span_and_ambiguous_ones_left_out():
    # Given a roadwork clip: clear street to 5.5 s, ambiguous to 9 s, roadwork to 14.5 s,
    # clear street again from 15.5 s (17.7 s long)
    clip = next(c for c in train_scorer.read_manifest(FOOTAGE) if c.name == "mi3_workzone_los_angeles")
    # When frames are sampled at 1 fps
    frames = train_scorer.extract_frames(clip, fps=1.0, short_side=64)
    # Then 0-5 s and 16-17 s are clear, 9-14 s roadwork, 6-8 s and 15 s left out
    assert [label for _, label in frames] == [0] * 6 + [1] * 6 + [0] * 2
    assert frames[0][0].shape[1] == 64


@needs_footage
def test_scorer_training_runs_end_to_end_for_one_short_epoch_on_a_tiny_subset(tmp_path):
    # Given four clips, two frames each, one epoch, two clip-wise folds
    settings = train_scorer.ScorerTrainSettings(
        footage=str(FOOTAGE),
        out=str(tmp_path),
        epochs=1,
        batch_size=4,
        cv_folds=2,
        sample_fps=1.0,
        short_side=128,
        clips=TINY_CLIPS,
        max_frames_per_clip=2,
    )
    # When training runs
    metadata = train_scorer.run(settings, log=lambda line: None)
    # Then weights and metadata are written, with per-fold figures on held-out clips
    folds = metadata["validation"]["folds"]
    assert len(folds) == 2
    assert not set(folds[0]["held_out"]) & set(folds[1]["held_out"])
    assert set(metadata["validation"]["summary"]) == {"clean", "rotation", "flip", "blur", "noise", "jpeg"}
    saved = json.loads((tmp_path / "scorer.json").read_text())
    assert [f["held_out"] for f in saved["validation"]["folds"]] == [f["held_out"] for f in folds]
    assert metadata["training_data"]["frames"] == {"roadwork": 4, "clear": 4}
    assert metadata["settings"]["same_camera_clear_weight"] > 1
    # and the weights load as a scorer
    from stages.scorer import RoadworkScorer

    probs, _ = RoadworkScorer.load(tmp_path / "scorer.pt").score(
        torch.zeros(1, 3, 90, 160, dtype=torch.uint8)
    )
    assert 0.0 <= float(probs[0]) <= 1.0


def _tiny_cones(root: Path) -> Path:
    for split, count in (("train", 4), ("valid", 2), ("test", 2)):
        for kind in ("images", "labels"):
            (root / kind / split).mkdir(parents=True)
        for image in sorted((CONES / "images" / split).iterdir())[:count]:
            (root / "images" / split / image.name).symlink_to(image)
            label = CONES / "labels" / split / f"{image.stem}.txt"
            (root / "labels" / split / label.name).symlink_to(label)
    (root / "data.yaml").write_text((CONES / "data.yaml").read_text())
    return root


def test_detector_data_without_a_test_split_is_rejected(tmp_path):
    # Given a data.yaml whose splits are missing
    from stages.train import detector

    (tmp_path / "data.yaml").write_text(
        "path: .\ntrain: images/train\nval: images/valid\ntest: images/test\n"
    )
    # When prepared; Then InputError names the split
    with pytest.raises(InputError, match="'train'"):
        detector.prepare_data(tmp_path, tmp_path / "work")


@needs_cones
def test_detector_training_runs_end_to_end_for_one_short_epoch_on_a_tiny_subset(tmp_path):
    # Given eight labelled images and tiny settings
    pytest.importorskip("ultralytics")
    import click
    from click.testing import CliRunner

    from workers.cli.models import register

    cones = _tiny_cones(tmp_path / "cones")
    settings = tmp_path / "tiny.yaml"
    settings.write_text("model: yolo11n.yaml\nimgsz: 64\nbatch: 4\nworkers: 0\nseed: 0\nsingle_cls: true\n")
    cli = click.Group()
    register(cli)
    # When `train detector` runs one epoch on the CPU
    args = [
        "train",
        "detector",
        "--cones",
        str(cones),
        "--out",
        str(tmp_path / "out"),
        "--settings",
        str(settings),
        "--device",
        "cpu",
        "--epochs",
        "1",
    ]
    result = CliRunner().invoke(cli, args)
    # Then the weights and a metadata file with the test split's mAP50 are written
    assert result.exit_code == 0, result.output
    metadata = json.loads((tmp_path / "out" / "cones_yolo11n.json").read_text())
    assert 0.0 <= metadata["test"]["map50"] <= 1.0
    assert metadata["settings"]["epochs"] == 1
    assert "CC BY 4.0" in metadata["training_data"]["attribution"]
    assert (tmp_path / "out" / "cones_yolo11n.pt").stat().st_size > 1_000_000
    # and no label cache was written into the data folder
    assert not list((cones / "labels").glob("*.cache"))

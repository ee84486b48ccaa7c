"""Source-held-out training: folds never train on a held-out source's pixels, and the whole
run (copy-paste, scorer, detector, combined rule) goes end to end on the CPU on a tiny pack."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
torch = pytest.importorskip("torch")
pytest.importorskip("efficientnet_lite_pytorch")

from stages.train.heldout import HeldoutSettings, allowed, detector_dataset, run
from stages.train.sources import Item, write_items


def _scene(path: Path, rng: np.random.Generator, cones: int) -> None:
    image = np.zeros((96, 160, 3), np.uint8)
    image[:40] = rng.integers(150, 220, 3)
    image[40:] = rng.integers(50, 90, 3)
    for _ in range(cones):
        x, y = int(rng.integers(20, 140)), int(rng.integers(55, 85))
        cv2.fillPoly(image, [np.array([[x, y - 12], [x - 5, y], [x + 5, y]], np.int32)], (0, 120, 255))
    cv2.imwrite(str(path), image)


def _cone_photo(path: Path, rng: np.random.Generator) -> tuple:
    image = np.full((80, 80, 3), 100, np.uint8) + rng.integers(0, 10, (80, 80, 3), dtype=np.uint8)
    cv2.fillPoly(image, [np.array([[40, 10], [22, 70], [58, 70]], np.int32)], (0, 120, 255))
    cv2.imwrite(str(path), image)
    return ((0, 0.5, 0.5, 40 / 80, 62 / 80),)


@pytest.fixture
def pack(tmp_path) -> Path:
    """Three clear-road cameras, one camera with roadwork and clear frames, cone photos."""
    rng = np.random.default_rng(0)
    root = tmp_path / "pack"
    (root / "images").mkdir(parents=True)
    items = []
    for source, roadwork in (("camA", 0), ("camB", 0), ("camC", 0), ("zone", 1)):
        for i in range(6):
            label = roadwork and i % 2 == 0
            path = root / "images" / f"{source}_{i}.jpg"
            _scene(path, rng, cones=3 if label else 0)
            items.append(Item(path, int(label), source, "frames"))
    for i, split in enumerate(["train"] * 6 + ["val"] * 2 + ["test"] * 2):
        path = root / "images" / f"cone_{i}.jpg"
        items.append(Item(path, -1, "photos", "cones", split, _cone_photo(path, rng)))
    write_items(root / "items.tsv", items, relative_to=root)
    return root


def test_a_fold_never_trains_on_a_held_out_sources_pixels(pack, tmp_path):
    from stages.train.sources import read_pack

    items = read_pack(pack)
    synthetic = [
        Item(tmp_path / "s1.jpg", 1, "camB", "synthetic", "", ((0, 0.5, 0.5, 0.1, 0.1),), contains=("photos",)),
        Item(tmp_path / "s2.jpg", 1, "camA", "synthetic", "", ((0, 0.5, 0.5, 0.1, 0.1),), contains=("photos",)),
    ]
    for s in synthetic:
        s.path.write_bytes(b"")
    # Holding out camA drops its frames and the frame pasted onto camA; holding out the
    # photos' source drops the photos and every frame pasted from them.
    assert not allowed(synthetic[1], {"camA"}) and allowed(synthetic[0], {"camA"})
    assert not allowed(synthetic[0], {"photos"})
    data = detector_dataset(items, synthetic, {"camA"}, tmp_path / "fold")
    linked = [p.resolve().name for p in (data.parent / "images").rglob("*") if p.is_symlink()]
    assert linked and not [n for n in linked if n.startswith("camA") or n == "s2.jpg"]
    assert "s1.jpg" in linked and any(n.startswith("camB") for n in linked)
    # Boxes travel with the images; background frames get empty label files.
    labels = {p.name: p.read_text() for p in (data.parent / "labels").rglob("*.txt")}
    assert any(text.startswith("0 ") for text in labels.values()) and "" in labels.values()


@pytest.mark.slow
def test_heldout_run_trains_scorer_detector_and_rule_end_to_end_on_the_cpu(pack, tmp_path):
    from stages.classify import FrameClassifier
    from stages.scorer import RoadworkScorer, read_image

    out = tmp_path / "out"
    settings = HeldoutSettings(
        pack=str(pack), out=str(out), folds=2, archs=["efficientnet-lite0"], epochs=1, batch_size=4,
        workers=0, short_side=64, synthetic=8, det_epochs=1, det_imgsz=64, det_batch=4, det_workers=0,
    )
    result = run(settings, log=lambda _: None)
    # Every real scene frame got a held-out score from each model and the rule.
    assert len(result["rows"]) == 24
    assert all({"scorer", "det_max", "combined"} <= set(r) for r in result["rows"])
    # Each scene source is in exactly one fold, and has its own figures.
    assert sorted(s for fold in result["folds"] for s in fold) == ["camA", "camB", "camC", "zone"]
    assert set(result["figures"]["scorer"]) == {"camA", "camB", "camC", "zone", "pooled"}
    # The only roadwork source gets no combined figure: the others hold no roadwork to fit on.
    assert set(result["figures"]["combined"]) == {"camA", "camB", "camC", "pooled"}
    assert set(result["rule"]["coefficients"]) == {"bias", "scorer_logit", "det_max", "det_count"}
    # Copy-paste frames were made on the scenes' clear frames, and counted by their source.
    pasted = {s: c.get("synthetic:roadwork", 0) for s, c in result["counts"].items()}
    assert 1 <= sum(pasted.values()) <= 8 and set(pasted) >= {"camA", "camB", "camC", "zone", "photos"}
    # What it ships loads the way the pipeline and classify load it.
    scorer = RoadworkScorer.load(out / "scorer.pt")
    assert scorer.metadata["model"]["arch"] == "efficientnet-lite0"
    assert json.loads((out / "roadwork_yolo11n.json").read_text())["model"]["classes"][0] == "cone"
    classifier = FrameClassifier.load(out / "scorer.pt", out / "roadwork_yolo11n.pt", out / "classify.json")
    (verdict,) = classifier.classify([read_image(pack / "images" / "zone_0.jpg")])
    assert 0.0 <= verdict.roadwork_probability <= 1.0


def test_drawn_objects_join_the_copy_paste_set_and_every_fold_may_train_on_them(pack, tmp_path):
    from stages.train.heldout import HeldoutSettings, load_items, scene_items
    from stages.train.procedural import PROCEDURAL_SOURCE

    settings = HeldoutSettings(pack=str(pack), out=str(tmp_path / "out"), synthetic=40, procedural=3)
    items, synthetic = load_items(settings, log=lambda line: None)
    drawn = [s for s in synthetic if PROCEDURAL_SOURCE in s.contains]
    classes = {c for s in drawn for c, *_ in s.boxes}
    assert drawn and classes - {0}  # drums, signs … besides cones
    # Holding out any scene source (or all of them) keeps the frames made only of drawn
    # objects on the other sources' roads: drawn objects come from no camera.
    scenes = {i.source for i in scene_items(items)}
    for s in drawn:
        assert allowed(s, scenes - {s.source}) and not allowed(s, {s.source})


def test_a_rerun_asking_for_another_copy_paste_set_is_refused_not_served_the_old_one(pack, tmp_path):
    from stages.train.heldout import HeldoutSettings, load_items

    # Given an --out whose copy-paste set was made without drawn objects
    out = str(tmp_path / "out")
    load_items(HeldoutSettings(pack=str(pack), out=out, synthetic=20), log=lambda line: None)
    # When a rerun into it asks for drawn objects; Then it says so instead of reusing the set
    with pytest.raises(ValueError, match="procedural"):
        load_items(HeldoutSettings(pack=str(pack), out=out, synthetic=20, procedural=2), log=lambda line: None)
    # And a rerun with the same settings (a resume) still reuses it
    _, again = load_items(HeldoutSettings(pack=str(pack), out=out, synthetic=20), log=lambda line: None)
    assert again


def test_hard_negatives_train_the_detector_as_background_on_every_fold_but_their_own(pack, tmp_path):
    from stages.train.heldout import HeldoutSettings, load_items

    settings = HeldoutSettings(pack=str(pack), out=str(tmp_path / "out"), synthetic=10, procedural=2,
                               distractors=2, negatives=8)
    items, synthetic = load_items(settings, log=lambda line: None)
    negatives = [s for s in synthetic if s.label == 0]
    assert negatives and all(not s.boxes for s in negatives)
    held = negatives[0].source
    data = detector_dataset(items, synthetic, {held}, tmp_path / "fold")
    linked = {p.resolve().name: p for p in (data.parent / "images").rglob("*") if p.is_symlink()}
    kept = [s for s in negatives if s.source != held]
    assert kept and all(s.path.name in linked for s in kept)
    assert not [s for s in negatives if s.source == held and s.path.name in linked]
    for s in kept:  # an empty label file: a background image to YOLO
        link = linked[s.path.name]
        assert (data.parent / "labels" / link.parent.name / f"{link.stem}.txt").read_text() == ""
    # The set's stamp knows the negatives: a rerun asking for none is refused.
    with pytest.raises(ValueError, match="negatives"):
        load_items(HeldoutSettings(pack=str(pack), out=settings.out, synthetic=10, procedural=2), log=lambda line: None)


def test_the_scorers_synthetic_share_keeps_the_hard_negatives_in_proportion(tmp_path):
    from stages.train.heldout import _scorer_share

    # Given a set as generate lists it: 8 roadwork frames, then 4 hard negatives
    synthetic = [Item(tmp_path / f"synth_{i}.jpg", 1, "camA", "synthetic") for i in range(8)]
    synthetic += [Item(tmp_path / f"neg_{j}.jpg", 0, "camA", "synthetic") for j in range(4)]
    # When the scorer takes 6 of them
    share = _scorer_share(synthetic, HeldoutSettings(scorer_synthetic=6))
    # Then a third are negatives, as in the whole set (a head of the list had none)
    assert len(share) == 6 and sum(i.label == 0 for i in share) == 2
    # And 0, or more than the set holds, takes all
    assert _scorer_share(synthetic, HeldoutSettings(scorer_synthetic=0)) == synthetic
    assert _scorer_share(synthetic, HeldoutSettings(scorer_synthetic=50)) == synthetic


def test_an_old_stamp_without_the_later_counts_reads_them_as_zero(pack, tmp_path):
    from stages.train.heldout import load_items

    # Given a copy-paste set stamped before procedural, distractors and negatives existed
    out = tmp_path / "out"
    synth = out / "synthetic"
    write_items(synth / "items.tsv", [], relative_to=synth)
    (synth / "made.json").write_text(json.dumps({"synthetic": 20, "seed": 0}))
    # When a run asks for the same set (none of the later counts)
    _, synthetic = load_items(HeldoutSettings(pack=str(pack), out=str(out), synthetic=20), log=lambda line: None)
    # Then the set is served, not refused
    assert synthetic == []
    # And a run asking for negatives the old set lacks is still refused
    with pytest.raises(ValueError, match="negatives"):
        load_items(HeldoutSettings(pack=str(pack), out=str(out), synthetic=20, distractors=2, negatives=3),
                   log=lambda line: None)  # fmt: skip

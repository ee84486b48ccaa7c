"""Drawn distractors (hard negatives): look-alikes of roadwork pasted without boxes.

They must never carry a box, must not change the roadwork frames' boxes, must come back
the same from a seed, and their negative frames must stay clear (label 0) and count as
their background's source when a source is held out."""

from __future__ import annotations

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from road_frames import road_frame

from stages.train.copypaste import generate, paste_distractors
from stages.train.distractors import DISTRACTOR_CLASS, DISTRACTORS, draw_distractors, height_m
from stages.train.procedural import DRAW_HEIGHT, draw_objects
from stages.train.sources import read_pack
from stream.errors import InputError


@pytest.fixture
def roads(tmp_path):
    return [road_frame(tmp_path / f"road{i}.jpg", f"cam{i}") for i in range(3)]


def test_every_kind_is_drawn_with_a_mask_and_no_class():
    drawn = draw_distractors(3, seed=4)
    assert len(drawn) == 3 * len(DISTRACTORS)
    assert {d.name.split(":")[1].split("#")[0] for d in drawn} == set(DISTRACTORS)
    for d in drawn:
        h, w, channels = d.rgba.shape
        assert channels == 4 and h <= DRAW_HEIGHT and w >= 4, d.name
        assert d.cls == DISTRACTOR_CLASS
        assert (d.rgba[..., 3] > 0).mean() > 0.3, d.name  # mostly object, trimmed
        low, high = height_m(d)
        assert 0 < low < high


def test_distractors_come_back_the_same_from_their_seed():
    a, b, c = draw_distractors(2, seed=1), draw_distractors(2, seed=1), draw_distractors(2, seed=2)
    assert all(np.array_equal(x.rgba, y.rgba) for x, y in zip(a, b))
    assert not all(np.array_equal(x.rgba, y.rgba) for x, y in zip(a, c))


def test_pasted_distractors_change_pixels_inside_their_placements_only():
    frame = np.full((360, 640, 3), 80, np.uint8)
    frame[:160] = 200
    drawn = draw_distractors(2, seed=0)
    image, placements = paste_distractors(frame, drawn, np.random.default_rng(3), (4, 6))
    assert placements
    changed = np.abs(image.astype(int) - frame.astype(int)).max(axis=2) > 12
    inside = np.zeros(changed.shape, bool)
    for p in placements:
        x1, y1, x2, y2 = p.box
        assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 360
        # the contact shadow (an ellipse 1.2 widths wide, 0.3 deep, blurred) darkens the
        # ground below and beside the object
        m = int(0.3 * (x2 - x1)) + 4
        inside[max(0, int(y1) - 2) : int(y2) + m, max(0, int(x1) - m) : int(x2) + m] = True
    assert changed.any() and not (changed & ~inside).any()


def test_negative_frames_are_clear_without_boxes_and_roadwork_boxes_stay_the_same(roads, tmp_path):
    cutouts = draw_objects(2, seed=0, classes=["cone", "drum"])
    plain = generate(roads, cutouts, 6, tmp_path / "plain", seed=5, log=lambda _: None)
    mixed = generate(roads, cutouts, 6, tmp_path / "mixed", seed=5, log=lambda _: None,
                     distractors=draw_distractors(2, seed=0), negatives=5)
    positives = [i for i in mixed if i.label == 1]
    negatives = [i for i in mixed if i.label == 0]
    # Distractors add no box and do not move the work zone's boxes.
    assert [i.boxes for i in positives] == [i.boxes for i in plain]
    assert 1 <= len(negatives) <= 5
    back = {i.path.name: i for i in read_pack(tmp_path / "mixed")}
    for item in negatives:
        assert item.boxes == () and item.origin == "synthetic" and item.source.startswith("cam")
        assert (tmp_path / "mixed" / "labels" / f"{item.path.stem}.txt").read_text() == ""
        assert back[item.path.name].label == 0 and "distractor:" in item.note
        assert not item.contains  # drawn: no other source's pixels


def test_negatives_without_distractors_are_refused(roads, tmp_path):
    with pytest.raises(InputError, match="distractors"):
        generate(roads, draw_objects(1, seed=0, classes=["cone"]), 2, tmp_path / "x", negatives=3)
    # refused up front: no roadwork frame was made first
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").rglob("*.jpg"))


def test_heldout_refuses_negatives_without_distractors_before_any_work(capsys):
    from stages.train.heldout import HeldoutSettings, parse_args

    with pytest.raises(InputError, match="--negatives 3 needs distractors"):
        HeldoutSettings(negatives=3)
    # The command line: a usage error naming the problem, exit status 2
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--negatives", "3"])
    assert exit_info.value.code == 2 and "needs distractors" in capsys.readouterr().err
    assert HeldoutSettings(negatives=3, distractors=2).negatives == 3

"""Roadwork objects drawn from code: each class looks like its device (colours, shape),
the set is reproduced from its seed, and drawn objects paste with valid boxes and never
count as a held-out scene source."""

from __future__ import annotations

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from stages.train.copypaste import paste
from stages.train.procedural import DRAW_HEIGHT, DRAWERS, PROCEDURAL_SOURCE, draw_objects
from stages.train.sources import ROADWORK_CLASSES


def _share(rgba: np.ndarray, test) -> float:
    """Share of the object's opaque pixels for which ``test(r, g, b)`` holds."""
    opaque = rgba[..., 3] > 0
    r, g, b = (rgba[..., k].astype(int)[opaque] for k in range(3))
    return float(test(r, g, b).mean())


def _orange(r, g, b):
    return (r > 150) & (r > g + 40) & (g > b)


def _white(r, g, b):
    return (np.minimum(np.minimum(r, g), b) > 150) & (np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b) < 50)


def test_every_drawn_class_is_a_roadwork_class_with_a_real_mask():
    objects = draw_objects(4, seed=1)
    assert {ROADWORK_CLASSES[o.cls] for o in objects} == set(DRAWERS)
    for o in objects:
        h, w, channels = o.rgba.shape
        assert channels == 4 and 8 <= h <= DRAW_HEIGHT and w >= 8, o.name
        alpha = o.rgba[..., 3]
        assert set(np.unique(alpha)) <= {0, 255}
        # Trimmed to the object: every edge row and column holds some of it.
        assert alpha[0].any() and alpha[-1].any() and alpha[:, 0].any() and alpha[:, -1].any(), o.name
        assert o.source == PROCEDURAL_SOURCE and o.name.startswith("drawn:")


@pytest.mark.parametrize(("name", "min_orange", "min_white"), [
    ("drum", 0.25, 0.15), ("cone", 0.4, 0.05), ("tubular_marker", 0.4, 0.05), ("vertical_panel", 0.2, 0.15),
])
def test_striped_devices_are_orange_and_white(name, min_orange, min_white):
    # Given seeds, When drawn, Then the device's retroreflective look is there on average:
    # orange body and white bands (MUTCD 6F), not some other colour.
    objects = draw_objects(12, seed=2, classes=[name])
    orange = np.mean([_share(o.rgba, _orange) for o in objects])
    white = np.mean([_share(o.rgba, _white) for o in objects])
    assert orange > min_orange and white > min_white, (orange, white)


def test_shapes_follow_the_device():
    drums = draw_objects(8, seed=3, classes=["drum"])
    markers = draw_objects(8, seed=3, classes=["tubular_marker"])
    barriers = draw_objects(8, seed=3, classes=["barrier"])
    aspect = lambda objs: np.median([o.rgba.shape[1] / o.rgba.shape[0] for o in objs])  # noqa: E731
    # A tubular marker is a thin post, a drum a squat cylinder, a barrier long and low.
    assert aspect(markers) < 0.35 < aspect(drums) < 0.8 < 1.8 < aspect(barriers)


def test_a_seed_reproduces_the_set_and_objects_do_not_depend_on_the_count():
    a = draw_objects(3, seed=7)
    b = draw_objects(5, seed=7)
    c = draw_objects(3, seed=8)
    by_name = {o.name: o.rgba for o in b}
    assert all(np.array_equal(o.rgba, by_name[o.name]) for o in a)
    assert any(not np.array_equal(x.rgba, y.rgba) for x, y in zip(a, c))


def test_drawn_objects_paste_inside_the_frame_with_valid_boxes():
    background = np.zeros((360, 640, 3), np.uint8)
    background[:160] = (140, 170, 200)
    background[160:] = (70, 70, 70)
    objects = draw_objects(3, seed=0)
    pasted = 0
    for i in range(30):
        image, boxes, placements = paste(background, objects, np.random.default_rng((0, i)))
        assert len(boxes) == len(placements)
        for (cls, cx, cy, w, h), placement in zip(boxes, placements):
            assert cls == objects[placement.cutout].cls
            assert 0 <= cx - w / 2 and cx + w / 2 <= 1 and 0 <= cy - h / 2 and cy + h / 2 <= 1
            assert w * 640 >= 3 and h * 360 >= 10
            x1, y1, x2, y2 = (round(v) for v in placement.box)
            assert np.abs(image[y1:y2, x1:x2].astype(int) - background[y1:y2, x1:x2]).sum() > 0
        pasted += len(boxes)
    assert pasted > 30

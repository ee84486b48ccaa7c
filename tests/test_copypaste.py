"""Copy-paste synthesis of roadwork frames: objects land inside the frame, on the road,
with valid boxes, and a seed reproduces the set exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from road_frames import road_frame

from stages.train.copypaste import cut_objects, generate, paste
from stages.train.sources import ROADWORK_CLASSES, Item, read_pack, source_folds, write_items


def _cone_photo(path: Path, rng: np.random.Generator) -> Item:
    """A grey photo with an orange triangle (a cone) and its YOLO box."""
    image = np.full((200, 240, 3), 90, np.uint8)
    image += rng.integers(0, 20, image.shape, dtype=np.uint8)
    pts = np.array([[120, 40], [90, 160], [150, 160]], np.int32)
    cv2.fillPoly(image, [pts], (0, 120, 255))  # BGR orange
    cv2.imwrite(str(path), image)
    box = (0, 120 / 240, 100 / 200, 64 / 240, 124 / 200)
    return Item(path, -1, "photos", "cones", "train", (box,), path.name)


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    photos = [_cone_photo(tmp_path / f"cone{i}.jpg", rng) for i in range(3)]
    roads = [road_frame(tmp_path / f"road{i}.jpg", f"cam{i}") for i in range(3)]
    return cut_objects(photos), roads


def test_cut_objects_keeps_the_object_not_its_box(inputs):
    # Given photos of one orange cone each, When cut, Then each cutout's mask covers the
    # cone's orange pixels and leaves most of its box's grey corners out.
    cutouts, _ = inputs
    assert len(cutouts) == 3
    for cutout in cutouts:
        rgb, alpha = cutout.rgba[..., :3], cutout.rgba[..., 3] > 0
        orange = (rgb[..., 0] > 200) & (rgb[..., 2] < 60)
        assert orange[alpha].mean() > 0.8
        assert alpha.mean() < 0.85  # a triangle fills about half its box
        assert ROADWORK_CLASSES[cutout.cls] == "cone" and cutout.source == "photos"


def test_pasted_objects_lie_inside_the_frame_with_valid_boxes_on_theroad_frame(inputs):
    cutouts, roads = inputs
    background = cv2.cvtColor(cv2.imread(str(roads[0].path)), cv2.COLOR_BGR2RGB)
    found = 0
    for seed in range(40):
        image, boxes, placements = paste(background, cutouts, np.random.default_rng(seed))
        assert image.shape == background.shape and len(boxes) == len(placements)
        for cls, cx, cy, w, h in boxes:
            assert ROADWORK_CLASSES[cls] == "cone"
            assert 0 < w <= 1 and 0 < h <= 1
            assert 0 <= cx - w / 2 and cx + w / 2 <= 1 and 0 <= cy - h / 2 and cy + h / 2 <= 1
            # Standing on the ground: the box's foot lies below the highest horizon drawn.
            assert cy + h / 2 > 0.38
            # The box holds pasted (orange) pixels.
            x1, y1 = int((cx - w / 2) * 640), int((cy - h / 2) * 360)
            x2, y2 = int(np.ceil((cx + w / 2) * 640)), int(np.ceil((cy + h / 2) * 360))
            patch = image[y1:y2, x1:x2].astype(int)
            assert ((patch[..., 0] - patch[..., 2]) > 40).any()
            found += 1
    assert found > 40  # zones of several objects, most kept


def test_smaller_towards_the_horizon(inputs):
    # Across many zones, objects whose foot is nearer the horizon are smaller.
    cutouts, roads = inputs
    background = cv2.cvtColor(cv2.imread(str(roads[0].path)), cv2.COLOR_BGR2RGB)
    feet, heights = [], []
    for seed in range(60):
        _, boxes, _ = paste(background, cutouts, np.random.default_rng(seed))
        for _, _, cy, _, h in boxes:
            feet.append(cy + h / 2)
            heights.append(h)
    assert np.corrcoef(feet, heights)[0, 1] > 0.5


def test_generate_is_reproducible_from_its_seed(inputs, tmp_path):
    cutouts, roads = inputs
    a = generate(roads, cutouts, 6, tmp_path / "a", seed=7, log=lambda _: None)
    b = generate(roads, cutouts, 6, tmp_path / "b", seed=7, log=lambda _: None)
    c = generate(roads, cutouts, 6, tmp_path / "c", seed=8, log=lambda _: None)
    assert [i.path.read_bytes() for i in a] == [i.path.read_bytes() for i in b]
    assert [i.boxes for i in a] == [i.boxes for i in b]
    assert [i.path.read_bytes() for i in a] != [i.path.read_bytes() for i in c]
    # Labels on disk match the items, and the set reads back with its sources.
    back = read_pack(tmp_path / "a")
    assert [len(i.boxes) for i in back] == [len(i.boxes) for i in a]
    for got, made in zip(back, a):
        assert np.allclose(got.boxes, made.boxes, atol=1e-5)
    for item in back:
        assert item.label == 1 and item.origin == "synthetic" and item.source.startswith("cam")
        assert item.contains == ("photos",)  # the cutouts' source travels with the frame
        rows = (tmp_path / "a" / "labels" / f"{item.path.stem}.txt").read_text().split("\n")
        assert len([r for r in rows if r]) == len(item.boxes)


def test_generate_refuses_to_run_without_objects(inputs, tmp_path):
    _, roads = inputs
    from stream.errors import InputError

    with pytest.raises(InputError, match="cutouts"):
        generate(roads, [], 3, tmp_path / "x")


def test_source_folds_hold_each_source_once_and_spread_the_positives(tmp_path):
    items = [Item(tmp_path / f"{s}{i}.jpg", int(s.startswith("pos") and i < 3), s, "frames") for s in
             ("posA", "posB", "posC", "neg1", "neg2", "neg3", "neg4") for i in range(5)]
    folds = source_folds(items, 3)
    assert sorted(s for f in folds for s in f) == sorted({i.source for i in items})
    # Every fold holds roadwork: the three positive sources went to three folds.
    assert all(any(s.startswith("pos") for s in f) for f in folds)


def test_items_round_trip_through_the_tsv(tmp_path):
    item = Item(tmp_path / "x.jpg", 1, "src", "synthetic", "", ((0, 0.5, 0.5, 0.1, 0.2),), "note", ("other",))
    write_items(tmp_path / "items.tsv", [item], relative_to=tmp_path)
    (back,) = read_pack(tmp_path)
    assert back == item


def test_train_pack_keeps_every_frames_source_and_label(tmp_path):
    # Given a shared folder with labelled frames of two sources
    import click
    from click.testing import CliRunner

    from workers.cli.models import register

    cli = click.Group()
    register(cli)

    frames = tmp_path / "shared" / "labelled" / "frames"
    rows = ["file\tlabel\tsource_repo\tpath"]
    for i, (label, source) in enumerate([(0, "a/cams"), (1, "b/phone"), (0, "b/phone")]):
        path = frames / "images" / f"f{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.full((600, 900, 3), 40 * i, np.uint8))
        rows.append(f"images/f{i}.jpg\t{label}\t{source}\torig{i}.png")
    (frames / "MANIFEST.tsv").write_text("\n".join(rows) + "\n")
    # When packed with a 300 px long side
    out = tmp_path / "pack"
    result = CliRunner().invoke(cli, ["train", "pack", "--shared", str(tmp_path / "shared"), "--out", str(out),
                                      "--long-side", "300"])
    # Then every frame is there, shrunk, with its label and source
    assert result.exit_code == 0, result.output
    items = read_pack(out)
    assert [(i.label, i.source, i.origin) for i in items] == [(0, "a/cams", "frames"), (1, "b/phone", "frames"),
                                                               (0, "b/phone", "frames")]
    assert all(max(cv2.imread(str(i.path)).shape[:2]) == 300 for i in items)

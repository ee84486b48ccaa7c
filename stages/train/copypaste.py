"""Synthesised roadwork frames: objects cut from boxed photos, pasted onto clear roads.

Positives filmed by one camera teach a model that camera; pasting roadwork objects into
clear frames of every source gives each camera both labels. The method follows Dwibedi et
al., "Cut, Paste and Learn: Surprisingly Easy Synthesis for Instance Detection" (ICCV
2017: cut objects with a foreground mask, paste with blended edges, vary scale and place)
and Ghiasi et al., "Simple Copy-Paste is a Strong Data Augmentation Method for Instance
Segmentation" (CVPR 2021: random pasting works; scale jitter matters). Our boxed sets have
boxes, not masks, so each object's mask comes from OpenCV's GrabCut seeded with its box.

Placement follows a flat-road pinhole camera: for a random horizon ``y_h``, focal length
``f`` (pixels) and camera height ``hc`` (metres), an object standing at ground distance
``Z`` and lateral offset ``X`` has its base at ``y = y_h + f·hc/Z``, ``x = x_v + f·X/Z``
and a height of ``f·H/Z`` pixels for an object ``H`` metres tall — smaller towards the
horizon, standing on the road. Objects of one image form a work zone: a row along a lane
edge with a random taper and spacing, pasted far to near so near ones occlude far ones.
Each pasted object gets the background's brightness, a random blur, the background's
noise level and a soft contact shadow.

Everything is drawn from ``numpy.random.default_rng((seed, index))``, and GrabCut from a
fixed OpenCV seed, so a set is reproduced exactly from its seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.train.sources import ROADWORK_CLASSES, Item, write_items
from stream.errors import InputError

Log = Callable[[str], None]

#: Real height range in metres of each pastable class (MUTCD-sized devices).
OBJECT_HEIGHT_M: dict[str, tuple[float, float]] = {
    "cone": (0.45, 0.9),
    "drum": (0.9, 1.1),
    "barricade": (0.8, 1.3),
    "barrier": (0.8, 1.1),
    "vertical_panel": (0.9, 1.3),
    "tubular_marker": (0.7, 1.1),
    "roadwork_sign": (1.5, 2.2),
    "arrow_board": (2.2, 3.0),
    "worker": (1.6, 1.9),
}
#: A pasted box smaller than this many pixels is not kept. At 6 px (first run) the
#: detector learnt to fire on any small far blob (people, bins): 39 of 109 clear CamVid
#: frames got a "cone" box.
MIN_BOX_PX = 10
#: GrabCut runs on crops shrunk to at most this many pixels a side.
GRABCUT_SIDE = 96
#: A pasted object less visible than this (the rest outside the frame) is dropped.
MIN_VISIBLE = 0.5


@dataclass(frozen=True)
class Cutout:
    """An object cut from a boxed photo.

    Attributes:
        rgba: ``(h, w, 4)`` uint8, RGB plus the GrabCut mask as alpha (0 or 255).
        cls: index into ``ROADWORK_CLASSES``.
        source: the photo's source (kept for attribution and held-out checks).
        name: the photo's file name and box number.
    """

    rgba: np.ndarray
    cls: int
    source: str
    name: str


@dataclass(frozen=True)
class Placement:
    """One pasted object: its cutout index and box ``(x1, y1, x2, y2)`` in pixels."""

    cutout: int
    box: tuple[float, float, float, float]


# --------------------------------------------------------------------------- cutting


def cut_objects(items: Sequence[Item], *, min_side: int = 20, margin: float = 0.1) -> list[Cutout]:
    """Cut every boxed object that lies whole inside its photo.

    Parameters:
        items: items with ``boxes``; others are skipped.
        min_side: boxes smaller than this (pixels, either side) are skipped.
        margin: context around the box given to GrabCut, as a fraction of the box.

    Returns:
        The cutouts, tight around their mask.

    Raises:
        InputError: an image cannot be read.
    """
    import cv2

    cutouts = []
    for item in items:
        if not item.boxes:
            continue
        image = cv2.imread(str(item.path), cv2.IMREAD_COLOR)
        if image is None:
            message = f"{item.path}: not a readable image"
            raise InputError(message)
        height, width = image.shape[:2]
        for number, (cls, cx, cy, w, h) in enumerate(item.boxes):
            x1, y1, x2, y2 = (cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height
            # An object cut by the photo's edge would be pasted cut too.
            if x1 < 1 or y1 < 1 or x2 > width - 1 or y2 > height - 1 or min(x2 - x1, y2 - y1) < min_side:
                continue
            rgba = _grabcut(cv2, image, (x1, y1, x2, y2), margin)
            if rgba is not None:
                cutouts.append(Cutout(rgba, cls, item.source, f"{item.path.name}#{number}"))
    return cutouts


def _grabcut(cv2, image: np.ndarray, box: tuple[float, ...], margin: float) -> np.ndarray | None:
    height, width = image.shape[:2]
    x1, y1, x2, y2 = box
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    cx1, cy1 = int(max(0, x1 - mx)), int(max(0, y1 - my))
    cx2, cy2 = int(min(width, x2 + mx)), int(min(height, y2 + my))
    crop = np.ascontiguousarray(image[cy1:cy2, cx1:cx2])
    # GrabCut's cost grows with pixels: segment at most GRABCUT_SIDE pixels a side, then
    # bring the mask back to the crop's size.
    scale = min(1.0, GRABCUT_SIDE / max(crop.shape[:2]))
    small = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else crop
    rect = (
        int((x1 - cx1) * scale), int((y1 - cy1) * scale),
        max(2, int((x2 - x1) * scale)), max(2, int((y2 - y1) * scale)),
    )
    mask = np.zeros(small.shape[:2], np.uint8)
    cv2.setRNGSeed(0)  # GrabCut's GMM initialisation draws from OpenCV's RNG
    try:
        cv2.grabCut(small, mask, rect, np.zeros((1, 65)), np.zeros((1, 65)), 3, cv2.GC_INIT_WITH_RECT)
    except cv2.error:
        return None
    fg = np.isin(mask, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.uint8)
    if scale < 1:
        fg = cv2.resize(fg, (crop.shape[1], crop.shape[0]), interpolation=cv2.INTER_NEAREST)
    fg = fg.astype(bool)
    box_area = (x2 - x1) * (y2 - y1)
    # GrabCut failed to find the object (too little, or the whole rectangle): not usable.
    if fg.sum() < 0.2 * box_area or fg.sum() > 0.98 * box_area:
        return None
    ys, xs = np.nonzero(fg)
    ty1, ty2, tx1, tx2 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    rgb = cv2.cvtColor(crop[ty1:ty2, tx1:tx2], cv2.COLOR_BGR2RGB)
    alpha = (fg[ty1:ty2, tx1:tx2] * 255).astype(np.uint8)
    return np.dstack([rgb, alpha])


# --------------------------------------------------------------------------- pasting


def paste(
    background: np.ndarray, cutouts: Sequence[Cutout], rng: np.random.Generator
) -> tuple[np.ndarray, list[tuple[int, float, float, float, float]], list[Placement]]:
    """Paste one work zone of objects onto an RGB frame.

    Parameters:
        background: ``(H, W, 3)`` uint8 RGB; not changed.
        cutouts: what to paste from; one class is picked per zone (mixed with cones
            half the time, as zones lay cones before drums or barricades).
        rng: the only source of randomness.

    Returns:
        ``(image, boxes, placements)``: the new frame, YOLO rows ``(class, cx, cy, w, h)``
        normalised to the frame, and what was pasted where. Boxes may be empty when
        every drawn object fell outside the frame or below ``MIN_BOX_PX``.
    """
    height, width = background.shape[:2]
    out = background.astype(np.float32)
    noise_sigma = _noise_level(background)
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(cutouts):
        by_class.setdefault(c.cls, []).append(i)
    if not by_class:
        return background.copy(), [], []
    classes = sorted(by_class)
    main = classes[rng.integers(len(classes))]
    cone = ROADWORK_CLASSES.index("cone")
    mix = [main, cone] if cone in by_class and main != cone and rng.random() < 0.5 else [main]
    camera = _camera(rng, width, height)
    objects = []
    for zone in range(1 + int(rng.random() < 0.25)):  # sometimes a second row, other side
        side = rng.choice([-1.0, 1.0]) * (1 if zone == 0 else -1)
        x0, taper = side * rng.uniform(1.2, 4.5), rng.uniform(-0.15, 0.15)
        z, spacing = rng.uniform(4.0, 16.0), rng.uniform(3.0, 9.0)
        for _ in range(int(rng.integers(1, 7))):
            cls = mix[int(rng.integers(len(mix)))]
            objects.append((z, x0 + taper * (z - 4.0), by_class[cls][int(rng.integers(len(by_class[cls])))]))
            z += spacing * rng.uniform(0.8, 1.25)
    boxes, placements = [], []
    for z, x, index in sorted(objects, reverse=True):  # far first: near objects occlude
        placed = _paste_one(out, cutouts[index], z, x, camera, noise_sigma, rng)
        if placed is None:
            continue
        x1, y1, x2, y2 = placed
        boxes.append((cutouts[index].cls, (x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height))
        placements.append(Placement(index, placed))
    return out.clip(0, 255).round().astype(np.uint8), boxes, placements


def _camera(rng: np.random.Generator, width: int, height: int) -> dict[str, float]:
    return {
        "horizon": height * rng.uniform(0.38, 0.55),
        "vanish_x": width * (0.5 + rng.uniform(-0.12, 0.12)),
        "focal": width * rng.uniform(0.6, 1.0),
        "cam_height": rng.uniform(1.2, 1.6),
        "width": width,
        "height": height,
    }


def paste_distractors(
    background: np.ndarray, distractors: Sequence[Cutout], rng: np.random.Generator, count: tuple[int, int] = (1, 5)
) -> tuple[np.ndarray, list[Placement]]:
    """Paste look-alikes (``stages.train.distractors``) onto an RGB frame, with no box.

    Vehicles stand in a lane (lateral offset within 5 m of the camera), the rest by the
    road (2–9 m to either side), 5–40 m ahead, placed and blended like ``paste``'s objects.

    Parameters:
        background: ``(H, W, 3)`` uint8 RGB; not changed.
        distractors: what to paste from (``draw_distractors``).
        rng: the only source of randomness.
        count: how many to try, drawn from ``[low, high)`` (some may fall outside the frame).

    Returns:
        ``(image, placements)``: the new frame and what was pasted where.
    """
    from stages.train.distractors import height_m

    if not distractors:
        return background.copy(), []
    height, width = background.shape[:2]
    out = background.astype(np.float32)
    noise_sigma, camera = _noise_level(background), _camera(rng, width, height)
    objects = []
    for _ in range(int(rng.integers(*count))):
        index = int(rng.integers(len(distractors)))
        in_lane = distractors[index].name.startswith("distractor:vehicle")
        x = rng.uniform(-5.0, 5.0) if in_lane else rng.choice([-1.0, 1.0]) * rng.uniform(2.0, 9.0)
        objects.append((rng.uniform(5.0, 40.0), x, index))
    placements = []
    for z, x, index in sorted(objects, reverse=True):
        cutout = distractors[index]
        placed = _paste_one(out, cutout, z, x, camera, noise_sigma, rng, height_m(cutout))
        if placed is not None:
            placements.append(Placement(index, placed))
    return out.clip(0, 255).round().astype(np.uint8), placements


def _paste_one(out, cutout: Cutout, z, x, cam, noise_sigma, rng, height_range=None) -> tuple[float, float, float, float] | None:
    import cv2

    low, high = height_range or OBJECT_HEIGHT_M.get(ROADWORK_CLASSES[cutout.cls], (0.8, 1.2))
    px_h = cam["focal"] * rng.uniform(low, high) / z
    aspect = cutout.rgba.shape[1] / cutout.rgba.shape[0]
    px_w = px_h * aspect
    base_y = cam["horizon"] + cam["focal"] * cam["cam_height"] / z
    center_x = cam["vanish_x"] + cam["focal"] * x / z
    if px_h < MIN_BOX_PX or px_w < 3:
        return None
    x1, y1 = center_x - px_w / 2, base_y - px_h
    w, h = max(1, round(px_w)), max(1, round(px_h))
    ix1, iy1 = round(x1), round(y1)
    # Visible part of the object's rectangle inside the frame.
    vx1, vy1 = max(ix1, 0), max(iy1, 0)
    vx2, vy2 = min(ix1 + w, cam["width"]), min(iy1 + h, cam["height"])
    if vx2 - vx1 < MIN_BOX_PX or vy2 - vy1 < MIN_BOX_PX or (vx2 - vx1) * (vy2 - vy1) < MIN_VISIBLE * w * h:
        return None
    rgba = cv2.resize(cutout.rgba, (w, h), interpolation=cv2.INTER_AREA if h < cutout.rgba.shape[0] else cv2.INTER_LINEAR)
    rgb, alpha = rgba[..., :3].astype(np.float32), rgba[..., 3].astype(np.float32) / 255.0
    sigma = rng.uniform(0.0, 1.2)
    if sigma > 0.3:
        rgb = cv2.GaussianBlur(rgb, (0, 0), sigma)
    alpha = cv2.GaussianBlur(alpha, (0, 0), 0.6 + sigma / 2)  # blended edges (Dwibedi et al.)
    crop = (slice(vy1 - iy1, vy2 - iy1), slice(vx1 - ix1, vx2 - ix1))
    region = out[vy1:vy2, vx1:vx2]
    rgb, alpha = rgb[crop], alpha[crop][..., None]
    _shadow(out, center_x, base_y, px_w, cam)
    rgb = _match_brightness(rgb, alpha, region, rng)
    rgb += rng.normal(0.0, noise_sigma, rgb.shape).astype(np.float32)
    region[...] = alpha * rgb + (1 - alpha) * region
    ys, xs = np.nonzero(alpha[..., 0] > 0.3)
    if len(xs) == 0:
        return None
    return (vx1 + xs.min(), vy1 + ys.min(), vx1 + xs.max() + 1.0, vy1 + ys.max() + 1.0)


def _match_brightness(rgb: np.ndarray, alpha: np.ndarray, region: np.ndarray, rng) -> np.ndarray:
    # Half-way to the scene's brightness: a lit cone stays brighter than asphalt, but a
    # cone from a sunny photo pasted into a night frame must not glow.
    weight = alpha[..., 0] > 0.5
    obj = float(rgb[weight].mean()) if weight.any() else float(rgb.mean())
    scene = float(region.mean())
    gain = float(np.clip(math.sqrt(max(scene, 1.0) / max(obj, 1.0)) * rng.uniform(0.85, 1.15), 0.45, 1.8))
    tint = region.reshape(-1, 3).mean(0) / max(region.mean(), 1.0)
    return rgb * gain * (tint**0.3)


def _shadow(out: np.ndarray, cx: float, base_y: float, px_w: float, cam) -> None:
    import cv2

    mask = np.zeros(out.shape[:2], np.float32)
    axes = (max(1, round(px_w * 0.6)), max(1, round(px_w * 0.15)))
    cv2.ellipse(mask, (round(cx), round(base_y)), axes, 0, 0, 360, 1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), max(1.0, px_w * 0.1))
    out *= 1 - 0.35 * mask[..., None]


def _noise_level(image: np.ndarray) -> float:
    # Sensor noise and compression grain: the high-frequency residual's robust spread.
    import cv2

    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    residual = gray - cv2.GaussianBlur(gray, (0, 0), 1.0)
    return float(np.clip(1.4826 * np.median(np.abs(residual)), 0.0, 8.0))


# --------------------------------------------------------------------------- sets


def generate(
    backgrounds: Sequence[Item],
    cutouts: Sequence[Cutout],
    count: int,
    out: str | Path,
    *,
    seed: int = 0,
    log: Log = print,
    distractors: Sequence[Cutout] = (),
    negatives: int = 0,
) -> list[Item]:
    """Write ``count`` synthesised roadwork frames with their YOLO labels, and ``negatives``
    hard-negative frames (distractors pasted, no roadwork, empty labels).

    Each frame ``i`` uses ``numpy.random.default_rng((seed, i))``: the set is the same for
    the same inputs and seed, and frame ``i`` does not depend on ``count``. Distractors in
    roadwork frame ``i`` (half of them get 1–2) draw from ``default_rng((seed, i, 1))`` and
    negative frame ``j`` from ``default_rng((seed, j, 2))``, so the roadwork frames' own
    draws are the same with or without distractors.

    Parameters:
        backgrounds: clear frames (label 0) to paste into; frame ``i`` takes one at random.
        cutouts: the objects (``cut_objects``).
        count: frames to write.
        out: the folder: ``images/synth_<seed>_<i>.jpg``, ``labels/…txt``, ``items.tsv``.
        seed: the set's seed.
        distractors: look-alikes (``stages.train.distractors``) pasted without boxes.
        negatives: hard-negative frames to write (``neg_<seed>_<j>.jpg``); needs distractors.

    Returns:
        The items (origin ``synthetic``, source = the background's source): label 1 with
        boxes, then the negatives, label 0 without boxes.

    Raises:
        InputError: no backgrounds or no cutouts, ``negatives`` without ``distractors``
            (before anything is written), or a background does not read.
    """
    import cv2

    if not backgrounds or not cutouts:
        message = f"copy-paste needs backgrounds and cutouts (got {len(backgrounds)} and {len(cutouts)})"
        raise InputError(message)
    # Before any frame is written: refused after the roadwork frames, the run had spent
    # their time and left a half-made set behind.
    if negatives and not distractors:
        message = f"{negatives} hard-negative frames asked for, but no distractors to paste (draw some: distractors)"
        raise InputError(message)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(count):
        rng = np.random.default_rng((seed, i))
        bg = backgrounds[int(rng.integers(len(backgrounds)))]
        image = cv2.imread(str(bg.path), cv2.IMREAD_COLOR)
        if image is None:
            message = f"{bg.path}: not a readable image"
            raise InputError(message)
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        if distractors and (extra := np.random.default_rng((seed, i, 1))).random() < 0.5:
            image, _ = paste_distractors(image, distractors, extra, (1, 3))
        pasted, boxes, placements = paste(image, cutouts, rng)
        if not boxes:
            continue
        stem = f"synth_{seed}_{i:05d}"
        quality = int(rng.integers(80, 96))
        cv2.imwrite(str(out / "images" / f"{stem}.jpg"), cv2.cvtColor(pasted, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        (out / "labels" / f"{stem}.txt").write_text("".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in boxes))
        objects = ",".join(cutouts[p.cutout].name for p in placements)
        note = f"background {bg.path.name} ({bg.origin}); objects {objects}"
        contains = tuple(sorted({cutouts[p.cutout].source for p in placements} - {bg.source}))
        items.append(Item(out / "images" / f"{stem}.jpg", 1, bg.source, "synthetic", "", tuple(boxes), note, contains))
    for j in range(negatives):
        rng = np.random.default_rng((seed, j, 2))
        bg = backgrounds[int(rng.integers(len(backgrounds)))]
        image = cv2.imread(str(bg.path), cv2.IMREAD_COLOR)
        if image is None:
            message = f"{bg.path}: not a readable image"
            raise InputError(message)
        pasted, placements = paste_distractors(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), distractors, rng)
        if not placements:
            continue
        stem = f"neg_{seed}_{j:05d}"
        cv2.imwrite(str(out / "images" / f"{stem}.jpg"), cv2.cvtColor(pasted, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(80, 96))])
        (out / "labels" / f"{stem}.txt").write_text("")
        note = f"background {bg.path.name} ({bg.origin}); distractors " + ",".join(distractors[p.cutout].name for p in placements)
        items.append(Item(out / "images" / f"{stem}.jpg", 0, bg.source, "synthetic", "", (), note))
    write_items(out / "items.tsv", items, relative_to=out)
    log(f"copy-paste: {len(items)} frames ({sum(i.label == 0 for i in items)} hard negatives) from "
        f"{len(backgrounds)} backgrounds, {len(cutouts)} objects, {len(distractors)} distractors, seed {seed}")
    return items

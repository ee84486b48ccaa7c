"""Drawn distractors: roadside things that share roadwork's colours but are not roadwork.

Held out by source, the detectors' false roadwork on clear roads came from a few kinds of
object (``stages/models/README.md``): a yellow school bus boxed in every frame, painted
kerbs, orange roadside posts, a red-and-white permanent barrier, signs. The clear frames
the detector trains on (as background images) hold few of them, so it learnt that
"orange or red-and-white, standing by the road" is roadwork. Distractors are those look-
alikes drawn from code and pasted into frames *without a box*: hard negatives, as Tobin
et al. (IROS 2017) paste random distractor shapes beside the objects they teach, and as
hard-negative mining (Felzenszwalb et al., PAMI 2010; Shrivastava et al., "OHEM", CVPR
2016) feeds a detector the negatives that look most like its class.

Kinds: vehicle backs and sides (school bus yellow, taxi, municipal orange, red, any
colour), regulatory and guide signs on posts (speed limit, mandatory blue, stop, give way,
parking, green/blue guide boards), permanent curve chevrons and hazard markers, permanent
delineator posts, bollards, wheelie bins, hydrants, traffic lights and painted kerbs.

Everything is drawn from ``numpy.random.default_rng((seed, 100 + kind, index))``: a set
is the same for the same seed, and distinct from ``procedural``'s objects of one seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np

from stages.train.copypaste import Cutout
from stages.train.procedural import (
    DRAW_HEIGHT,
    PROCEDURAL_SOURCE,
    RGB,
    _black,
    _Canvas,
    _canvas,
    _cylinder_shade,
    _grey,
    _hsv,
    _orange,
    _red,
    _shade_and_wear,
    _white,
)

#: ``Cutout.cls`` of a distractor: no class, pasted without a box.
DISTRACTOR_CLASS = -1


def _paint(hue: tuple[float, float], sat: tuple[float, float], val: tuple[float, float]) -> Callable[..., RGB]:
    """A colour picker over HSV ranges (hue in degrees, sat/val 0–1)."""
    return lambda rng: _hsv(rng, hue, sat, val)


_yellow = _paint((38, 52), (0.75, 1.0), (0.8, 1.0))
_blue = _paint((205, 225), (0.7, 1.0), (0.45, 0.8))
_green = _paint((135, 160), (0.6, 1.0), (0.35, 0.6))
_any_paint = _paint((0, 360), (0.0, 0.9), (0.2, 0.95))


def _text(c: _Canvas, text: str, org: tuple[float, float], scale: float, colour: RGB, thickness: float) -> None:
    mask = np.zeros(c.shape, np.uint8)  # putText draws on 8-bit images only
    org = (int(org[0]), int(org[1]))
    cv2.putText(mask, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, max(1, int(thickness)), cv2.LINE_AA)
    c.rgb[mask > 127] = colour


def _post(c: _Canvas, cx: float, top: float, rng) -> None:
    h, _ = c.shape
    c.poly([(cx - 2, top), (cx + 2, top), (cx + 2, h), (cx - 2, h)], _grey(rng, 0.35, 0.7))


def draw_vehicle(rng) -> np.ndarray:
    """A vehicle from behind or the side: body, window band, lamps, wheels.

    School-bus yellow and municipal orange come up often on purpose: both were boxed as
    roadwork on clear roads."""
    side = rng.random() < 0.5
    h = DRAW_HEIGHT
    w = int(h * (rng.uniform(1.8, 3.5) if side else rng.uniform(0.9, 1.3)))
    c = _Canvas(h, w)
    body = [_yellow, _orange, _red, _white, _any_paint][int(rng.choice(5, p=[0.3, 0.2, 0.15, 0.15, 0.2]))](rng)
    wheel_r = h * rng.uniform(0.1, 0.14)
    bottom = h - wheel_r * 0.8
    c.poly([(0, h * 0.04), (w - 1, h * 0.04), (w - 1, bottom), (0, bottom)], body)
    glass = _hsv(rng, (190, 230), (0.0, 0.3), (0.08, 0.35))
    top, band = h * rng.uniform(0.1, 0.18), h * rng.uniform(0.18, 0.3)
    if side:  # a row of windows
        n = int(rng.integers(3, 9))
        pitch = (w * 0.92) / n
        for k in range(n):
            x0 = w * 0.04 + k * pitch
            c.poly([(x0 + 2, top), (x0 + pitch - 2, top), (x0 + pitch - 2, top + band), (x0 + 2, top + band)], glass)
    else:  # a rear window and two tail lamps
        c.poly([(w * 0.1, top), (w * 0.9, top), (w * 0.9, top + band), (w * 0.1, top + band)], glass)
        lamp = _hsv(rng, (355, 365), (0.8, 1.0), (0.6, 1.0))
        for x in (w * 0.06, w * 0.82):
            c.poly([(x, h * 0.55), (x + w * 0.12, h * 0.55), (x + w * 0.12, h * 0.68), (x, h * 0.68)], lamp)
    if rng.random() < 0.4:  # a black trim line (school buses carry two)
        y = h * rng.uniform(0.5, 0.7)
        c.poly([(0, y), (w - 1, y), (w - 1, y + h * 0.025), (0, y + h * 0.025)], _black(rng))
    xs = (w * 0.15, w * 0.85) if side else (w * 0.22, w * 0.78)
    for x in xs:
        cv2.circle(c.rgb, (int(x), int(h - wheel_r)), int(wheel_r), _black(rng), -1)
        cv2.circle(c.alpha, (int(x), int(h - wheel_r)), int(wheel_r), 1.0, -1)
    _shade_and_wear(c, np.ones((1, w), np.float32) * rng.uniform(0.7, 1.0), rng)
    return c.rgba()


def draw_sign(rng) -> np.ndarray:
    """A permanent sign on a post: speed limit, mandatory blue disc, stop, give way,
    parking square or a green/blue guide board."""
    h = DRAW_HEIGHT
    kind = str(rng.choice(["limit", "blue", "stop", "yield", "square", "guide"]))
    w = int(h * (rng.uniform(0.9, 1.6) if kind == "guide" else 0.5))
    c = _Canvas(h, w)
    cx, s = w / 2, w * 0.46 if kind != "guide" else h * 0.22
    _post(c, cx, s, rng)
    centre = (int(cx), int(s))
    if kind == "limit":
        cv2.circle(c.rgb, centre, int(s), _red(rng), -1, cv2.LINE_AA)
        cv2.circle(c.rgb, centre, int(s * 0.78), _white(rng), -1, cv2.LINE_AA)
        _text(c, str(int(rng.choice([30, 50, 60, 70, 80]))), (cx - s * 0.6, s * 1.3), s / 30, _black(rng), s / 12)
        cv2.circle(c.alpha, centre, int(s), 1.0, -1)
    elif kind == "blue":
        cv2.circle(c.rgb, centre, int(s), _blue(rng), -1, cv2.LINE_AA)
        cv2.arrowedLine(c.rgb, (int(cx), int(s * 1.6)), (int(cx), int(s * 0.4)), _white(rng), max(2, int(s / 6)))
        cv2.circle(c.alpha, centre, int(s), 1.0, -1)
    elif kind == "stop":
        pts = [(cx + s * math.cos(math.pi / 8 + k * math.pi / 4), s + s * math.sin(math.pi / 8 + k * math.pi / 4))
               for k in range(8)]
        c.poly(pts, _red(rng))
        _text(c, "STOP", (cx - s * 0.8, s * 1.2), s / 45, _white(rng), s / 14)
    elif kind == "yield":  # give way: an inverted triangle
        c.poly([(cx - s, 0), (cx + s, 0), (cx, s * 1.75)], _red(rng))
        c.poly([(cx - s * 0.62, s * 0.2), (cx + s * 0.62, s * 0.2), (cx, s * 1.3)], _white(rng))
    elif kind == "square":
        c.poly([(cx - s, 0), (cx + s, 0), (cx + s, 2 * s), (cx - s, 2 * s)], _blue(rng))
        _text(c, "P", (cx - s * 0.5, s * 1.5), s / 25, _white(rng), s / 8)
    else:
        board_h = h * rng.uniform(0.3, 0.45)
        c.poly([(0, 0), (w - 1, 0), (w - 1, board_h), (0, board_h)], _green(rng) if rng.random() < 0.6 else _blue(rng))
        for k in range(int(rng.integers(1, 4))):
            y = board_h * (k + 0.7) / 3.2
            c.poly([(w * 0.1, y), (w * rng.uniform(0.4, 0.9), y), (w * 0.9, y + board_h * 0.08), (w * 0.1, y + board_h * 0.08)],
                   _white(rng))
    _shade_and_wear(c, np.ones((1, w), np.float32) * rng.uniform(0.8, 1.0), rng)
    return c.rgba()


def draw_chevron(rng) -> np.ndarray:
    """A permanent curve chevron board or hazard marker: black-and-white, red-and-white or
    black-and-yellow chevrons or stripes on a post."""
    c, h, w = _canvas(rng, (0.4, 0.9))
    board_h = h * rng.uniform(0.4, 0.6)
    ground, ink = [(_white, _black), (_white, _red), (_yellow, _black)][int(rng.integers(3))]
    _post(c, w / 2, board_h, rng)
    c.poly([(0, 0), (w - 1, 0), (w - 1, board_h), (0, board_h)], ground(rng))
    colour, right = ink(rng), rng.random() < 0.5
    if rng.random() < 0.6:
        for k in range(int(rng.integers(1, 4))):
            x = w * (0.2 + 0.25 * k)
            pts = [(x, board_h * 0.15), (x + w * 0.15, board_h * 0.5), (x, board_h * 0.85)]
            pts = [(w - px, py) for px, py in pts] if not right else pts
            cv2.polylines(c.rgb, [np.round(np.asarray(pts)).astype(np.int32)], False, colour, max(2, w // 10))
    else:  # diagonal hazard stripes
        yy, xx = c.grid()
        on = (((xx + yy) // max(w / 4, 1)) % 2 == 0) & (yy < board_h)
        c.rgb[on] = colour
    _shade_and_wear(c, np.ones((1, w), np.float32) * rng.uniform(0.8, 1.0), rng)
    return c.rgba()


def draw_delineator(rng) -> np.ndarray:
    """A permanent roadside post: white (sometimes yellow or orange) with a black band and
    a small reflector."""
    c, h, w = _canvas(rng, (0.12, 0.2))
    body = _white(rng) if rng.random() < 0.65 else (_yellow(rng) if rng.random() < 0.5 else _orange(rng))
    c.poly([(0, h * 0.02), (w - 1, 0), (w - 1, h), (0, h)], body)
    band = h * rng.uniform(0.08, 0.2)
    c.poly([(0, band), (w - 1, band), (w - 1, band + h * 0.12), (0, band + h * 0.12)], _black(rng))
    reflector = [_orange, _red, _white, _yellow][int(rng.integers(4))](rng)
    c.poly([(w * 0.25, band + h * 0.02), (w * 0.75, band + h * 0.02), (w * 0.75, band + h * 0.09), (w * 0.25, band + h * 0.09)],
           reflector)
    _shade_and_wear(c, _cylinder_shade(w, rng)[None, :], rng)
    return c.rgba()


def draw_bollard(rng) -> np.ndarray:
    """A street bollard: grey, black, yellow or red, one reflective band."""
    c, h, w = _canvas(rng, (0.2, 0.35))
    body = [_grey, _black, _yellow, _red][int(rng.integers(4))](rng)
    c.poly([(0, h * 0.06), (w - 1, h * 0.06), (w - 1, h), (0, h)], body)
    cv2.ellipse(c.rgb, (w // 2, int(h * 0.06)), (w // 2, max(1, int(h * 0.05))), 0, 180, 360, body, -1)
    cv2.ellipse(c.alpha, (w // 2, int(h * 0.06)), (w // 2, max(1, int(h * 0.05))), 0, 180, 360, 1.0, -1)
    y = h * rng.uniform(0.12, 0.3)
    c.poly([(0, y), (w - 1, y), (w - 1, y + h * 0.07), (0, y + h * 0.07)], _white(rng))
    _shade_and_wear(c, _cylinder_shade(w, rng)[None, :], rng)
    return c.rgba()


def draw_bin(rng) -> np.ndarray:
    """A wheelie bin: body, lid, handle and wheels, in council colours (orange among them)."""
    c, h, w = _canvas(rng, (0.55, 0.75))
    body = [_green, _blue, _grey, _black, _orange, _yellow][int(rng.integers(6))](rng)
    lid = body if rng.random() < 0.5 else [_green, _blue, _yellow, _red, _black][int(rng.integers(5))](rng)
    c.poly([(w * 0.04, h * 0.12), (w * 0.96, h * 0.12), (w * 0.9, h * 0.94), (w * 0.1, h * 0.94)], body)
    c.poly([(0, h * 0.04), (w - 1, h * 0.04), (w - 1, h * 0.13), (0, h * 0.13)], lid)
    for x in (w * 0.2, w * 0.8):
        cv2.circle(c.rgb, (int(x), int(h * 0.93)), int(h * 0.06), _black(rng), -1)
        cv2.circle(c.alpha, (int(x), int(h * 0.93)), int(h * 0.06), 1.0, -1)
    _shade_and_wear(c, np.ones((1, w), np.float32) * rng.uniform(0.7, 1.0), rng)
    return c.rgba()


def draw_hydrant(rng) -> np.ndarray:
    """A fire hydrant: red, yellow or orange body, cap and side nozzles."""
    c, h, w = _canvas(rng, (0.6, 0.8))
    paint = [_red, _yellow, _orange, _grey][int(rng.choice(4, p=[0.45, 0.3, 0.15, 0.1]))](rng)
    c.poly([(w * 0.3, h * 0.15), (w * 0.7, h * 0.15), (w * 0.7, h * 0.92), (w * 0.3, h * 0.92)], paint)
    c.poly([(w * 0.05, h * 0.4), (w * 0.95, h * 0.4), (w * 0.95, h * 0.5), (w * 0.05, h * 0.5)], paint)
    cv2.ellipse(c.rgb, (w // 2, int(h * 0.15)), (int(w * 0.22), int(h * 0.1)), 0, 180, 360, paint, -1)
    cv2.ellipse(c.alpha, (w // 2, int(h * 0.15)), (int(w * 0.22), int(h * 0.1)), 0, 180, 360, 1.0, -1)
    c.poly([(w * 0.2, h * 0.92), (w * 0.8, h * 0.92), (w * 0.8, h), (w * 0.2, h)], paint)
    _shade_and_wear(c, _cylinder_shade(w, rng)[None, :], rng)
    return c.rgba()


def draw_traffic_light(rng) -> np.ndarray:
    """A traffic light on its pole: dark housing, three lamps, one lit."""
    c, h, w = _canvas(rng, (0.16, 0.24))
    box_h = h * rng.uniform(0.3, 0.4)
    _post(c, w / 2, box_h, rng)
    c.poly([(0, 0), (w - 1, 0), (w - 1, box_h), (0, box_h)], _black(rng) if rng.random() < 0.7 else _yellow(rng))
    lit = int(rng.integers(3))
    on = [_hsv(rng, (355, 365), (0.8, 1), (0.9, 1)), _hsv(rng, (35, 45), (0.8, 1), (0.9, 1)),
          _hsv(rng, (130, 160), (0.6, 1), (0.8, 1))]
    for k in range(3):
        centre = (w // 2, int(box_h * (k + 0.5) / 3))
        cv2.circle(c.rgb, centre, max(1, int(w * 0.32)), on[k] if k == lit else (40.0, 40.0, 40.0), -1, cv2.LINE_AA)
    _shade_and_wear(c, np.ones((1, w), np.float32), rng)
    return c.rgba()


def draw_kerb(rng) -> np.ndarray:
    """A painted kerb stretch: alternating red/white, black/white or yellow/black blocks."""
    c, h, w = _canvas(rng, (5, 12), DRAW_HEIGHT // 4)
    a, b = [(_red, _white), (_black, _white), (_yellow, _black)][int(rng.integers(3))]
    ca, cb = a(rng), b(rng)
    yy, xx = c.grid()
    block = w / int(rng.integers(4, 12))
    colour = np.where((((xx + yy * 0.5) // block) % 2 == 0)[..., None], np.asarray(ca, np.float32), np.asarray(cb, np.float32))
    c.fill(np.ones((h, w), bool), colour)
    _shade_and_wear(c, np.ones((1, w), np.float32) * rng.uniform(0.7, 1.0), rng)
    return c.rgba()


#: Each kind's drawer and its real height range in metres (what ``paste`` scales it to).
DISTRACTORS: dict[str, tuple[Callable[[np.random.Generator], np.ndarray], tuple[float, float]]] = {
    "vehicle": (draw_vehicle, (1.4, 3.2)),
    "sign": (draw_sign, (2.0, 3.0)),
    "chevron": (draw_chevron, (1.2, 2.0)),
    "delineator": (draw_delineator, (0.9, 1.2)),
    "bollard": (draw_bollard, (0.8, 1.1)),
    "bin": (draw_bin, (1.0, 1.1)),
    "hydrant": (draw_hydrant, (0.6, 0.9)),
    "traffic_light": (draw_traffic_light, (3.0, 4.5)),
    "kerb": (draw_kerb, (0.15, 0.3)),
}


def draw_distractors(per_kind: int, seed: int = 0) -> list[Cutout]:
    """``per_kind`` distractors of each kind of ``DISTRACTORS``.

    Returns:
        Cutouts with ``cls`` ``DISTRACTOR_CLASS`` (no box is ever written for them), source
        ``PROCEDURAL_SOURCE`` and names ``distractor:<kind>#<i>``; RGBA ``(h, w, 4)`` uint8.
    """
    out = []
    for k, (kind, (draw, _)) in enumerate(DISTRACTORS.items()):
        for i in range(per_kind):
            rgba = draw(np.random.default_rng((seed, 100 + k, i)))
            out.append(Cutout(rgba, DISTRACTOR_CLASS, PROCEDURAL_SOURCE, f"distractor:{kind}#{i}"))
    return out


def height_m(cutout: Cutout) -> tuple[float, float]:
    """The real height range in metres of a distractor cutout (by its name's kind)."""
    kind = cutout.name.split(":", 1)[1].split("#", 1)[0]
    return DISTRACTORS[kind][1]

"""Roadwork objects drawn from code: drums, panels, markers, barriers, signs, arrow boards.

Only cones and barricades have real boxes here (``labelled/``), and the one camera with
many real work zones (the Mi3 footage) shows mostly drums, barriers and signs. Cutting
those from Mi3 and scoring Mi3 "held out" would leak its camera into its own figure. Drawn
objects come from no camera at all, so every fold may train on them: the approach of
domain randomisation (Tobin et al., "Domain Randomization for Transferring Deep Neural
Networks from Simulation to the Real World", IROS 2017): render simple shapes with
randomised colour, shading, wear and proportions, wide enough that the real object looks
like one more variation.

Each object is drawn to the proportions of its traffic-control device (MUTCD 2009,
Part 6F: drums ≥ 0.9 m tall with four or more alternating orange and white retroreflective
bands; vertical panels 0.2–0.3 m wide with 45° stripes; tubular markers ≥ 0.7 m, two white
bands; Type III barricades with three striped rails; warning signs orange diamonds) and the
common European variants (red-and-white water-filled barriers, white triangular signs
with a red border). The result is a ``copypaste.Cutout`` (RGBA with a hard mask) that
``copypaste.paste`` places, scales, shades and blurs like a cut photo.

Everything is drawn from ``numpy.random.default_rng((seed, class, index))``: a set is the
same for the same seed, and object ``i`` of a class does not depend on the count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from stages.train.copypaste import Cutout
from stages.train.sources import ROADWORK_CLASSES

#: The ``source`` of every drawn object: no scene source, so no fold ever holds it out.
PROCEDURAL_SOURCE = "procedural"
#: Height in pixels objects are drawn at (``paste`` scales them to their place).
DRAW_HEIGHT = 128

RGB = tuple[float, float, float]


# --------------------------------------------------------------------------- colours


def _hsv(rng: np.random.Generator, hue: tuple[float, float], sat: tuple[float, float], val: tuple[float, float]) -> RGB:
    """One colour from HSV ranges (hue in degrees, sat/val in 0–1), as RGB 0–255."""
    h, s, v = rng.uniform(*hue) / 60.0, rng.uniform(*sat), rng.uniform(*val)
    i, f = int(h) % 6, h - int(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return (r * 255, g * 255, b * 255)


def _orange(rng) -> RGB:
    # Fluorescent to sun-faded orange (MUTCD orange, worn devices drift to red or yellow).
    return _hsv(rng, (8, 32), (0.7, 1.0), (0.75, 1.0))


def _white(rng) -> RGB:
    return _hsv(rng, (0, 60), (0.0, 0.12), (0.78, 0.98))


def _red(rng) -> RGB:
    return _hsv(rng, (350, 372), (0.75, 1.0), (0.6, 0.95))


def _black(rng) -> RGB:
    return _hsv(rng, (0, 360), (0.0, 0.2), (0.05, 0.2))


def _grey(rng, low: float = 0.45, high: float = 0.8) -> RGB:
    return _hsv(rng, (20, 60), (0.0, 0.12), (low, high))


class _Canvas:
    """RGB and alpha of one drawing, float32, ``(h, w)``."""

    def __init__(self, height: int, width: int) -> None:
        self.rgb = np.zeros((height, width, 3), np.float32)
        self.alpha = np.zeros((height, width), np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return self.alpha.shape

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """``(yy, xx)``: each pixel's row and column, float32 ``(h, w)``."""
        h, w = self.shape
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        return yy, xx

    def fill(self, mask: np.ndarray, colour: RGB | np.ndarray) -> None:
        """Paint ``colour`` (RGB, or ``(h, w, 3)``) where ``mask`` is true; marks it opaque."""
        colour = np.asarray(colour, np.float32)
        self.rgb[mask] = colour[mask] if colour.ndim == 3 else colour
        self.alpha[mask] = 1.0

    def poly(self, points: Sequence[tuple[float, float]], colour: RGB) -> None:
        import cv2

        mask = np.zeros(self.shape, np.uint8)
        cv2.fillPoly(mask, [np.round(np.asarray(points)).astype(np.int32)], 1)
        self.fill(mask.astype(bool), colour)

    def rgba(self) -> np.ndarray:
        """``(h, w, 4)`` uint8, trimmed to the opaque pixels."""
        ys, xs = np.nonzero(self.alpha > 0.5)
        out = np.dstack([self.rgb.clip(0, 255), (self.alpha > 0.5) * 255.0]).round().astype(np.uint8)
        return out[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def _canvas(
    rng: np.random.Generator, aspect: tuple[float, float], height: int = DRAW_HEIGHT
) -> tuple[_Canvas, int, int]:
    """A blank drawing ``height`` tall and ``height × U(aspect)`` wide: ``(canvas, h, w)``."""
    width = int(height * rng.uniform(*aspect))
    return _Canvas(height, width), height, width


def _cylinder_shade(width: int, rng) -> np.ndarray:
    """``(width,)`` Lambert shading across a cylinder seen side-on, light from a random side."""
    u = np.linspace(-0.98, 0.98, width)
    theta = np.arcsin(u)
    light = rng.uniform(-1.0, 1.0)
    ambient = rng.uniform(0.35, 0.6)
    return (ambient + (1 - ambient) * np.clip(np.cos(theta - light), 0, 1)).astype(np.float32)


def _bands(canvas: _Canvas, inside: np.ndarray, edges: Sequence[float], colours: Sequence[RGB], curve: float) -> None:
    """Horizontal bands between ``edges`` (fractions of the height) on a round body:
    each edge bows down by ``curve`` of the height at the middle (seen from above)."""
    h, w = canvas.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u = (xx - w / 2) / max(w / 2, 1)
    bow = curve * h * np.sqrt(np.clip(1 - u**2, 0, 1))
    for top, bottom, colour in zip(edges[:-1], edges[1:], colours):
        band = inside & (yy >= top * h + bow) & (yy < bottom * h + bow)
        canvas.fill(band, colour)


def _diagonal_stripes(h: int, w: int, period: float, a: RGB, b: RGB, slope: float = 1.0) -> np.ndarray:
    """``(h, w, 3)`` stripes at 45° (``slope`` ±1) alternating ``a`` and ``b``."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    on = ((xx * slope + yy) // max(period, 1)) % 2 == 0
    return np.where(on[..., None], np.asarray(a, np.float32), np.asarray(b, np.float32))


# --------------------------------------------------------------------------- objects


def draw_drum(rng) -> np.ndarray:
    """Channelizer drum: orange and white bands (4–5), black rubber base, rounded top."""
    c, h, w = _canvas(rng, (0.5, 0.68))
    yy, xx = c.grid()
    taper = rng.uniform(0.82, 0.95)  # narrower at the top
    half = (w / 2) * (taper + (1 - taper) * yy / h)
    top = h * rng.uniform(0.02, 0.06)
    body = (np.abs(xx - w / 2) <= half) & (yy >= top)
    # Rounded top: an ellipse cap.
    cap = ((xx - w / 2) / (w * taper / 2)) ** 2 + ((yy - top - 2) / max(top + 2, 1)) ** 2 <= 1
    inside = body | cap
    base = h * rng.uniform(0.84, 0.9)
    n = int(rng.integers(4, 6))
    edges = np.linspace(0, base / h, n + 1)
    orange, white = _orange(rng), _white(rng)
    _bands(c, inside, edges, [orange if k % 2 == 0 else white for k in range(n)], rng.uniform(0.0, 0.05))
    # The base ring is wider than the body.
    ring = (np.abs(xx - w / 2) <= w / 2) & (yy >= base)
    c.fill(ring | (inside & (yy >= base)), _black(rng))
    _shade_and_wear(c, _cylinder_shade(w, rng)[None, :], rng)
    return c.rgba()


def draw_tubular_marker(rng) -> np.ndarray:
    """Tubular marker (delineator post): thin orange tube, two white bands near the top, small base."""
    c, h, w = _canvas(rng, (0.2, 0.3))
    yy, xx = c.grid()
    tube_half = w * rng.uniform(0.22, 0.32)
    tube = (np.abs(xx - w / 2) <= tube_half) & (yy < h * 0.93)
    c.fill(tube, _orange(rng))
    white = _white(rng)
    for start in (rng.uniform(0.08, 0.14), rng.uniform(0.28, 0.36)):
        c.fill(tube & (yy >= start * h) & (yy < (start + rng.uniform(0.07, 0.1)) * h), white)
    c.fill((yy >= h * 0.93), _black(rng) if rng.random() < 0.7 else _orange(rng))
    _shade_and_wear(c, _cylinder_shade(w, rng)[None, :], rng)
    return c.rgba()


def draw_vertical_panel(rng) -> np.ndarray:
    """Vertical panel: a narrow board with 45° orange and white stripes on a post and base."""
    c, h, w = _canvas(rng, (0.28, 0.42))
    yy, xx = c.grid()
    panel_w = w * rng.uniform(0.55, 0.75)
    panel_bottom = h * rng.uniform(0.5, 0.65)
    panel = (np.abs(xx - w / 2) <= panel_w / 2) & (yy < panel_bottom)
    stripes = _diagonal_stripes(h, w, h * rng.uniform(0.07, 0.11), _orange(rng), _white(rng), rng.choice([-1.0, 1.0]))
    c.fill(panel, stripes)
    post = (np.abs(xx - w / 2) <= w * 0.05) & (yy >= panel_bottom) & (yy < h * 0.92)
    c.fill(post, _grey(rng) if rng.random() < 0.5 else _orange(rng))
    c.fill((yy >= h * 0.92) & (np.abs(xx - w / 2) <= w * rng.uniform(0.35, 0.5)), _black(rng))
    _shade_and_wear(c, np.ones((1, w), np.float32) * rng.uniform(0.75, 1.0), rng)
    return c.rgba()


def draw_barricade(rng) -> np.ndarray:
    """Type II/III barricade: two or three rails with orange and white 45° stripes on legs."""
    c, h, w = _canvas(rng, (1.1, 2.2))
    yy, _ = c.grid()
    rails = int(rng.integers(2, 4))
    rail_h = h * rng.uniform(0.12, 0.17)
    gap = (h * 0.62 - rails * rail_h) / max(rails - 1, 1)
    leg_colour = _white(rng) if rng.random() < 0.5 else _grey(rng)
    for x in (w * 0.12, w * 0.88):
        c.poly([(x - w * 0.03, 0), (x + w * 0.03, 0), (x + w * 0.05, h), (x - w * 0.05, h)], leg_colour)
    stripes = _diagonal_stripes(h, w, h * rng.uniform(0.1, 0.15), _orange(rng), _white(rng), rng.choice([-1.0, 1.0]))
    top = h * rng.uniform(0.02, 0.06)
    for k in range(rails):
        y0 = top + k * (rail_h + gap)
        c.fill((yy >= y0) & (yy < y0 + rail_h), stripes)
    _shade_and_wear(c, np.ones((1, w), np.float32) * rng.uniform(0.75, 1.0), rng)
    return c.rgba()


def draw_barrier(rng) -> np.ndarray:
    """A water-filled plastic barrier: red or orange segments alternating with white.

    Concrete Jersey barriers are not drawn: a plain grey block also stands along every
    highway as a permanent barrier, and must not read as roadwork."""
    c, h, w = _canvas(rng, (2.0, 4.5))
    yy, xx = c.grid()
    seg = w / int(rng.integers(2, 5))
    a = _red(rng) if rng.random() < 0.5 else _orange(rng)
    b = _white(rng)
    segment = (xx // seg).astype(int)
    inside = (yy >= h * 0.05) & ((yy < h * 0.95) | ((xx % seg) > seg * 0.15) & ((xx % seg) < seg * 0.85))
    colour = np.where((segment % 2 == 0)[..., None], np.asarray(a, np.float32), np.asarray(b, np.float32))
    c.fill(inside, colour)
    # Rounded shoulders: shade towards the top and bottom edges of each segment.
    v = np.abs(yy / h - 0.5) * 2
    _shade_and_wear(c, (1 - 0.35 * v**3).astype(np.float32), rng)
    return c.rgba()


def draw_roadwork_sign(rng) -> np.ndarray:
    """A roadwork warning sign on its stand: US orange diamond with a black border and
    symbol or text, or a European white triangle with a red border and a worker symbol."""
    import cv2

    h = DRAW_HEIGHT
    kind = rng.choice(["diamond", "triangle", "rectangle"], p=[0.5, 0.3, 0.2])
    w = int(h * (0.62 if kind == "diamond" else 0.75))
    c = _Canvas(h, w)
    sign_h = h * rng.uniform(0.5, 0.62)
    cx = w / 2
    pole = _grey(rng)
    if rng.random() < 0.6:  # a post
        c.poly([(cx - 2, sign_h * 0.5), (cx + 2, sign_h * 0.5), (cx + 2, h), (cx - 2, h)], pole)
    else:  # a folding stand's legs
        c.poly([(cx - 2, sign_h * 0.6), (cx + 2, sign_h * 0.6), (w * 0.1 + 3, h), (w * 0.1, h)], pole)
        c.poly([(cx - 2, sign_h * 0.6), (cx + 2, sign_h * 0.6), (w * 0.9, h), (w * 0.9 - 3, h)], pole)
    ink = _black(rng)
    if kind == "diamond":
        half = min(w / 2 - 1, sign_h / 2)
        outer = [(cx, 0), (cx + half, half), (cx, 2 * half), (cx - half, half)]
        inner = [(cx, 4), (cx + half - 4, half), (cx, 2 * half - 4), (cx - half + 4, half)]
        c.poly(outer, ink)
        c.poly(inner, _orange(rng))
        _symbol(c, cx, half, half * 0.9, ink, rng)
    elif kind == "triangle":
        side = min(w - 2, sign_h * 1.1)
        top, bottom = 0.0, side * math.sqrt(3) / 2
        c.poly([(cx, top), (cx + side / 2, bottom), (cx - side / 2, bottom)], _red(rng))
        k = side * 0.16
        c.poly([(cx, top + k * 1.2), (cx + side / 2 - k, bottom - k * 0.6), (cx - side / 2 + k, bottom - k * 0.6)],
               _white(rng) if rng.random() < 0.7 else _hsv(rng, (45, 55), (0.8, 1), (0.85, 1)))
        _symbol(c, cx, bottom * 0.62, side * 0.32, ink, rng)
    else:
        rect_h = sign_h * rng.uniform(0.6, 0.85)
        c.poly([(1, 0), (w - 1, 0), (w - 1, rect_h), (1, rect_h)], ink)
        c.poly([(3, 2), (w - 3, 2), (w - 3, rect_h - 2), (3, rect_h - 2)], _orange(rng))
        words = ["ROAD", "WORK", "AHEAD"] if rng.random() < 0.6 else ["LANE", "CLOSED"]
        scale = rect_h / (len(words) * 30)
        text = np.zeros(c.shape, np.uint8)  # putText draws on 8-bit images only
        for k, word in enumerate(words):
            size, _ = cv2.getTextSize(word, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
            org = (int(cx - size[0] / 2), int(rect_h * (k + 0.8) / len(words)))
            cv2.putText(text, word, org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, max(1, int(scale * 2)), cv2.LINE_AA)
        c.fill(text > 127, ink)
    _shade_and_wear(c, np.ones((1, w), np.float32) * rng.uniform(0.8, 1.0), rng)
    return c.rgba()


def _symbol(c: _Canvas, cx: float, cy: float, size: float, ink: RGB, rng) -> None:
    """A stick figure digging (the 'men at work' pictogram, roughly) centred at (cx, cy)."""
    import cv2

    s = size / 2
    t = max(2, int(size / 9))
    lean = rng.uniform(-0.2, 0.2)
    head = (int(cx + s * (0.15 + lean)), int(cy - s * 0.65))
    hip = (int(cx - s * 0.05), int(cy + s * 0.1))
    neck = (int(cx + s * (0.1 + lean)), int(cy - s * 0.45))
    draw = lambda a, b: cv2.line(c.rgb, a, b, ink, t, cv2.LINE_AA)  # noqa: E731
    cv2.circle(c.rgb, head, max(2, int(s * 0.14)), ink, -1, cv2.LINE_AA)
    draw(neck, hip)
    draw(hip, (int(cx - s * 0.35), int(cy + s * 0.6)))
    draw(hip, (int(cx + s * 0.25), int(cy + s * 0.6)))
    draw((int(cx + s * 0.05), int(cy - s * 0.3)), (int(cx + s * 0.5), int(cy + s * 0.05)))
    draw((int(cx + s * 0.5), int(cy - s * 0.25)), (int(cx + s * 0.5), int(cy + s * 0.6)))  # the shovel
    if rng.random() < 0.6:  # the heap of earth
        cv2.ellipse(c.rgb, (int(cx - s * 0.5), int(cy + s * 0.6)), (int(s * 0.3), int(s * 0.18)), 0, 180, 360, ink, -1)


def draw_arrow_board(rng) -> np.ndarray:
    """Arrow board: a black panel of amber lamps showing an arrow (or a bar), on a trailer mast."""
    import cv2

    c, h, w = _canvas(rng, (0.8, 1.1))
    panel_h = h * rng.uniform(0.38, 0.48)
    c.poly([(0, 0), (w - 1, 0), (w - 1, panel_h), (0, panel_h)], _black(rng))
    amber = _hsv(rng, (30, 48), (0.7, 1.0), (0.9, 1.0))
    cols, rows = 11, 5
    right = rng.random() < 0.5
    pattern = np.zeros((rows, cols), bool)
    pattern[2, 1:10] = True  # shaft
    for k in range(3):  # head
        pattern[2 - k, (9 - k) if right else (1 + k)] = pattern[2 + k, (9 - k) if right else (1 + k)] = True
    if rng.random() < 0.2:  # caution bar: lamps at the four corners only
        pattern[:] = False
        pattern[[0, 0, 4, 4], [0, 10, 0, 10]] = True
    lit = rng.random() < 0.8  # a photo can catch the lamps off
    for r in range(rows):
        for k in range(cols):
            centre = (int((k + 0.5) * w / cols), int((r + 0.5) * panel_h / rows))
            radius = max(1, int(min(w / cols, panel_h / rows) * 0.35))
            colour = amber if pattern[r, k] and lit else (50.0, 45.0, 30.0)
            cv2.circle(c.rgb, centre, radius, colour, -1, cv2.LINE_AA)
    mast = _grey(rng, 0.3, 0.6)
    c.poly([(w / 2 - 3, panel_h), (w / 2 + 3, panel_h), (w / 2 + 3, h * 0.8), (w / 2 - 3, h * 0.8)], mast)
    trailer = _orange(rng) if rng.random() < 0.5 else _white(rng)
    c.poly([(w * 0.2, h * 0.72), (w * 0.8, h * 0.72), (w * 0.8, h * 0.88), (w * 0.2, h * 0.88)], trailer)
    for x in (w * 0.3, w * 0.7):
        cv2.circle(c.rgb, (int(x), int(h * 0.92)), int(h * 0.07), _black(rng), -1)
        cv2.circle(c.alpha, (int(x), int(h * 0.92)), int(h * 0.07), 1.0, -1)
    _shade_and_wear(c, np.ones((1, w), np.float32), rng)
    return c.rgba()


def draw_cone(rng) -> np.ndarray:
    """Traffic cone: orange, one or two white collars, a square black or orange base."""
    c, h, w = _canvas(rng, (0.55, 0.75))
    yy, xx = c.grid()
    base = h * rng.uniform(0.88, 0.93)
    tip = w * rng.uniform(0.05, 0.1)
    half = tip / 2 + (w * 0.42 - tip / 2) * yy / base
    body = (np.abs(xx - w / 2) <= half) & (yy < base)
    c.fill(body, _orange(rng))
    white = _white(rng)
    for start, size in [(0.28, 0.14), (0.55, 0.1)][: int(rng.integers(1, 3))]:
        c.fill(body & (yy >= start * h) & (yy < (start + size) * h), white)
    c.fill(yy >= base, _black(rng) if rng.random() < 0.6 else _orange(rng))
    _shade_and_wear(c, _cylinder_shade(w, rng)[None, :], rng)
    return c.rgba()


def _shade_and_wear(c: _Canvas, shade: np.ndarray, rng) -> None:
    """Shading, low-frequency dirt and fine grain; retroreflective white stays brightest."""
    import cv2

    h, w = c.shape
    c.rgb *= shade[..., None] if shade.ndim == 2 else shade
    dirt = cv2.resize(rng.normal(0, 1, (max(2, h // 16), max(2, w // 16))).astype(np.float32), (w, h))
    c.rgb *= (1 - rng.uniform(0.03, 0.12) * np.clip(dirt, 0, None))[..., None]
    c.rgb += rng.normal(0, rng.uniform(2, 5), c.rgb.shape).astype(np.float32)
    c.rgb *= rng.uniform(0.85, 1.1)


#: What each class is drawn with; classes missing here are not drawn (work vehicles and
#: workers are too varied to draw this way).
DRAWERS: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "cone": draw_cone,
    "drum": draw_drum,
    "barricade": draw_barricade,
    "barrier": draw_barrier,
    "vertical_panel": draw_vertical_panel,
    "tubular_marker": draw_tubular_marker,
    "arrow_board": draw_arrow_board,
    "roadwork_sign": draw_roadwork_sign,
}


def draw_objects(per_class: int, seed: int = 0, classes: Sequence[str] | None = None) -> list[Cutout]:
    """``per_class`` drawn objects of each class of ``DRAWERS`` (or of ``classes``).

    Returns:
        Cutouts with ``source`` ``PROCEDURAL_SOURCE`` and names ``drawn:<class>#<i>``; each
        RGBA ``(h, w, 4)`` uint8 with a hard alpha, at most ``DRAW_HEIGHT`` tall.

    Raises:
        KeyError: a class in ``classes`` has no drawer.
    """
    chosen = list(DRAWERS) if classes is None else list(classes)
    out = []
    for name in chosen:
        draw = DRAWERS[name]
        cls = ROADWORK_CLASSES.index(name)
        for i in range(per_class):
            rgba = draw(np.random.default_rng((seed, cls, i)))
            out.append(Cutout(rgba, cls, PROCEDURAL_SOURCE, f"drawn:{name}#{i}"))
    return out

"""report.html in a real headless browser: Debian's Chromium, driven by Playwright (never a
downloaded browser). Skipped where Chromium or Playwright is absent; ``.ci/run`` installs both.

The page must load without console errors, draw a map of each drive with GPS (its track and
roadwork span as paths, with or without map tiles), show every key frame, and fit a phone's
width (no sideways scrolling).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from stages.report import write_report
from stream.schemas import CameraFrame, Detection, DriveSummary, Gps, RoadworkSpan, Verdict

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")

TILES = "https://tile.openstreetmap.org/**"
#: A 1x1 PNG served for map tiles, standing in for the network.
PNG = cv2.imencode(".png", np.full((1, 1, 3), 200, np.uint8))[1].tobytes()
BOX = Detection(type="cone", label="cone", score=0.81, box=(0.3, 0.4, 0.5, 0.8))


def verdict(drive: str, name: str, window: int, roadwork: bool, gps: bool) -> Verdict:
    frames = [CameraFrame(camera=c, blob_key=f"{drive}:{c}:{window}", t=window * 2.0 + 0.6,
                          detections=[BOX] if c == "front" else [], roadwork_prob=0.93) for c in ("front", "left_pillar")]  # fmt: skip
    return Verdict(drive_id=drive, drive_name=name, window=window, t_start=window * 2.0, t_end=window * 2.0 + 2,
                   start_utc=1_714_575_600.0 + window * 2 + (0 if drive == "a" else 86_400), roadwork=roadwork,
                   confidence=0.9 if roadwork else 0.15, frames=frames,
                   gps=Gps(lat=30.2227 + window * 0.0002, lon=-97.6187 + window * 0.0002) if gps else None)  # fmt: skip


def report(tmp_path: Path) -> tuple[Path, int]:
    """Two drives: one with GPS and a roadwork span of two windows, one without GPS."""
    verdicts = [verdict("a", "2024-05-01_10-00-00", w, w in (2, 3), gps=True) for w in range(6)]
    verdicts += [verdict("b", "2024-05-02_08-30-00", w, w == 0, gps=False) for w in range(2)]
    span = RoadworkSpan(t_start=4.0, t_end=8.0, confidence=0.9, track=[(30.2231, -97.6183), (30.2233, -97.6181)])
    summaries = [
        DriveSummary(drive_id="a", drive_name="2024-05-01_10-00-00", windows=6, roadwork_windows=2, spans=[span],
                     cameras=["front", "left_pillar"], start_utc=1_714_575_600.0, end_utc=1_714_575_612.0,
                     problems=["back: 2024-05-01_10-00-00-back.mp4: empty file"]),
        DriveSummary(drive_id="b", drive_name="2024-05-02_08-30-00", windows=2, roadwork_windows=1,
                     cameras=["front", "left_pillar"], start_utc=1_714_662_000.0, end_utc=1_714_662_004.0),
    ]  # fmt: skip
    image = cv2.imencode(".jpg", np.full((240, 320, 3), 90, np.uint8))[1].tobytes()
    images = {f.blob_key: image for v in verdicts for f in v.frames}
    paths = write_report(tmp_path, verdicts, summaries, images, local_starts={"a": "2024-05-01_10-00-00"})
    key_frames = sum(len(v.frames) for v in verdicts if v.roadwork)
    return paths["html"], key_frames


def open_page(html: Path, tiles: str, shot: Path | None = None) -> tuple[dict, list[str]]:
    """Load the page; ``tiles``: ``serve`` (a stand-in PNG) or ``abort`` (offline)."""
    errors: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        if tiles == "serve":
            page.route(TILES, lambda route: route.fulfill(status=200, content_type="image/png", body=PNG))
        else:
            page.route(TILES, lambda route: route.abort())
        page.on("console", lambda m: errors.append(f"{m.text} @ {m.location.get('url')}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        page.goto(html.as_uri())
        page.wait_for_load_state("load")
        found = page.evaluate("""() => ({
            maps: document.querySelectorAll('.map').length,
            paths: Array.from(document.querySelectorAll('.map')).map(m => m.querySelectorAll('.leaflet-overlay-pane path').length),
            nomap: document.querySelectorAll('.nomap').length,
            frames: document.querySelectorAll('figure.keyframe img').length,
            decoded: Array.from(document.querySelectorAll('figure.keyframe img')).filter(i => i.complete && i.naturalWidth > 0).length,
            captions: Array.from(document.querySelectorAll('figure.keyframe figcaption')).map(c => c.textContent),
            ticks: Array.from(document.querySelectorAll('svg.timeline text')).map(t => t.textContent),
            titles: Array.from(document.querySelectorAll('h2')).map(h => h.textContent),
            folded: Array.from(document.querySelectorAll('details.problems')).map(d => d.open),
        })""")  # fmt: skip
        if shot is not None:
            page.screenshot(path=str(shot), full_page=True)
        browser.close()
    return found, errors


#: An iPhone-sized screen; ``is_mobile`` makes Chromium honour (or, without it, ignore) the
#: page's viewport line as a phone does: without one, it lays the page out 980 px wide.
PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True, "device_scale_factor": 3}


def open_on_phone(html: Path) -> dict:
    """Load the page offline at a phone's size; its layout width and the timelines' boxes."""
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_context(**PHONE).new_page()
        page.route(TILES, lambda route: route.abort())
        page.goto(html.as_uri())
        page.wait_for_load_state("load")
        found = page.evaluate("""() => ({
            inner: window.innerWidth,
            scroll: document.documentElement.scrollWidth,
            timelines: Array.from(document.querySelectorAll('svg.timeline')).map(s => {
                const r = s.getBoundingClientRect(); return {left: r.left, right: r.right, height: r.height};
            }),
        })""")  # fmt: skip
        browser.close()
    return found


def test_the_report_loads_without_errors_with_its_map_and_every_key_frame(tmp_path):
    # Given a report of a drive with GPS and one without
    html, key_frames = report(tmp_path)
    # When Chromium opens it with map tiles served
    found, errors = open_page(html, "serve", tmp_path / "report.png")
    # Then no console error, one map with the track and the span drawn, a note for the other
    assert errors == []
    assert (found["maps"], found["nomap"]) == (1, 1) and found["paths"][0] >= 2
    # And every key frame is there and decoded, each saying why it was picked
    assert found["frames"] == found["decoded"] == key_frames
    assert any("1 box (cone 0.81); scorer 0.93" in c for c in found["captions"])
    assert any("no box; scorer 0.93" in c for c in found["captions"])
    # And drives come by time under their names, problems folded, a clock on the time axis
    assert found["titles"][0].startswith("2024-05-01_10-00-00 · 2 cameras · 12 s")
    assert found["titles"][1].startswith("2024-05-02_08-30-00")
    assert found["folded"] == [False]
    assert "10:00:10" in found["ticks"] and "10 s" in found["ticks"]


def test_without_map_tiles_the_track_still_draws(tmp_path):
    # Given the same report, opened offline (every tile request fails)
    html, _ = report(tmp_path)
    found, errors = open_page(html, "abort")
    # Then the only errors are the tiles', and the track and span are drawn all the same
    assert all("tile.openstreetmap.org" in e for e in errors)
    assert found["paths"][0] >= 2


def test_on_a_phone_the_timeline_fits_without_sideways_scrolling(tmp_path):
    # Given the report, opened on a 390 px wide phone
    html, _ = report(tmp_path)
    found = open_on_phone(html)
    # Then the page is laid out at the phone's width (the viewport line), not a desktop's
    assert found["inner"] == 390
    # And nothing scrolls sideways: each timeline shrinks into the screen, still drawn
    assert found["scroll"] <= found["inner"]
    assert len(found["timelines"]) == 2
    for box in found["timelines"]:
        assert 0 <= box["left"] and box["right"] <= found["inner"] and box["height"] > 50

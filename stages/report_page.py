"""``report.html``: one self-contained page about a run, readable offline.

Drives come by the time they were driven, each under its footage name (event folder or
first clip's local time, cameras, minutes) with its id. Per drive:

* a map of its GPS track with the roadwork spans drawn on it (Leaflet, vendored in
  ``stages/vendor/leaflet`` and inlined, so the page works offline: map tiles load when
  online, and the track and spans draw without them);
* a timeline of the roadwork confidence per window on a real time axis (the drive's local
  clock where its first clip's name gives it, and seconds into the drive), with the
  threshold and the roadwork windows shaded;
* its problems and the windows decided without a camera, folded under one summary line;
* the key frames of its most confident roadwork windows with their boxes, each saying why
  it was picked (its boxes, or the scorer's probability when it has none).

Pure: the caller passes the key frames' bytes (``thumbnail_keys`` says which).
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path

import cv2
import numpy as np

from stream.schemas import CameraFrame, DriveSummary, Verdict

#: Roadwork windows per drive whose key frames are drawn.
MAX_THUMB_WINDOWS = 8
THUMB_WIDTH = 256
SVG_WIDTH, SVG_HEIGHT = 760, 190
SVG_LEFT, SVG_RIGHT, SVG_TOP, SVG_BOTTOM = 40, 34, 14, 46
#: Tick spacings tried for the time axis (seconds), the first giving at most ``MAX_TICKS``.
TICK_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200)
MAX_TICKS = 8
VENDOR = Path(__file__).parent / "vendor" / "leaflet"
#: Map tiles (OpenStreetMap's, with its attribution); the page draws without them.
TILES = "https://tile.openstreetmap.org/{z}/{x}/{y}.png"
TILES_ATTRIBUTION = '&copy; <a href="https://www.openstreetmap.org/copyright">OpenStreetMap</a> contributors'
LOCAL_FORMAT = "%Y-%m-%d_%H-%M-%S"

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222;overflow-wrap:anywhere}
svg.timeline{display:block;max-width:760px;height:auto}
@media (max-width:600px){body{margin:.75em}figure{width:100%}figure img{width:100%;height:auto}}
section{margin-bottom:3em;border-top:1px solid #ccc;padding-top:.5em}
h2 small{font-weight:normal;color:#777;font-size:.6em;margin-left:.5em}
.map{height:300px;margin:.5em 0;border:1px solid #bbb;background:#eef}
.nomap{color:#777;font-style:italic}
.thumbs{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:256px}figcaption{font-size:11px;line-height:1.3}
details{margin:.5em 0}summary{cursor:pointer}
.roadwork{color:#c92a2a;font-weight:bold}
"""

MAP_SCRIPT = """
document.querySelectorAll('.map').forEach(function (el) {
  var data = JSON.parse(document.getElementById(el.dataset.source).textContent);
  var map = L.map(el, {scrollWheelZoom: false});
  L.tileLayer(%(tiles)s, {maxZoom: 19, attribution: %(attribution)s}).addTo(map);
  var layers = [];
  if (data.track.length > 1) {
    layers.push(L.polyline(data.track, {color: '#1c7ed6', weight: 3}).addTo(map));
  }
  data.spans.forEach(function (span) {
    if (span.track.length > 1) {
      layers.push(L.polyline(span.track, {color: '#e03131', weight: 7, opacity: 0.85})
        .bindTooltip(span.label).addTo(map));
    } else if (span.track.length === 1) {
      layers.push(L.circleMarker(span.track[0], {radius: 8, color: '#e03131'}).bindTooltip(span.label).addTo(map));
    }
  });
  if (data.track.length === 1 && !data.spans.length) {
    layers.push(L.circleMarker(data.track[0], {radius: 6, color: '#1c7ed6'}).addTo(map));
  }
  var bounds = L.featureGroup(layers).getBounds();
  if (bounds.isValid()) { map.fitBounds(bounds, {padding: [20, 20], maxZoom: 17}); }
});
"""


def drive_order(verdicts: Sequence[Verdict], summaries: Sequence[DriveSummary] = ()) -> list[str]:
    """Drive ids by the time they were driven (UTC, else footage name), then id."""
    first: dict[str, tuple[float, str]] = {}
    for item in [*summaries, *verdicts]:
        utc = item.start_utc if item.start_utc is not None else float("inf")
        old = first.get(item.drive_id, (float("inf"), ""))
        first[item.drive_id] = (min(old[0], utc), old[1] or item.drive_name)
    return sorted(first, key=lambda d: (*first[d], d))


def thumbnail_keys(verdicts: Sequence[Verdict], per_drive: int = MAX_THUMB_WINDOWS) -> list[str]:
    """Blob keys of the key frames the page draws (the most confident roadwork windows)."""
    return [f.blob_key for v in thumb_windows(verdicts, per_drive) for f in v.frames]


def thumb_windows(verdicts: Sequence[Verdict], per_drive: int = MAX_THUMB_WINDOWS) -> list[Verdict]:
    """Each drive's ``per_drive`` most confident roadwork windows with key frames, by window."""
    chosen = []
    for drive in sorted({v.drive_id for v in verdicts}):
        roadwork = [v for v in verdicts if v.drive_id == drive and v.roadwork and v.frames]
        best = sorted(roadwork, key=lambda v: (-v.confidence, v.window))[:per_drive]
        chosen += sorted(best, key=lambda v: v.window)
    return chosen


def draw_detections(image: np.ndarray, frame: CameraFrame, color: tuple[int, int, int], *, scale: float = 0.35,
                    top: int = 10) -> None:  # fmt: skip
    """Draw ``frame``'s boxes (normalised xyxy) and "type score" labels onto ``image`` (HxWx3, in place).

    ``color`` is in the image's channel order; labels stay at least ``top`` px from the top edge.
    """
    h, w = image.shape[:2]
    for det in frame.detections:
        x0, y0, x1, y1 = (round(det.box[0] * w), round(det.box[1] * h), round(det.box[2] * w), round(det.box[3] * h))
        cv2.rectangle(image, (x0, y0), (x1, y1), color, 2)
        cv2.putText(image, f"{det.type} {det.score:.2f}", (x0, max(top, y0 - 3)), cv2.FONT_HERSHEY_SIMPLEX,
                    scale, color, 1, cv2.LINE_AA)  # fmt: skip


def draw_boxes(image_bytes: bytes, frame: CameraFrame, width: int | None = THUMB_WIDTH) -> bytes | None:
    """A JPEG of one key frame (``width`` wide, or its own size) with its detections drawn;
    ``None`` if undecodable."""
    image = cv2.imdecode(np.frombuffer(image_bytes, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        return None
    h, w = image.shape[:2]
    if width is not None:
        image = cv2.resize(image, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)
    draw_detections(image, frame, (0, 140, 255))  # orange in OpenCV's BGR
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return encoded.tobytes() if ok else None


# -- the timeline ----------------------------------------------------------------------------


def _local(local_start: str | None) -> datetime | None:
    try:
        return datetime.strptime(local_start, LOCAL_FORMAT) if local_start else None
    except ValueError:
        return None


def tick_step(span_s: float) -> int:
    """The first of ``TICK_STEPS`` that puts at most ``MAX_TICKS`` ticks on ``span_s``."""
    return next((s for s in TICK_STEPS if span_s / s <= MAX_TICKS), TICK_STEPS[-1])


def timeline_svg(verdicts: Sequence[Verdict], threshold: float = 0.5, local_start: str | None = None) -> str:
    """An inline SVG plot of one drive's confidence per window on a time axis: seconds into
    the drive, and the car's local clock when ``local_start`` (its first clip's name) says."""
    ordered = sorted(verdicts, key=lambda v: v.window)
    if not ordered:
        return "<p>No windows.</p>"
    t_max = max(v.t_end for v in ordered) or 1.0
    plot_w, plot_h = SVG_WIDTH - SVG_LEFT - SVG_RIGHT, SVG_HEIGHT - SVG_TOP - SVG_BOTTOM
    x = lambda t: SVG_LEFT + plot_w * t / t_max  # noqa: E731
    y = lambda c: SVG_TOP + plot_h * (1 - c)  # noqa: E731
    # A viewBox and width 100% (CSS caps it at its own size) let the plot shrink to a
    # phone's width instead of forcing the page to scroll sideways.
    parts = [(f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {SVG_WIDTH} {SVG_HEIGHT}" '
              'width="100%" preserveAspectRatio="xMinYMin meet" '
              'role="img" aria-label="roadwork confidence per window over time">')]  # fmt: skip
    for v in ordered:
        if v.roadwork:
            parts.append(f'<rect x="{x(v.t_start):.1f}" y="{SVG_TOP}" width="{x(v.t_end) - x(v.t_start):.1f}" '
                         f'height="{plot_h}" fill="#ffd8a8"><title>window {v.window}: roadwork, '
                         f'{v.confidence:.2f}</title></rect>')  # fmt: skip
    parts.append(f'<line x1="{SVG_LEFT}" x2="{SVG_LEFT + plot_w}" y1="{y(threshold):.1f}" y2="{y(threshold):.1f}" '
                 'stroke="#999" stroke-dasharray="4 3"/>')  # fmt: skip
    # One line per run of consecutive windows: a window with no verdict had no frame, and a
    # line across it would claim a confidence nobody measured. A lone window is a dot.
    for run in _runs(ordered):
        if len(run) == 1:
            v = run[0]
            parts.append(f'<circle class="point" cx="{x((v.t_start + v.t_end) / 2):.1f}" cy="{y(v.confidence):.1f}" '
                         'r="3" fill="#d9480f"/>')  # fmt: skip
            continue
        points = " ".join(f"{x((v.t_start + v.t_end) / 2):.1f},{y(v.confidence):.1f}" for v in run)
        parts.append(f'<polyline fill="none" stroke="#d9480f" stroke-width="2" points="{points}"/>')
    parts.append(f'<rect x="{SVG_LEFT}" y="{SVG_TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>')
    for value, text in ((1.0, "1"), (threshold, f"{threshold:g}"), (0.0, "0")):
        parts.append(f'<text x="{SVG_LEFT - 6}" y="{y(value) + 4:.1f}" font-size="11" text-anchor="end">{text}</text>')
    start = _local(local_start)
    step = tick_step(t_max)
    for tick in range(0, math.floor(t_max) + 1, step):
        tx = x(tick)
        parts.append(f'<line class="tick" x1="{tx:.1f}" x2="{tx:.1f}" y1="{SVG_TOP + plot_h}" y2="{SVG_TOP + plot_h + 5}" stroke="#333"/>')
        clock = (start + timedelta(seconds=tick)).strftime("%H:%M:%S") if start else ""
        parts.append(f'<text x="{tx:.1f}" y="{SVG_TOP + plot_h + 17}" font-size="11" text-anchor="middle">{tick} s</text>')
        if clock:
            parts.append(f'<text x="{tx:.1f}" y="{SVG_TOP + plot_h + 30}" font-size="10" fill="#555" '
                         f'text-anchor="middle">{clock}</text>')  # fmt: skip
    axis = "seconds into the drive" + (" / the car's local time" if start else "")
    parts.append(f'<text x="{SVG_LEFT + plot_w / 2:.1f}" y="{SVG_HEIGHT - 2}" font-size="10" fill="#555" '
                 f'text-anchor="middle">{axis}</text></svg>')  # fmt: skip
    return "".join(parts)


def _runs(ordered: Sequence[Verdict]) -> list[list[Verdict]]:
    """``ordered`` (by window) cut where window indices skip: the gaps with no frame."""
    runs: list[list[Verdict]] = []
    for v in ordered:
        if runs and v.window == runs[-1][-1].window + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return runs


# -- the map ---------------------------------------------------------------------------------


def map_data(verdicts: Sequence[Verdict], summary: DriveSummary | None) -> dict:
    """The drive's track (one position a window) and its roadwork spans' tracks, ``[lat, lon]``."""
    track = [[v.gps.lat, v.gps.lon] for v in sorted(verdicts, key=lambda v: v.window) if v.gps is not None]
    spans = []
    for span in summary.spans if summary is not None else []:
        label = f"roadwork {span.t_start:.0f}–{span.t_end:.0f} s, confidence {span.confidence:.2f}"
        spans.append({"track": [list(p) for p in span.track], "label": label + (" (estimated)" if span.estimated else "")})
    return {"track": track, "spans": spans}


def _map_html(index: int, data: dict) -> str:
    if not data["track"] and not any(s["track"] for s in data["spans"]):
        return '<p class="nomap">No GPS position for this drive: no map.</p>'
    payload = json.dumps(data).replace("</", "<\\/")
    return (f'<div class="map" id="map-{index}" data-source="map-data-{index}"></div>'
            f'<script type="application/json" id="map-data-{index}">{payload}</script>')


# -- a drive -----------------------------------------------------------------------------------


def _why(v: Verdict, frame: CameraFrame) -> str:
    """Why a key frame was picked: its boxes, or the scorer's probability when it has none."""
    head = f"window {v.window} ({v.confidence:.2f}), {frame.camera}'s strongest frame at {frame.t:.1f} s: "
    if frame.detections:
        boxes = ", ".join(f"{d.type} {d.score:.2f}" for d in sorted(frame.detections, key=lambda d: -d.score)[:4])
        more = f" +{len(frame.detections) - 4}" if len(frame.detections) > 4 else ""
        reason = f"{len(frame.detections)} box{'es' * (len(frame.detections) != 1)} ({boxes}{more})"
    else:
        reason = "no box"
    if frame.roadwork_prob is not None:
        reason += f"; scorer {frame.roadwork_prob:.2f}"
    return head + reason


def _thumbs_html(verdicts: Sequence[Verdict], images: Mapping[str, bytes]) -> str:
    cells = []
    for v in thumb_windows(verdicts):
        for frame in v.frames:
            blob = images.get(frame.blob_key)
            jpeg = draw_boxes(blob, frame) if blob else None
            if jpeg is None:
                continue
            data = base64.b64encode(jpeg).decode()
            caption = html.escape(_why(v, frame))
            cells.append(f'<figure class="keyframe"><img src="data:image/jpeg;base64,{data}" alt="{caption}">'
                         f"<figcaption>{caption}</figcaption></figure>")  # fmt: skip
    if not cells:
        return "<p>No roadwork key frames to show.</p>"
    note = ("<p>Key frames of the most confident roadwork windows (up to "
            f"{MAX_THUMB_WINDOWS} a drive): each camera's frame with the most evidence (boxes and the "
            "scorer's probability) in that window.</p>")  # fmt: skip
    return note + f'<div class="thumbs">{"".join(cells)}</div>'


def drive_title(drive: str, verdicts: Sequence[Verdict], summary: DriveSummary | None) -> str:
    """The drive's name for people (``DriveSummary.label``), or its id."""
    name = summary.label() if summary is not None and summary.drive_name else next(
        (v.drive_name for v in verdicts if v.drive_name), "")  # fmt: skip
    return name or drive


def _problems_html(verdicts: Sequence[Verdict], summary: DriveSummary | None) -> str:
    problems = list(summary.problems) if summary is not None else []
    missing = _missing(verdicts)
    if not problems and not missing:
        return "<p>No problems.</p>"
    parts = []
    if problems:
        parts.append(f"{len(problems)} problem{'s' * (len(problems) != 1)}")
    if missing:
        parts.append(f"{len(missing)} camera{'s' * (len(missing) != 1)} missing from some windows")
    items = "".join(f"<li>{html.escape(p)}</li>" for p in problems)
    items += "".join(f"<li>{html.escape(line)}</li>" for line in missing)
    return f'<details class="problems"><summary>{html.escape(", ".join(parts))}</summary><ul>{items}</ul></details>'


def _missing(verdicts: Sequence[Verdict]) -> list[str]:
    # Which windows were decided without which camera: absence is normal, silence is not.
    by_camera: dict[str, list[int]] = {}
    for v in sorted(verdicts, key=lambda v: v.window):
        for camera in v.missing_cameras:
            by_camera.setdefault(camera, []).append(v.window)
    return [f"{camera}: no frame in {len(windows)} of {len(verdicts)} windows ({_ranges(windows)})"
            for camera, windows in sorted(by_camera.items())]  # fmt: skip


def _ranges(indices: Sequence[int]) -> str:
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] + 1 == i:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(f"{r[0]}–{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _drive_html(index: int, drive: str, verdicts: Sequence[Verdict], summary: DriveSummary | None,
                images: Mapping[str, bytes], threshold: float, local_start: str | None) -> str:  # fmt: skip
    roadwork = sum(v.roadwork for v in verdicts)
    facts = f"{len(verdicts)} windows, <span class=roadwork>{roadwork} roadwork</span>"
    if summary is not None:
        facts += f"; cameras: {html.escape(', '.join(summary.cameras) or 'none')}"
        spans = "".join(
            f"<li>{s.t_start:.1f}–{s.t_end:.1f} s, confidence {s.confidence:.2f}"
            f"{' (position estimated)' if s.estimated else ''}</li>"
            for s in summary.spans
        )
        facts += f"<ul>{spans}</ul>" if spans else ""
    title = html.escape(drive_title(drive, verdicts, summary))
    return (f'<section id="drive-{index}"><h2>{title} <small>drive {html.escape(drive)}</small></h2>'
            f"<p>{facts}</p>{_problems_html(verdicts, summary)}{_map_html(index, map_data(verdicts, summary))}"
            f"{timeline_svg(verdicts, threshold, local_start)}{_thumbs_html(verdicts, images)}</section>")  # fmt: skip


def _footage_html(footage: Sequence[str]) -> str:
    if not footage:
        return ""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in footage)
    summary = f"Footage folder: {len(footage)} file{'s' * (len(footage) != 1)} skipped or noted"
    return f'<details class="footage"><summary>{html.escape(summary)}</summary><ul>{items}</ul></details>'


def report_html(
    verdicts: Sequence[Verdict],
    summaries: Sequence[DriveSummary],
    images: Mapping[str, bytes],
    threshold: float = 0.5,
    footage: Sequence[str] = (),
    local_starts: Mapping[str, str] | None = None,
) -> str:
    """The self-contained page.

    Parameters:
        footage: what discovery skipped or noted, in words.
        local_starts: drive id -> its first clip's name stamp (the car's local clock), for
            the timelines' clock axis.
    """
    by_summary = {s.drive_id: s for s in summaries}
    drives = drive_order(verdicts, summaries)
    local_starts = local_starts or {}
    sections, toc = [], []
    for i, d in enumerate(drives):
        mine = [v for v in verdicts if v.drive_id == d]
        sections.append(_drive_html(i, d, mine, by_summary.get(d), images, threshold, local_starts.get(d)))
        roadwork = sum(v.roadwork for v in mine)
        toc.append(f'<li><a href="#drive-{i}">{html.escape(drive_title(d, mine, by_summary.get(d)))}</a>: '
                   f"{roadwork} of {len(mine)} windows roadwork</li>")  # fmt: skip
    css = (VENDOR / "leaflet.css").read_text()
    js = (VENDOR / "leaflet.js").read_text()
    script = MAP_SCRIPT % {"tiles": json.dumps(TILES), "attribution": json.dumps(TILES_ATTRIBUTION)}
    # The viewport line makes phones lay the page out at their own width, not a desktop's.
    return ("<!doctype html><html><head><meta charset=utf-8>"
            '<meta name="viewport" content="width=device-width, initial-scale=1"><title>roadstream report</title>'
            f"<style>{css}</style><style>{STYLE}</style><script>{js}</script></head><body>"
            f"<h1>roadstream report</h1><p>{len(drives)} drive{'s' * (len(drives) != 1)} by time, "
            f"{len(verdicts)} windows.</p>"
            f"<ol class=drives>{''.join(toc)}</ol>{_footage_html(footage)}"
            f"{''.join(sections) or '<p>No drives.</p>'}<script>{script}</script></body></html>")  # fmt: skip

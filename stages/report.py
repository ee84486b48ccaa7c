"""The output folder of a run: ``verdicts.jsonl``, ``drives.jsonl``, ``drives.geojson``, ``report.html``.

Pure apart from writing files: the caller fetches the key-frame blobs it wants drawn
(``thumbnail_keys`` says which) and passes their bytes in.

* ``verdicts.jsonl`` — one verdict a line, drives by time, then by window; ``verdicts.csv``
  the same verdicts as a spreadsheet's rows (``CSV_COLUMNS``).
* ``drives.jsonl`` — one drive summary a line: windows, spans, cameras, frame counts, the
  minutes each camera had no frame, missed ticks and the problems, each naming its file.
* ``drives.geojson`` — a FeatureCollection with one feature per roadwork span: a
  LineString of its GPS track (``[lon, lat]``), a Point when the track has one position
  (an event's estimate), or no geometry when nothing is known; properties carry the drive,
  times, confidence and whether the position is an estimate.
* ``report.html`` — one self-contained page: what discovery skipped, then per drive its
  problems, the windows decided without each camera, an inline SVG timeline of the
  roadwork confidence per window (threshold line, roadwork windows shaded), then JPEG
  thumbnails (base64) of its roadwork windows' key frames with the boxes drawn.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from stream.schemas import CameraFrame, DriveSummary, Verdict

#: Roadwork windows per drive whose key frames are drawn.
MAX_THUMB_WINDOWS = 8
THUMB_WIDTH = 256
SVG_WIDTH, SVG_HEIGHT, SVG_PAD = 720, 160, 28


def drive_order(verdicts: Sequence[Verdict], summaries: Sequence[DriveSummary] = ()) -> list[str]:
    """Drive ids by the time they were driven (UTC, else footage name), then id."""
    first: dict[str, tuple[float, str]] = {}
    for item in [*summaries, *verdicts]:
        utc = item.start_utc if item.start_utc is not None else float("inf")
        old = first.get(item.drive_id, (float("inf"), ""))
        first[item.drive_id] = (min(old[0], utc), old[1] or item.drive_name)
    return sorted(first, key=lambda d: (*first[d], d))


def write_verdicts(path: Path, verdicts: Sequence[Verdict], summaries: Sequence[DriveSummary] = ()) -> Path:
    """Write ``verdicts.jsonl`` (one JSON object a line, drives by time, then by window)."""
    rank = {d: i for i, d in enumerate(drive_order(verdicts, summaries))}
    ordered = sorted(verdicts, key=lambda v: (rank[v.drive_id], v.window))
    path.write_text("".join(v.model_dump_json() + "\n" for v in ordered))
    return path


#: ``verdicts.csv``'s columns; lists are ``;``-separated, objects ``type=count``.
CSV_COLUMNS = ("drive_id", "drive_name", "window", "t_start", "t_end", "start_utc", "end_utc", "roadwork",
               "confidence", "cameras", "missing_cameras", "objects", "anomaly_score", "roadwork_prob", "vlm",
               "lat", "lon", "gps_estimated")  # fmt: skip


def verdicts_csv(verdicts: Sequence[Verdict], summaries: Sequence[DriveSummary] = ()) -> str:
    """The verdicts as CSV text (header ``CSV_COLUMNS``), in ``write_verdicts``' order."""
    rank = {d: i for i, d in enumerate(drive_order(verdicts, summaries))}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for v in sorted(verdicts, key=lambda v: (rank[v.drive_id], v.window)):
        vlm = "" if v.vlm is None else ("yes" if v.vlm.roadwork else "no")
        writer.writerow([
            v.drive_id, v.drive_name, v.window, v.t_start, v.t_end, _utc(v.start_utc), _utc(v.end_utc),
            int(v.roadwork), round(v.confidence, 4), ";".join(v.cameras), ";".join(v.missing_cameras),
            ";".join(f"{k}={n}" for k, n in v.objects.items()),
            "" if v.anomaly_score is None else round(v.anomaly_score, 4),
            "" if v.roadwork_prob is None else round(v.roadwork_prob, 4), vlm,
            v.gps.lat if v.gps else "", v.gps.lon if v.gps else "", int(v.gps.estimated) if v.gps else "",
        ])  # fmt: skip
    return out.getvalue()


def _utc(seconds: float | None) -> str:
    from datetime import datetime, timezone

    return "" if seconds is None else datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def save_key_frames(folder: Path, verdicts: Sequence[Verdict], images: Mapping[str, bytes]) -> list[Path]:
    """Write each drawn key frame (``thumbnail_keys``) full size with its boxes, as
    ``<drive name or id>_w<window>_<camera>.jpg``; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for v in _thumb_windows(verdicts, MAX_THUMB_WINDOWS):
        for frame in v.frames:
            blob = images.get(frame.blob_key)
            jpeg = draw_boxes(blob, frame, width=None) if blob else None
            if jpeg is None:
                continue
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", v.drive_name or v.drive_id)
            path = folder / f"{stem}_w{v.window:04d}_{frame.camera}.jpg"
            path.write_bytes(jpeg)
            written.append(path)
    return written


def read_verdicts(path: str | Path) -> list[Verdict]:
    """Read a ``verdicts.jsonl`` back (lines that are not verdicts are skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        data = json.loads(line) if line.strip() else None
        if isinstance(data, dict) and "window" in data:
            out.append(Verdict.model_validate(data))
    return out


def geojson(summaries: Sequence[DriveSummary]) -> dict:
    """The roadwork spans of drives as a GeoJSON FeatureCollection."""
    features = []
    for summary in sorted(summaries, key=lambda s: s.drive_id):
        for i, span in enumerate(summary.spans):
            coords = [[lon, lat] for lat, lon in span.track]
            if len(coords) >= 2:
                geometry = {"type": "LineString", "coordinates": coords}
            elif coords:
                geometry = {"type": "Point", "coordinates": coords[0]}
            else:
                geometry = None
            properties = {
                "drive_id": summary.drive_id, "span": i, "t_start": span.t_start, "t_end": span.t_end,
                "start_utc": span.start_utc, "end_utc": span.end_utc,
                "confidence": round(span.confidence, 4), "estimated": span.estimated,
            }  # fmt: skip
            features.append({"type": "Feature", "geometry": geometry, "properties": properties})
    return {"type": "FeatureCollection", "features": features}


def thumbnail_keys(verdicts: Sequence[Verdict], per_drive: int = MAX_THUMB_WINDOWS) -> list[str]:
    """Blob keys of the key frames ``write_report`` draws (most confident roadwork windows)."""
    return [f.blob_key for v in _thumb_windows(verdicts, per_drive) for f in v.frames]


def _thumb_windows(verdicts: Sequence[Verdict], per_drive: int) -> list[Verdict]:
    chosen = []
    for drive in sorted({v.drive_id for v in verdicts}):
        roadwork = [v for v in verdicts if v.drive_id == drive and v.roadwork and v.frames]
        best = sorted(roadwork, key=lambda v: (-v.confidence, v.window))[:per_drive]
        chosen += sorted(best, key=lambda v: v.window)
    return chosen


def draw_boxes(image_bytes: bytes, frame: CameraFrame, width: int | None = THUMB_WIDTH) -> bytes | None:
    """A JPEG of one key frame (``width`` wide, or its own size) with its detections drawn;
    ``None`` if undecodable."""
    image = cv2.imdecode(np.frombuffer(image_bytes, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        return None
    h, w = image.shape[:2]
    if width is not None:
        image = cv2.resize(image, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)
    h, w = image.shape[:2]
    for det in frame.detections:
        x0, y0, x1, y1 = (round(det.box[0] * w), round(det.box[1] * h), round(det.box[2] * w), round(det.box[3] * h))
        cv2.rectangle(image, (x0, y0), (x1, y1), (0, 140, 255), 2)
        cv2.putText(image, f"{det.type} {det.score:.2f}", (x0, max(10, y0 - 3)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.35, (0, 140, 255), 1, cv2.LINE_AA)  # fmt: skip
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return encoded.tobytes() if ok else None


def timeline_svg(verdicts: Sequence[Verdict], threshold: float = 0.5) -> str:
    """An inline SVG plot of one drive's confidence per window over the drive clock."""
    ordered = sorted(verdicts, key=lambda v: v.window)
    if not ordered:
        return "<p>No windows.</p>"
    t_max = max(v.t_end for v in ordered) or 1.0
    plot_w, plot_h = SVG_WIDTH - 2 * SVG_PAD, SVG_HEIGHT - 2 * SVG_PAD
    x = lambda t: SVG_PAD + plot_w * t / t_max  # noqa: E731
    y = lambda c: SVG_PAD + plot_h * (1 - c)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_WIDTH}" height="{SVG_HEIGHT}" role="img">']
    for v in ordered:
        if v.roadwork:
            parts.append(f'<rect x="{x(v.t_start):.1f}" y="{SVG_PAD}" width="{x(v.t_end) - x(v.t_start):.1f}" '
                         f'height="{plot_h}" fill="#ffd8a8"/>')  # fmt: skip
    points = " ".join(f"{x((v.t_start + v.t_end) / 2):.1f},{y(v.confidence):.1f}" for v in ordered)
    parts += [
        f'<line x1="{SVG_PAD}" x2="{SVG_PAD + plot_w}" y1="{y(threshold):.1f}" y2="{y(threshold):.1f}" '
        'stroke="#999" stroke-dasharray="4 3"/>',
        f'<polyline fill="none" stroke="#d9480f" stroke-width="2" points="{points}"/>',
        f'<rect x="{SVG_PAD}" y="{SVG_PAD}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>',
        f'<text x="{SVG_PAD}" y="{SVG_HEIGHT - 8}" font-size="11">0 s</text>',
        f'<text x="{SVG_PAD + plot_w - 40}" y="{SVG_HEIGHT - 8}" font-size="11">{t_max:.0f} s</text>',
        f'<text x="4" y="{SVG_PAD + 4}" font-size="11">1</text><text x="4" y="{SVG_PAD + plot_h}" font-size="11">0</text>',
        "</svg>",
    ]
    return "".join(parts)


def _thumbs_html(verdicts: Sequence[Verdict], images: Mapping[str, bytes]) -> str:
    cells = []
    for v in _thumb_windows(verdicts, MAX_THUMB_WINDOWS):
        for frame in v.frames:
            blob = images.get(frame.blob_key)
            jpeg = draw_boxes(blob, frame) if blob else None
            if jpeg is None:
                continue
            data = base64.b64encode(jpeg).decode()
            caption = html.escape(f"window {v.window} · {frame.camera} · t={frame.t:.1f}s · {v.confidence:.2f}")
            cells.append(f'<figure><img src="data:image/jpeg;base64,{data}" alt="{caption}"><figcaption>{caption}</figcaption></figure>')
    return "".join(cells) or "<p>No roadwork key frames to show.</p>"


def _drive_title(drive: str, verdicts: Sequence[Verdict], summary: DriveSummary | None) -> str:
    name = summary.label() if summary is not None else next((v.drive_name for v in verdicts if v.drive_name), "")
    if not name or name == drive:
        return f"Drive {html.escape(drive)}"
    return f"{html.escape(name)} <small class=id>drive {html.escape(drive)}</small>"


def _drive_html(drive: str, verdicts: Sequence[Verdict], summary: DriveSummary | None,
                images: Mapping[str, bytes], threshold: float) -> str:  # fmt: skip
    roadwork = sum(v.roadwork for v in verdicts)
    facts = f"{len(verdicts)} windows, {roadwork} roadwork"
    if summary is not None:
        facts += f", cameras: {', '.join(summary.cameras) or 'none'}"
        spans = "".join(
            f"<li>{s.t_start:.1f}–{s.t_end:.1f} s, confidence {s.confidence:.2f}"
            f"{' (position estimated)' if s.estimated else ''}</li>"
            for s in summary.spans
        )
        problems = "".join(f"<li>{html.escape(p)}</li>" for p in summary.problems)
        facts += f"<ul>{spans}</ul>" + (f"<p>Problems:</p><ul>{problems}</ul>" if problems else "")
    facts += _missing_html(verdicts)
    return (f"<section><h2>{_drive_title(drive, verdicts, summary)}</h2><p>{facts}</p>{timeline_svg(verdicts, threshold)}"
            f"<div class=thumbs>{_thumbs_html(verdicts, images)}</div></section>")  # fmt: skip


def _missing_html(verdicts: Sequence[Verdict]) -> str:
    # Which windows were decided without which camera: absence is normal, silence is not.
    by_camera: dict[str, list[int]] = {}
    for v in sorted(verdicts, key=lambda v: v.window):
        for camera in v.missing_cameras:
            by_camera.setdefault(camera, []).append(v.window)
    if not by_camera:
        return ""
    rows = "".join(
        f"<li>{html.escape(camera)}: no frame in {len(windows)} of {len(verdicts)} windows "
        f"({html.escape(_ranges(windows))})</li>"
        for camera, windows in sorted(by_camera.items())
    )
    return f"<p>Windows decided without a camera:</p><ul>{rows}</ul>"


def _ranges(indices: Sequence[int]) -> str:
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] + 1 == i:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(f"{r[0]}–{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def report_html(
    verdicts: Sequence[Verdict], summaries: Sequence[DriveSummary], images: Mapping[str, bytes], threshold: float = 0.5,
    footage: Sequence[str] = (),
) -> str:
    """The self-contained report page; ``footage``: what discovery skipped or noted, in words."""
    by_summary = {s.drive_id: s for s in summaries}
    drives = drive_order(verdicts, summaries)
    body = "".join(
        _drive_html(d, [v for v in verdicts if v.drive_id == d], by_summary.get(d), images, threshold) for d in drives
    )
    style = ("body{font-family:sans-serif;margin:2em}section{margin-bottom:2.5em}"
             ".thumbs{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0}figcaption{font-size:11px}")  # fmt: skip
    return (f"<!doctype html><html><head><meta charset=utf-8><title>roadstream report</title>"
            f"<style>{style}</style></head><body><h1>roadstream report</h1>"
            f"<p>{len(drives)} drives, {len(verdicts)} windows.</p>{_footage_html(footage)}"
            f"{body or '<p>No drives.</p>'}</body></html>")  # fmt: skip


def _footage_html(footage: Sequence[str]) -> str:
    if not footage:
        return ""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in footage)
    return f"<p>Footage folder:</p><ul>{items}</ul>"


def write_report(
    out_dir: str | Path,
    verdicts: Sequence[Verdict],
    summaries: Sequence[DriveSummary],
    images: Mapping[str, bytes] | None = None,
    *,
    threshold: float = 0.5,
    footage: Sequence[str] = (),
    save_frames: bool = False,
) -> dict[str, Path]:
    """Write the output files into ``out_dir`` (created if missing).

    Parameters:
        out_dir: the output folder.
        verdicts: every verdict of the run.
        summaries: every drive summary of the run.
        images: blob key -> encoded frame (JPEG), for ``thumbnail_keys(verdicts)``.
        threshold: the roadwork threshold drawn on the timelines.
        footage: discovery's problems and notes (skipped files, clock changes), shown first.
        save_frames: also write the key frames, full size with their boxes, into ``frames/``.

    Returns:
        ``{"verdicts": path, "csv": path, "drives": path, "geojson": path, "html": path}``
        (and ``"frames"`` with ``save_frames``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"verdicts": out / "verdicts.jsonl", "csv": out / "verdicts.csv", "drives": out / "drives.jsonl",
             "geojson": out / "drives.geojson", "html": out / "report.html"}  # fmt: skip
    write_verdicts(paths["verdicts"], verdicts, summaries)
    paths["csv"].write_text(verdicts_csv(verdicts, summaries))
    if save_frames:
        paths["frames"] = out / "frames"
        save_key_frames(paths["frames"], verdicts, images or {})
    rank = {d: i for i, d in enumerate(drive_order(verdicts, summaries))}
    ordered = sorted(summaries, key=lambda s: rank[s.drive_id])
    paths["drives"].write_text("".join(s.model_dump_json() + "\n" for s in ordered))
    paths["geojson"].write_text(json.dumps(geojson(summaries), indent=1) + "\n")
    paths["html"].write_text(report_html(verdicts, summaries, images or {}, threshold, footage))
    return paths

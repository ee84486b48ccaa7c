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
* ``report.html`` — one self-contained page, drives by time with their names, each with a
  map of its track and roadwork spans, a timeline on a real time axis, its problems folded
  and its key frames saying why they were picked (``stages.report_page``).
* ``frames/`` (on request) — those key frames full size with their boxes.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from stages.report_page import (  # noqa: F401 - re-exported: the run and tests draw from here
    MAX_THUMB_WINDOWS,
    draw_boxes,
    drive_order,
    report_html,
    thumb_windows,
    thumbnail_keys,
    timeline_svg,
)
from stream.schemas import DriveSummary, Verdict


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
    from datetime import UTC, datetime

    return "" if seconds is None else datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def save_key_frames(folder: Path, verdicts: Sequence[Verdict], images: Mapping[str, bytes]) -> list[Path]:
    """Write each drawn key frame (``thumbnail_keys``) full size with its boxes, as
    ``<drive name or id>_w<window>_<camera>.jpg``; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for v in thumb_windows(verdicts, MAX_THUMB_WINDOWS):
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


def write_report(
    out_dir: str | Path,
    verdicts: Sequence[Verdict],
    summaries: Sequence[DriveSummary],
    images: Mapping[str, bytes] | None = None,
    *,
    threshold: float = 0.5,
    footage: Sequence[str] = (),
    save_frames: bool = False,
    local_starts: Mapping[str, str] | None = None,
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
        local_starts: drive id -> its first clip's name stamp, for the timelines' clock axis.

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
    paths["html"].write_text(report_html(verdicts, summaries, images or {}, threshold, footage, local_starts))
    return paths

"""Fuse's coefficients fitted on windows of six-camera drives, held out by source (issue 18).

``roadstream eval --fit`` fits fuse's logistic coefficients (``stages.fuse.FEATURES``) on
labelled windows. This script makes those windows and says what the fit is worth on
sources it did not see:

1. one six-camera TeslaCam drive per labelled span of ``../shared/footage`` (its
   ``MANIFEST.tsv``): each roadwork clip's ``ROADWORK_SPANS`` span, each clear clip, and
   the roadwork clips' ``CLEAR_SPANS`` (the street before or after the work zone: clear
   windows from the roadwork camera, so the fit cannot learn the camera). The six cameras
   show the span from six start times spread over it (a source shorter than the drive
   loops), at ``--size``; every window of a drive has the drive's label;
2. ``roadstream run`` over all the drives with the shipped models and the default
   sampling (5 frames/s per camera: the frames per window that fuse's max-based features
   see), one run;
3. per source group (``stages.train.scorer`` groups: a clip, or the clips of one drive),
   the coefficients fitted (class-balanced, ``fit_coefficients``) on the windows of the
   *other* groups score the group's windows; pooled and per group: MCC, false roadwork
   windows on clear drives, roadwork windows found. The same windows under the coefficients
   of the run (the shipped defaults) are the baseline;
4. the coefficients fitted on every window, written to ``--out`` beside the figures.

Only fuse's fit is held out: the shipped scorer was trained on every footage clip, so its
probabilities here are not held-out figures (the cone detector never saw this footage).
The roadwork windows all come from one phone camera (Mi3's eight cities): the groups of
the roadwork side are its clips, not other cameras. Figures and caveats go to the README.

    nice python3 bench/fuse_fit.py --work /tmp/fusefit --out docs/bench/fuse-fit.json
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.heldout_eval import cut_source
from stages.calibration import fit_coefficients
from stages.evaluate import metrics
from stages.fuse import FEATURES
from stages.train.scorer import CLEAR_SPANS, ROADWORK_SPANS, read_manifest
from stream.settings import DEFAULT_COEFFICIENTS

CAMERAS = ("front", "back", "left_repeater", "right_repeater", "left_pillar", "right_pillar")
#: Features fitted: the VLM's is left at its default (no VLM runs here: always 0).
FITTED = tuple(f for f in FEATURES if f != "vlm")


def spans(footage: Path, seconds: float) -> list[dict]:
    """Every drive to make: name, clip, group, label, span (start, end) in the clip."""
    import av

    out = []
    for clip in read_manifest(footage):
        with av.open(str(clip.path)) as container:
            stream = container.streams.video[0]
            length = float(stream.duration * stream.time_base)
        labelled = [(ROADWORK_SPANS.get(clip.name, (0.0, 99.0)), 1)] if clip.label == 1 else [((0.0, 99.0), 0)]
        labelled += [(span, 0) for span in CLEAR_SPANS.get(clip.name, [])]
        for n, ((start, end), label) in enumerate(labelled):
            end = min(end, length)
            if end - start < 1.0:  # under a second of clear street: not a drive
                continue
            out.append({"name": f"{clip.name}-{n}", "clip": clip, "group": clip.group, "label": label,
                        "span": (start, end)})  # fmt: skip
    return out


def make_drives(work: Path, todo: list[dict], seconds: float, size: tuple[int, int]) -> Path:
    """The drives under ``work/drives``, one folder each (hours apart: no two merge)."""
    from fixtures.teslacam import ClipSpec, make_drive

    root = work / "drives"
    spec = ClipSpec(duration_s=seconds, fps=30.0, size=size)
    for i, drive in enumerate(todo):
        folder = root / drive["name"]
        if folder.exists():
            continue
        start, end = drive["span"]
        room = max(0.0, end - start - seconds)  # start times spread over what the span allows
        sources = {}
        for k, camera in enumerate(CAMERAS):
            offset = start + room * k / (len(CAMERAS) - 1)
            take = min(seconds, end - offset)
            sources[camera] = cut_source(drive["clip"], offset, take, size, work / "sources" / f"{drive['name']}-{k}.mp4")
        make_drive(folder, start=f"2024-05-{1 + i // 24:02d}_{i % 24:02d}-00-00", minutes=1, cameras=CAMERAS,
                   spec=spec, sources=sources)  # fmt: skip
    return root


def run(root: Path, out: Path, timeout: float) -> Path:
    """``roadstream run`` over every drive (shipped models, default sampling); its verdicts file."""
    verdicts = out / "verdicts.jsonl"
    if not verdicts.is_file():
        cmd = [sys.executable, "-m", "workers.cli", "run", str(root), "--out", str(out), "--timeout", str(timeout)]
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    return verdicts


def windows(root: Path, verdicts: Path, todo: list[dict]) -> list[dict]:
    """Each verdict's window with its drive's name, group and label."""
    from stages.discover import discover

    by_name = {d["name"]: d for d in todo}
    drive_of = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for drive in discover(folder).drives:
            drive_of[drive.drive_id] = by_name[folder.name]
    rows = []
    for line in verdicts.read_text().splitlines():
        verdict = json.loads(line)
        if verdict.get("kind", "verdict") != "verdict" or "features" not in verdict:
            continue
        drive = drive_of.get(verdict["drive_id"])
        if drive is None:
            continue
        rows.append({"drive": drive["name"], "group": drive["group"], "label": drive["label"],
                     "features": verdict["features"], "shipped": bool(verdict["roadwork"])})  # fmt: skip
    return rows


def decide(coefficients: dict[str, float], features: dict[str, float], threshold: float = 0.5) -> bool:
    """Fuse's decision without a VLM: ``sigmoid(bias + Σ c·x) ≥ threshold``."""
    z = coefficients.get("bias", 0.0) + sum(coefficients.get(f, 0.0) * features.get(f, 0.0) for f in FITTED)
    return 1.0 / (1.0 + math.exp(-z)) >= threshold


def figures(truth: list[int], said: list[bool]) -> dict:
    """MCC, false roadwork windows of the clear ones, roadwork windows found."""
    clear = [s for t, s in zip(truth, said, strict=True) if not t]
    work = [s for t, s in zip(truth, said, strict=True) if t]
    score = metrics((bool(s), bool(t)) for t, s in zip(truth, said, strict=True))
    return {"windows": len(truth), "mcc": round(score.mcc, 3),
            "false_roadwork": f"{sum(clear)}/{len(clear)}", "roadwork_found": f"{sum(work)}/{len(work)}"}  # fmt: skip


def held_out(rows: list[dict]) -> dict:
    """Leave-one-group-out: fitted on the other groups, judged on the group's windows."""
    groups = sorted({r["group"] for r in rows})
    said: dict[int, bool] = {}
    per_group = {}
    for group in groups:
        train = [r for r in rows if r["group"] != group]
        test = [i for i, r in enumerate(rows) if r["group"] == group]
        coefficients = fit_coefficients([r["features"] for r in train], [r["label"] for r in train], FITTED,
                                        balanced=True)  # fmt: skip
        for i in test:
            said[i] = decide(coefficients, rows[i]["features"])
        per_group[group] = {
            "fitted": figures([rows[i]["label"] for i in test], [said[i] for i in test]),
            "shipped": figures([rows[i]["label"] for i in test], [rows[i]["shipped"] for i in test]),
        }
    truth = [r["label"] for r in rows]
    return {
        "pooled_fitted_held_out": figures(truth, [said[i] for i in range(len(rows))]),
        "pooled_shipped": figures(truth, [r["shipped"] for r in rows]),
        "per_group": per_group,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--footage", type=Path, default=ROOT.parent / "shared" / "footage")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fusefit"))
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each drive")
    parser.add_argument("--size", default="640x360", help="camera resolution WxH")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--out", type=Path, default=Path("fuse-fit.json"))
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    todo = spans(args.footage, args.seconds)
    root = make_drives(args.work, todo, args.seconds, size)
    rows = windows(root, run(root, args.work / "run", args.timeout), todo)
    report = {
        "drives": {d["name"]: {"group": d["group"], "label": d["label"], "span": d["span"]} for d in todo},
        "windows": {"roadwork": sum(r["label"] for r in rows), "clear": sum(1 - r["label"] for r in rows)},
        "shipped_coefficients": DEFAULT_COEFFICIENTS,
        **held_out(rows),
        "fitted_on_all": fit_coefficients([r["features"] for r in rows], [r["label"] for r in rows], FITTED,
                                          balanced=True),  # fmt: skip
    }
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({k: v for k, v in report.items() if k not in ("drives", "per_group")}, indent=2))


if __name__ == "__main__":
    main()

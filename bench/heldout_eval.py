"""Held-out drive-level verdict figures of the frame scorer (issue 8, "What it must show").

The shipped ``stages/models/scorer.pt`` was trained on every clip of the footage folder, so
drives made from those clips are not held out. This script:

1. splits the clips of ``MANIFEST.tsv`` into ``--folds`` clip-wise folds with the training
   code's own ``make_folds`` (same seed as the shipped cross-validation, so the same folds;
   ``kartikey_dashcam1``/``2`` stay together, every fold holds both labels);
2. per fold, trains a scorer on the OTHER folds' clips with ``python -m stages.train.scorer
   --clips … --cv-folds 1`` (skipped when ``WORK/foldN/scorer.pt`` exists);
3. per held-out clip (``kartikey_dashcam2`` only as a repeater: it repeats ``dashcam1``),
   makes one TeslaCam drive with ``fixtures.teslacam.make_drive``: the front camera shows
   that clip, the two repeaters the fold's other held-out clips of the same label. Roadwork
   clips are cut to start where roadwork comes into view (``ROADWORK_SPANS``), so a drive
   labelled roadwork shows roadwork; clear clips are used from their start;
4. runs ``roadstream run`` on each fold's drives with the fold's scorer and again with the
   shipped scorer (the cone detector is the shipped one in both: it was trained on the cone
   images, not on this footage), then ``roadstream eval --level both`` per fold and pooled.

Usage (development CPU, about 3 minutes per fold to train and ~15 s per drive to run)::

    nice -n 5 python bench/heldout_eval.py --work /tmp/heldout

Figures go to ``WORK/heldout_figures.json`` and are printed as a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.train.scorer import ROADWORK_SPANS, Clip, make_folds, read_manifest

#: Near-duplicates of another clip: not a drive of their own, only a repeater's content.
DUPLICATES = {"kartikey_dashcam2"}
CAMERAS = ("front", "left_repeater", "right_repeater")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--footage", default=str(ROOT.parent / "shared" / "footage"))
    parser.add_argument("--work", default="/tmp/heldout", help="fold weights, drives and outputs")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--sample-fps", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each drive")
    parser.add_argument("--size", default="320x180", help="camera resolution WxH")
    parser.add_argument("--shipped", default=str(ROOT / "stages" / "models" / "scorer.pt"))
    parser.add_argument("--timeout", type=float, default=900.0, help="per roadstream run")
    parser.add_argument(
        "--shipped-only", action="store_true",
        help="no fold scorers: run only the --shipped scorer on the fold drives (a wiring check, not held out)",
    )
    # On a busy CPU a camera's frames can reach fuse after the default 30 s watermark
    # timeout closed the window; a longer one keeps every camera in every verdict.
    parser.add_argument("--watermark-timeout", type=float, default=300.0, help="fuse.watermark_timeout_s")
    return parser.parse_args()


def train_fold(args, fold: int, train: list[Clip], out: Path) -> Path:
    """Train the fold's scorer on ``train`` clips unless its weights exist."""
    weights = out / "scorer.pt"
    if weights.is_file():
        print(f"fold {fold}: reusing {weights}", flush=True)
        return weights
    cmd = [sys.executable, "-m", "stages.train.scorer", "--device", args.device,
           "--footage", args.footage, "--out", str(out), "--epochs", str(args.epochs),
           "--sample-fps", str(args.sample_fps), "--batch-size", str(args.batch_size),
           "--cv-folds", "1", "--seed", str(args.seed), "--clips", *[c.name for c in train]]  # fmt: skip
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return weights


def cut_source(clip: Clip, start_s: float, seconds: float, size: tuple[int, int], out: Path) -> Path:
    """The clip from ``start_s`` for ``seconds``, resized, as an H.264 file (a drive's content)."""
    import av

    out.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(clip.path)) as src, av.open(str(out), "w") as dst:
        stream = dst.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        t0 = None
        for frame in src.decode(video=0):
            t0 = frame.time if t0 is None else t0
            t = frame.time - t0
            if t < start_s:
                continue
            if t >= start_s + seconds:
                break
            image = frame.reformat(size[0], size[1], format="yuv420p")
            image.pts = None
            for packet in stream.encode(image):
                dst.mux(packet)
        for packet in stream.encode():
            dst.mux(packet)
    return out


def make_drives(args, fold: int, held_out: list[Clip], work: Path) -> tuple[Path, dict[str, int]]:
    """One drive per held-out clip; returns the fold's footage root and folder → label."""
    from fixtures.teslacam import ClipSpec, make_drive

    size = tuple(int(v) for v in args.size.split("x"))
    root = work / "drives" / f"fold{fold}"
    sources = {}
    for clip in held_out:
        start = ROADWORK_SPANS.get(clip.name, (0.0, 0.0))[0] if clip.label == 1 else 0.0
        sources[clip.name] = cut_source(
            clip, start, args.seconds, size, work / "sources" / f"{clip.name}.mp4"
        )
    labels = {}
    spec = ClipSpec(duration_s=args.seconds, fps=30.0, size=size)
    for n, clip in enumerate(held_out):
        if clip.name in DUPLICATES:
            continue
        same = [c.name for c in held_out if c.label == clip.label and c.name != clip.name]
        shown = [clip.name] + [same[i % len(same)] if same else clip.name for i in range(len(CAMERAS) - 1)]
        folder = root / clip.name
        if not folder.exists():
            # Hours apart: drives with one clip name would be merged as duplicates.
            make_drive(folder, start=f"2024-05-01_{n:02d}-00-00", minutes=1, cameras=CAMERAS, spec=spec,
                       sources={cam: sources[name] for cam, name in zip(CAMERAS, shown)})  # fmt: skip
        labels[str(folder)] = clip.label
        print(
            f"fold {fold}: drive {clip.name} label={clip.label} cameras={dict(zip(CAMERAS, shown))}",
            flush=True,
        )
    return root, labels


def write_labels(folder_labels: dict[str, int], path: Path) -> None:
    """Labels CSV keyed by the drive ids ``roadstream run`` gives the drives in these folders."""
    from stages.discover import discover

    rows = []
    for folder, label in folder_labels.items():
        # Each drive has its own folder; ids depend on the clips' folder, as in the run.
        for drive in discover(folder).drives:
            rows.append({"drive_id": drive.drive_id, "label": label, "name": Path(folder).name})
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["drive_id", "label", "name"])
        writer.writeheader()
        writer.writerows(rows)


def run_and_eval(args, root: Path, scorer: Path, labels: Path, out: Path) -> dict:
    """``roadstream run`` with ``scorer``, then ``roadstream eval --level both --json``."""
    cli = [sys.executable, "-m", "workers.cli"]
    if not (out / "verdicts.jsonl").is_file():
        cmd = [*cli, "--set", f"detect.scorer={scorer}",
               "--set", f"fuse.watermark_timeout_s={args.watermark_timeout}", "run", str(root), "--out", str(out),
               "--timeout", str(args.timeout)]  # fmt: skip
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    return {**evaluate(labels, out / "verdicts.jsonl"), "windows": margins(labels, out / "verdicts.jsonl")}


def margins(labels: Path, verdicts: Path) -> dict:
    """Per true label: windows' confidence and ``roadwork_prob`` ranges, windows with cones."""
    with labels.open() as fh:
        truth = {row["drive_id"]: int(row["label"]) for row in csv.DictReader(fh)}
    found: dict[str, dict] = {}
    for line in verdicts.read_text().splitlines():
        v = json.loads(line)
        if v.get("window") is None or v["drive_id"] not in truth:
            continue
        entry = found.setdefault(
            "roadwork" if truth[v["drive_id"]] else "clear", {"conf": [], "prob": [], "cones": 0}
        )
        entry["conf"].append(v["confidence"])
        entry["prob"].append(v.get("roadwork_prob") or 0.0)
        entry["cones"] += bool((v.get("objects") or {}).get("cone"))
    return {k: {"n": len(e["conf"]), "confidence": [min(e["conf"]), max(e["conf"])],
                "roadwork_prob": [min(e["prob"]), max(e["prob"])], "with_cones": e["cones"]}
            for k, e in found.items()}  # fmt: skip


def evaluate(labels: Path, verdicts: Path) -> dict:
    """``roadstream eval --level both --json`` of a labels file and a verdicts file."""
    cmd = [sys.executable, "-m", "workers.cli", "eval", "--labels", str(labels),
           "--verdicts", str(verdicts), "--level", "both", "--json"]  # fmt: skip
    print("$ " + " ".join(cmd), flush=True)
    return json.loads(subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout)


def pool(work: Path, parts: list[tuple[Path, Path]], model: str) -> dict:
    """Evaluate the folds' verdicts and labels together."""
    labels, verdicts = work / "pooled_labels.csv", work / f"pooled_{model}.jsonl"
    with labels.open("w") as lab, verdicts.open("w") as ver:
        lab.write("drive_id,label,name\n")
        for label_file, verdict_file in parts:
            lab.writelines(label_file.read_text().splitlines(keepends=True)[1:])
            ver.write(verdict_file.read_text())
    return evaluate(labels, verdicts)


def main() -> None:
    args = parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    clips = read_manifest(args.footage)
    figures: dict = {"folds": [], "settings": vars(args)}
    models = ("shipped",) if args.shipped_only else ("heldout", "shipped")
    parts: dict[str, list[tuple[Path, Path]]] = {model: [] for model in models}
    for i, held_out in enumerate(make_folds(clips, args.folds, args.seed), start=1):
        names = {c.name for c in held_out}
        scorers = {"shipped": Path(args.shipped)}
        if not args.shipped_only:
            scorers["heldout"] = train_fold(args, i, [c for c in clips if c.name not in names], work / f"fold{i}")
        root, folder_labels = make_drives(args, i, held_out, work)
        labels = work / f"fold{i}_labels.csv"
        write_labels(folder_labels, labels)
        fold = {"fold": i, "held_out": sorted(names)}
        for model in models:
            scorer = scorers[model]
            out = work / "out" / f"fold{i}_{model}"
            fold[model] = run_and_eval(args, root, scorer, labels, out)
            parts[model].append((labels, out / "verdicts.jsonl"))
        figures["folds"].append(fold)
    figures["pooled"] = {model: pool(work, p, model) for model, p in parts.items()}
    (work / "heldout_figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    print_table(figures, models)


def print_table(figures: dict, models: tuple[str, ...]) -> None:
    print("set | scorer | level | n | MCC | accuracy | confusion (tp fp tn fn)")
    rows = [(f"fold {f['fold']}", f) for f in figures["folds"]] + [("pooled", figures["pooled"])]
    for name, entry in rows:
        for model in models:
            for level in ("drive", "window"):
                m = entry[model][level]
                confusion = " ".join(str(m.get(k)) for k in ("tp", "fp", "tn", "fn"))
                print(
                    f"{name} | {model} | {level} | {m.get('n')} "
                    f"| {m.get('mcc', float('nan')):.3f} | {m.get('accuracy', float('nan')):.3f} | {confusion}"
                )


if __name__ == "__main__":
    main()

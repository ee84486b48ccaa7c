"""Model commands: ``roadstream train scorer|detector`` and ``roadstream classify``.

Heavy imports (torch, ultralytics) happen inside the commands, so the CLI starts fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from stream.errors import RoadstreamError

DEFAULT_FOOTAGE = "../shared/footage"
DEFAULT_CONES = "../shared/labelled/cones"
DEFAULT_OUT = "stages/models"


def register(cli: click.Group) -> None:
    """Add the ``train`` group and the ``classify`` command to the root CLI."""
    cli.add_command(train)
    cli.add_command(classify)


def _console_log():
    from rich.console import Console

    console = Console(stderr=True)
    return lambda line: console.log(line)


@click.group()
def train() -> None:
    """Train roadstream's models from the shared data."""


@train.command("scorer")
@click.option(
    "--footage", default=DEFAULT_FOOTAGE, show_default=True, help="folder with MANIFEST.tsv and clips"
)
@click.option("--out", default=DEFAULT_OUT, show_default=True, help="where scorer.pt and its metadata go")
@click.option("--device", default="cpu", show_default=True)
@click.option("--epochs", default=8, show_default=True)
@click.option("--cv-folds", default=4, show_default=True, help="clip-wise folds; 1 skips cross-validation")
@click.option("--sample-fps", default=2.0, show_default=True, help="frames sampled per second of clip")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--workers", default=0, show_default=True, help="data loader processes")
@click.option(
    "--arch",
    default="efficientnet-lite0",
    show_default=True,
    type=click.Choice(["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]),
)
def train_scorer(**options) -> None:
    """Fine-tune the roadwork frame scorer (EfficientNet-Lite) on footage clips only.

    `roadstream train heldout` trains on every labelled source instead, held out by source.
    """
    from stages.train import scorer

    settings = scorer.ScorerTrainSettings(**options)
    try:
        metadata = scorer.run(settings, log=_console_log())
    except RoadstreamError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(metadata["validation"]["summary"], indent=2))


@train.command("detector")
@click.option("--cones", default=DEFAULT_CONES, show_default=True, help="YOLO data folder with data.yaml")
@click.option(
    "--out", default=DEFAULT_OUT, show_default=True, help="where cones_yolo11n.pt and its metadata go"
)
@click.option(
    "--settings",
    "settings_file",
    default=None,
    help="training yaml [default: stages/models/cones_train.yaml]",
)
@click.option("--device", default=None, help="overrides the settings file")
@click.option("--epochs", type=int, default=None, help="overrides the settings file")
@click.option("--imgsz", type=int, default=None)
@click.option("--batch", type=int, default=None)
@click.option("--workers", type=int, default=None)
@click.option("--time", type=float, default=None, help="hours; caps training, overriding --epochs")
def train_detector(cones, out, settings_file, **overrides) -> None:
    """Train the cone detector (YOLO nano from yolo11n.yaml) with ultralytics."""
    from stages.train import detector

    settings = detector.load_settings(settings_file or detector.SETTINGS_FILE, **overrides)
    try:
        metadata = detector.train(cones, out, settings, log=_console_log())
    except RoadstreamError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(metadata["test"]))


@train.command("pack")
@click.option("--shared", default="../shared", show_default=True, help="folder with footage/ and labelled/")
@click.option("--out", default=".devdata/pack", show_default=True, help="the pack folder")
@click.option("--long-side", default=416, show_default=True, help="images larger than this are shrunk (pixels)")
@click.option("--quality", default=80, show_default=True, help="JPEG quality of the copies")
@click.option("--fps", default=2.0, show_default=True, help="frames sampled per second of footage")
def train_pack(shared, out, long_side, quality, fps) -> None:
    """Gather every labelled source into one pack, each item with its source (for held-out training)."""
    from stages.train.sources import build_pack

    try:
        items = build_pack(shared, out, long_side=long_side, quality=quality, fps=fps, log=_console_log())
    except RoadstreamError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{len(items)} items from {len({i.source for i in items})} sources in {out}")


@train.command("heldout")
@click.option("--pack", default=".devdata/pack", show_default=True, help="a pack from `roadstream train pack`")
@click.option("--out", default=".devdata/heldout", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--folds", default=3, show_default=True, help="source folds")
@click.option("--archs", default="efficientnet-lite0", show_default=True, help="comma-separated Lite sizes")
@click.option("--epochs", default=8, show_default=True, help="scorer epochs")
@click.option("--synthetic", default=1500, show_default=True, help="copy-paste frames to make")
@click.option("--det-epochs", default=40, show_default=True)
@click.option("--det-imgsz", default=416, show_default=True)
@click.option("--detector", default="", help="fixed detector weights instead of training fold detectors")
@click.option("--workers", default=0, show_default=True, help="data loader processes")
def train_heldout(archs, **options) -> None:
    """Train scorer, detector and the combined rule with sources held out whole (slow on a CPU)."""
    from stages.train.heldout import HeldoutSettings, run

    try:
        settings = HeldoutSettings(archs=archs.split(","), det_workers=options["workers"], **options)
        result = run(settings, log=_console_log())
    except RoadstreamError as exc:
        raise click.ClickException(str(exc)) from exc
    pooled = {k: {m: v["pooled"][m] for m in ("mcc", "roc_auc")} for k, v in result["figures"].items()}
    click.echo(json.dumps({"out": settings.out, "pooled": pooled}, indent=2))


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="IMAGE|VIDEO|FOLDER…")
@click.option("--weights", default=None, help="scorer weights [default: the shipped stages/models/scorer.pt]")
@click.option(
    "--detector",
    default=None,
    help="detector weights [default: the shipped stages/models/cones_yolo11n.pt]; '' for none",
)
@click.option("--rule", default=None, help="combination rule [default: the shipped stages/models/classify.json]")
@click.option("--device", default="cpu", show_default=True)
@click.option("--every", "every_s", type=float, default=1.0, show_default=True, help="seconds between sampled video frames")
@click.option("--json", "as_json", is_flag=True, help="one JSON array on stdout")
def classify(inputs, weights, detector, rule, device, every_s, as_json) -> None:
    """Print each image's roadwork probability (> 0.5 means roadwork) and the objects found.

    Takes image files, video files (a frame every --every seconds) and folders of them.
    The probability combines the frame scorer and the detector by the rule fitted on
    held-out sources (stages/models/README.md); without a detector it is the scorer's.
    """
    from stages.classify import DEFAULT_DETECTOR, DEFAULT_RULE, FrameClassifier, expand_inputs, pictures
    from stages.scorer import DEFAULT_WEIGHTS, read_image

    detector = DEFAULT_DETECTOR if detector is None else detector
    rule = DEFAULT_RULE if rule is None else rule
    try:
        files = expand_inputs(inputs)
        classifier = FrameClassifier.load(weights or DEFAULT_WEIGHTS, detector, rule, device)
    except RoadstreamError as exc:
        raise click.ClickException(str(exc)) from exc
    # One bad file must not cost the others: each is read on its own, its error named on
    # stderr (and as an entry in --json), and the exit code says at the end that some failed.
    entries: list = []  # (picture, verdict) or (path, error message), in input order
    batch: list = []  # (index into entries, picture, image tensor)
    failed = 0

    def flush() -> None:
        verdicts = classifier.classify([image for _, _, image in batch])
        for (index, picture, _), v in zip(batch, verdicts, strict=True):
            entries[index] = (picture, v)
        batch.clear()

    for path in files:
        try:
            for picture in pictures([path], every_s):
                image = read_image(picture.pixels if picture.pixels is not None else picture.path)
                entries.append(None)
                batch.append((len(entries) - 1, picture, image))
                if len(batch) == 16:
                    flush()
        except RoadstreamError as exc:
            failed += 1
            entries.append((path, str(exc)))
            click.echo(f"error: {exc}", err=True)
    if batch:
        flush()
    results = [e for e in entries if not isinstance(e[0], Path)]
    if as_json:
        click.echo(json.dumps([_classify_row(*e) if not isinstance(e[0], Path) else {"image": str(e[0]), "error": e[1]}
                               for e in entries]))  # fmt: skip
    else:
        _classify_table(results)
    if failed:
        click.echo(f"{failed} of {len(files)} file{'s' * (len(files) != 1)} could not be classified", err=True)
        sys.exit(1)


def _classify_row(picture, v) -> dict:
    row = {
        "image": str(picture.path),
        "roadwork_probability": round(v.roadwork_probability, 6),
        "roadwork": v.roadwork_probability > 0.5,
        "scorer_probability": round(v.scorer_probability, 6),
        "objects": [{"type": t, "confidence": c, "box": b} for t, c, b in v.objects],
    }
    if picture.t is not None:
        row["video_time_s"] = picture.t
    return row


def _classify_table(results) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{len(results)} pictures")
    for name in ("roadwork", "prob", "scorer", "objects", "image"):
        table.add_column(name, justify="right" if name in ("prob", "scorer") else "left", overflow="fold")
    for picture, v in results:
        counts: dict[str, int] = {}
        for kind, _, _ in v.objects:
            counts[kind] = counts.get(kind, 0) + 1
        objects = ", ".join(f"{k}×{n}" for k, n in sorted(counts.items())) or "-"
        flag = "[red]ROADWORK[/red]" if v.roadwork_probability > 0.5 else "-"
        table.add_row(flag, f"{v.roadwork_probability:.3f}", f"{v.scorer_probability:.3f}", objects, escape(picture.name))
    Console().print(table)

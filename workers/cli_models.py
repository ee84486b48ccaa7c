"""Model commands: ``roadstream train scorer|detector`` and ``roadstream classify``.

Heavy imports (torch, ultralytics) happen inside the commands, so the CLI starts fast.
"""

from __future__ import annotations

import json
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
def train_scorer(**options) -> None:
    """Fine-tune the roadwork frame scorer (EfficientNet-Lite0) on footage clips."""
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


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--weights", default=None, help="scorer weights [default: the shipped stages/models/scorer.pt]")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="one JSON array on stdout")
def classify(images, weights, device, as_json) -> None:
    """Print each image's roadwork probability (> 0.5 means roadwork)."""
    from stages.scorer import DEFAULT_WEIGHTS, RoadworkScorer

    try:
        scorer = RoadworkScorer.load(weights or DEFAULT_WEIGHTS, device)
        probs = scorer.score_images(list(images))
    except RoadstreamError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        rows = [
            {"image": str(p), "roadwork_probability": round(q, 6), "roadwork": q > 0.5}
            for p, q in zip(images, probs)
        ]
        click.echo(json.dumps(rows))
        return
    for path, prob in zip(images, probs):
        click.echo(f"{prob:.4f}\t{path}")

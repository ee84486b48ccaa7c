"""``roadstream learn-questions``: VERA's verbalized learning of the guiding questions.

The labels file is JSON lines, paths relative to the file::

    {"drive": "d1", "label": true}                                    # a drive-level label
    {"drive": "d1", "id": "d1/front/0", "images": ["a.jpg", "b.jpg"]}  # inherits it
    {"id": "s7", "label": false, "images": ["c.jpg"], "camera": "back"}  # its own label

Heavy imports (torch, transformers) happen inside the command.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import click

from stream.errors import InputError, RoadstreamError


def read_labels(path: Path) -> list[Any]:
    """Labelled segments from a labels file (see the module docstring).

    Raises:
        InputError: a line is not JSON, names an image that does not exist, or has no
            label of its own or of its drive; the message names the file and line.
    """
    from stages.vera import LabelledSegment
    from stages.vlm.base import VlmImage

    rows = _rows(path)
    drives = {r["drive"]: bool(r["label"]) for _, r in rows if "images" not in r and "drive" in r and "label" in r}
    items = []
    for number, row in rows:
        if "images" not in row:
            continue
        label = row.get("label", drives.get(row.get("drive", "")))
        if label is None:
            message = f"{path}:{number}: segment has no label and its drive {row.get('drive')!r} has none"
            raise InputError(message)
        images = tuple(VlmImage(_read_image(path, number, name), row.get("camera")) for name in row["images"])
        items.append(LabelledSegment(str(row.get("id", f"line{number}")), images, bool(label)))
    if not items:
        message = f"{path}: no labelled segments (lines with an 'images' list)"
        raise InputError(message)
    return items


def _rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        message = f"{path}: cannot be read: {exc.strerror or exc}"
        raise InputError(message) from exc
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            message = f"{path}:{number}: not JSON: {exc}"
            raise InputError(message) from exc
        if not isinstance(row, dict):
            message = f"{path}:{number}: expected a JSON object"
            raise InputError(message)
        rows.append((number, row))
    return rows


def _read_image(labels: Path, number: int, name: str) -> bytes:
    image = (labels.parent / name).resolve()
    try:
        return image.read_bytes()
    except OSError as exc:
        message = f"{labels}:{number}: image {image}: {exc.strerror or exc}"
        raise InputError(message) from exc


async def _learn(backend: Any, items: list[Any], options: dict[str, Any], progress: Any) -> Any:
    from stages.vera import learn_questions, split_train_val

    train, val = split_train_val(items, options["val_fraction"], options["seed"])
    task = progress.add_task("learning questions", total=None)

    def report(step: Any, total: int) -> None:
        progress.update(task, total=total, completed=step.step)
        state = "new set" if step.accepted else "kept set"
        progress.console.print(
            f"step {step.step}/{total}: train acc {step.train_accuracy:.2f}, val acc {step.val_accuracy:.2f}, "
            f"{state}{' (best)' if step.best else ''}"
        )

    try:
        return await learn_questions(
            backend,
            train,
            val,
            epochs=options["epochs"],
            batch_size=options["batch_size"],
            max_images=options["max_images"],
            seed=options["seed"],
            progress=report,
        )
    finally:
        await backend.close()


def register(cli: click.Group) -> None:
    """Add ``learn-questions`` to the CLI."""

    @cli.command("learn-questions")
    @click.option("--labels", "labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
    @click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("questions.json"))
    @click.option("--epochs", type=int, default=1, show_default=True)
    @click.option("--batch-size", type=int, default=8, show_default=True, help="Segments per optimizer step.")
    @click.option("--val-fraction", type=float, default=0.3, show_default=True)
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--backend", default=None, help="VLM backend [env: ROADSTREAM_VLM__BACKEND]")
    @click.option("--model", default=None, help="VLM model [env: ROADSTREAM_VLM__MODEL]")
    @click.pass_context
    def learn_questions_command(ctx: click.Context, labels: Path, out: Path, **options: Any) -> None:
        """Learn VERA guiding questions from labelled segments; save the best set to --out."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from stages.vlm.base import make_backend
        from workers.cli import settings_from

        settings = settings_from(ctx, uses_redis=False, vlm={"backend": options.pop("backend"), "model": options.pop("model")})
        options["max_images"] = settings.vlm.max_images
        try:
            items = read_labels(labels)
            backend = make_backend(settings.vlm)
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            with Progress(*columns) as progress:
                result = asyncio.run(_learn(backend, items, options, progress))
        except RoadstreamError as exc:
            raise click.ClickException(str(exc)) from exc
        result.best.save(out)
        click.echo(json.dumps({"out": str(out), "id": result.best.id, "val_accuracy": result.best.accuracy,
                               "questions": list(result.best.questions), "steps": len(result.history)}))

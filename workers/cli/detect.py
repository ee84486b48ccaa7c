"""Options of ``roadstream worker detect``: ``--model --device --allow-random-weights --batch-size --max-wait-ms``.

``overrides`` maps them into settings overrides (``load_settings(**overrides(...))``);
``register`` adds ``--model`` and ``--device`` to the generic ``worker`` command (which
already has ``--batch-size`` and ``--max-wait-ms``) and routes them into the ``detect``
section. Nothing heavy is imported here: the model loads when the worker starts.
"""

from __future__ import annotations

import functools
from typing import Any

import click

#: The options this module adds to ``roadstream worker``.
DETECT_OPTIONS = (
    click.Option(
        ["--model"],
        default=None,
        metavar="PATH|NAME|YAML",
        help="Detector: a .pt file, an ultralytics model name, or a model yaml (detect only) "
        "[env: ROADSTREAM_DETECT__MODEL]",
    ),
    click.Option(
        ["--device"],
        default=None,
        metavar="DEVICE",
        help="cpu, cuda or cuda:N (detect only) [env: ROADSTREAM_DETECT__DEVICE]",
    ),
    click.Option(
        ["--allow-random-weights"],
        is_flag=True,
        default=None,
        help="Accept a detector built from a yaml (random weights: tests, benchmarks) "
        "[env: ROADSTREAM_DETECT__ALLOW_RANDOM_WEIGHTS]",
    ),
)


def overrides(
    model: str | None = None,
    device: str | None = None,
    allow_random_weights: bool | None = None,
    batch_size: int | None = None,
    max_wait_ms: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Settings overrides for the detect worker's options; options left out stay unset.

    Returns:
        Nested overrides for ``stream.settings.load_settings``, e.g.
        ``{"detect": {"model": "yolo11s.pt"}, "worker": {"batch_size": 64}}``.
    """
    detect = {"model": model, "device": device, "allow_random_weights": allow_random_weights or None}
    worker = {"batch_size": batch_size, "max_wait_ms": max_wait_ms}
    tree = {"detect": _given(detect), "worker": _given(worker)}
    return {section: values for section, values in tree.items() if values}


def _given(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def register(cli: click.Group) -> None:
    """Add ``--model``, ``--device`` and ``--allow-random-weights`` to ``roadstream worker`` (``worker detect``)."""
    command = cli.commands.get("worker")
    if command is None or any(p.name == "model" for p in command.params):
        return
    command.params.extend(DETECT_OPTIONS)
    command.callback = _route(command.callback)


def _route(callback: Any) -> Any:
    """Wrap the worker command so that detect options become ``--set detect.…`` overrides."""

    @functools.wraps(callback)
    def wrapper(*args: Any, model: str | None = None, device: str | None = None,
                allow_random_weights: bool | None = None, **kwargs: Any) -> Any:  # fmt: skip
        detect = overrides(model=model, device=device, allow_random_weights=allow_random_weights).get("detect", {})
        if detect:
            if kwargs.get("stage") != "detect":
                message = "--model, --device and --allow-random-weights apply to the detect stage only"
                raise click.UsageError(message)
            root = click.get_current_context().find_root().params
            pairs = tuple(f"detect.{key}={value}" for key, value in detect.items())
            root["set_"] = tuple(root.get("set_") or ()) + pairs
        return callback(*args, **kwargs)

    return wrapper

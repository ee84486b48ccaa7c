"""The detector's weights: find a model file without downloading it, read the class names
of the metadata beside it, and load it by ultralytics' own loader (safely: an allow-list of
model classes, never an arbitrary pickle)."""

from __future__ import annotations

import json
from pathlib import Path

from stream.errors import ModelError


def resolve_weights(name: str) -> str:
    """Find a model file without downloading it.

    A yaml is left to ultralytics (its own model yamls ship with it); a ``.pt`` path or a
    bare model name (``yolo11n``) must exist here or in ultralytics' weights folder.

    Raises:
        ModelError: the file is not there.
    """
    if name.endswith((".yaml", ".yml")):
        return name
    path = Path(name if Path(name).suffix else f"{name}.pt")
    if path.is_file():
        return str(path)
    from ultralytics.utils import SETTINGS

    cached = Path(SETTINGS["weights_dir"]) / path.name
    if not path.is_absolute() and cached.is_file():
        return str(cached)
    message = f"model file {name}: not found (looked in {path.resolve().parent} and {cached.parent}; nothing is downloaded at run time)"
    raise ModelError(message)


def metadata_labels(name: str, labels: dict[int, str]) -> dict[int, str]:
    """The class names of the metadata file beside the weights, when it names them.

    Weights trained with ``single_cls`` call their one class ``item``; the ``.json`` that
    ``roadstream train detector`` writes beside them (``model.classes``) says what it is
    (``cone``). Names from a file that lists another number of classes are ignored.
    """
    if name.endswith((".yaml", ".yml")):
        return labels
    meta = Path(resolve_weights(name)).with_suffix(".json")
    try:
        classes = json.loads(meta.read_text()).get("model", {}).get("classes")
    except (OSError, ValueError, AttributeError):
        return labels
    if not isinstance(classes, list) or len(classes) != len(labels):
        return labels
    return {i: str(c) for i, c in zip(sorted(labels), classes, strict=True)}


def _safe_check(path: str) -> None:
    """Unpickle a ``.pt`` the safe way first when ultralytics was imported before its safe
    loading was switched on (by something that imported it ahead of this module): a file
    that holds anything but the allow-listed model classes raises here, never runs."""
    from ultralytics.nn import tasks

    if path.endswith(".pt") and not tasks.SAFE_LOAD:
        tasks.torch_safe_load(path, safe_only=True)


def load_yolo(name: str):  # noqa: ANN201 - ultralytics.YOLO, imported lazily
    """Load a YOLO detector by ultralytics' own loader.

    Raises:
        ModelError: missing, unreadable, or not a detection model; the message names the file.
    """
    from ultralytics import YOLO

    path = resolve_weights(name)
    try:
        _safe_check(path)
        yolo = YOLO(path, verbose=False)
    except Exception as exc:  # ultralytics raises many unrelated types for a bad file
        message = f"model file {name}: does not load as an ultralytics model ({type(exc).__name__}: {exc})"
        raise ModelError(message) from exc
    if yolo.task != "detect" or not hasattr(yolo.model, "names"):
        message = f"model file {name}: is a {yolo.task!r} model, not a detector"
        raise ModelError(message)
    return yolo

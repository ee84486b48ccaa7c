"""The models shipped in the package (``stages/models/``) and the ``shipped`` setting.

``detect.model`` and ``detect.scorer`` default to ``shipped`` (``stream.settings.SHIPPED``);
``resolve`` turns that into the files' paths, found in the installed package (never the
current folder). Nothing heavy is imported here.
"""

from __future__ import annotations

from pathlib import Path

from stream.settings import SHIPPED, DetectSettings

MODELS_DIR = Path(__file__).parent / "models"
#: The cone detector and the roadwork frame scorer (``stages/models/README.md``).
DETECTOR = MODELS_DIR / "cones_yolo11n.pt"
SCORER = MODELS_DIR / "scorer.pt"


def model_path(name: str, shipped: Path) -> str:
    """``name``, or the shipped file's path when ``name`` is ``shipped``."""
    return str(shipped) if name == SHIPPED else name


def resolve(detect: DetectSettings) -> DetectSettings:
    """The detect settings with ``shipped`` replaced by the shipped files' paths."""
    update = {"model": model_path(detect.model, DETECTOR), "scorer": model_path(detect.scorer, SCORER)}
    if update == {"model": detect.model, "scorer": detect.scorer}:
        return detect
    return detect.model_copy(update=update)


def random_weights(model: str) -> bool:
    """Whether the detector ``model`` is built from a yaml (random weights)."""
    return model.endswith((".yaml", ".yml"))

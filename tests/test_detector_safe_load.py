"""The detector's ``.pt`` is unpickled with ultralytics' safe loading: code in it never runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages.detect import load_yolo
from stream.errors import ModelError


class _Payload:
    """Pickles as a call to ``os.system``: what a booby-trapped checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def trapped(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "ran"
    path = tmp_path / "detector.pt"
    torch.save({"model": _Payload(marker), "train_args": {}}, path)
    return path, marker


def test_a_checkpoint_carrying_code_is_refused_without_running_it(trapped) -> None:
    # Given a .pt whose pickle calls os.system
    path, marker = trapped
    # When it is loaded as the detector; Then it is refused, and the command never ran
    with pytest.raises(ModelError, match="does not load as an ultralytics model"):
        load_yolo(str(path))
    assert not marker.exists()


def test_a_fresh_worker_process_loads_with_ultralytics_safe_loading_on(trapped) -> None:
    # Given a new process that imports the detect stage first (as a worker does)
    path, marker = trapped
    code = ("import stages.detect as d, ultralytics.nn.tasks as t; assert t.SAFE_LOAD\n"
            f"try:\n    d.load_yolo({str(path)!r})\nexcept Exception as e:\n    print(type(e).__name__)")  # fmt: skip
    # When it loads the trapped checkpoint
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    # Then safe loading was on from the start, the file was refused, nothing ran
    assert done.stdout.strip() == "ModelError" and not marker.exists()


def test_the_shipped_detector_loads_safely() -> None:
    yolo = load_yolo(str(Path(__file__).parents[1] / "stages" / "models" / "cones_yolo11n.pt"))
    assert yolo.task == "detect"

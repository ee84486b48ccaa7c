"""Every way of running the detect stage uses the shipped models unless told otherwise.

A detector built from a model yaml has random weights: the stage refuses one unless a test
or benchmark asks for it (``detect.allow_random_weights`` / ``--allow-random-weights``),
and the worker says at start which model, classes, device and scorer it loaded.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from brokers.memory import MemoryBlobStore
from stages import shipped
from stages.detect import Detector
from stream.errors import ModelError
from stream.settings import DetectSettings, load_settings
from workers.cli import _register_commands, cli
from workers.handlers.detect import DetectHandler
from workers.logs import STARTUP_LOGGER


def test_a_bare_worker_s_settings_name_the_shipped_detector_and_scorer(tmp_path, monkeypatch):
    # Given no model named anywhere, from a folder far from the package
    monkeypatch.chdir(tmp_path)
    # When the detect settings are resolved
    detect = shipped.resolve(load_settings(environ={}).detect)
    # Then they are the package's files, which exist
    assert Path(detect.model) == shipped.DETECTOR and shipped.DETECTOR.is_file()
    assert Path(detect.scorer) == shipped.SCORER and shipped.SCORER.is_file()


def test_a_detector_built_from_a_yaml_is_refused_unless_allowed():
    # Given a yaml detector (random weights) / When built without the permission
    with pytest.raises(ModelError, match=r"yolo11n\.yaml.*random weights.*--allow-random-weights"):
        Detector(DetectSettings(model="yolo11n.yaml", device="cpu"))
    # Then with it, it loads
    made = Detector(DetectSettings(model="yolo11n.yaml", device="cpu", allow_random_weights=True))
    assert made.name == "yolo11n.yaml"


async def test_the_detect_worker_loads_the_shipped_models_and_says_so(caplog):
    # Given a detect handler with default settings (no model named)
    handler = DetectHandler(load_settings(environ={}, detect={"device": "cpu"}), MemoryBlobStore())
    # When it starts
    with caplog.at_level(logging.INFO, logger=STARTUP_LOGGER):
        await handler.start()
    # Then it runs the shipped detector and scorer
    assert Path(handler.detector.settings.model) == shipped.DETECTOR
    assert handler.scorer is not None and Path(handler.settings.detect.scorer) == shipped.SCORER
    # And it logged the model, its classes, the device and the scorer in one line
    (line,) = [r.getMessage() for r in caplog.records if r.name == STARTUP_LOGGER]
    assert str(shipped.DETECTOR) in line and "classes cone" in line and "on cpu" in line
    assert str(shipped.SCORER) in line


def test_worker_detect_with_a_yaml_model_stops_with_one_line_unless_allowed():
    # Given the real CLI
    _register_commands()
    args = ["--set", "detect.scorer=", "worker", "detect", "--redis", "memory://shipped-test", "--burst", "--device", "cpu", "--model", "yolo11n.yaml"]
    # When a yaml detector is asked for without permission
    refused = CliRunner().invoke(cli, args)
    # Then the worker stops at start with one line that says how to allow it
    assert refused.exit_code == 1, refused.output
    assert "random weights" in refused.output and "--allow-random-weights" in refused.output
    assert "Traceback" not in refused.output
    # When the permission is given / Then it starts and drains the (empty) input
    allowed = CliRunner().invoke(cli, [*args, "--allow-random-weights"])
    assert allowed.exit_code == 0, allowed.output


async def test_a_stopped_detect_handler_drops_queued_launches_and_starts_again():
    # Given a started handler on the CPU with a small yaml detector (allowed)
    settings = load_settings(environ={}, detect={"model": "yolo11n.yaml", "allow_random_weights": True, "scorer": "",
                                                 "device": "cpu", "imgsz": 64})  # fmt: skip
    detector = Detector(settings.detect)
    handler = DetectHandler(settings, MemoryBlobStore(), detector=detector)
    await handler.start()
    # When it stops / Then a launch still queued is refused instead of run
    await handler.stop()
    with pytest.raises(asyncio.CancelledError):
        handler._launch_now([])
    # When it starts again / Then launches run on a fresh pool
    await handler.start()
    assert await handler._launcher(lambda: "ran") == "ran"

"""``roadstream run`` through the CLI: private Redis, the embedded broker, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from fixtures.teslacam import THREE, ClipSpec, make_drive, not_a_video, zero_byte
from stages.report import read_verdicts
from workers import run as run_module
from workers.cli import cli
from workers.cli_run import register

FAST = ["--set", "detect.imgsz=160", "--set", "ingest.sample_fps=2", "--set", "detect.half=false"]
SPEC = ClipSpec(duration_s=2.0)


def invoke(args: list[str]):
    if "run" not in cli.commands:
        register(cli)
    return CliRunner(env={"COLUMNS": "200", "ROADSTREAM_REDIS_URL": None}).invoke(cli, [*FAST, "run", *args])


def drive_windows(out: Path) -> list[tuple[str, int]]:
    return [(v.drive_id, v.window) for v in read_verdicts(out / "verdicts.jsonl")]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on the PATH")
def test_run_starts_a_private_redis_and_writes_the_output_folder(tmp_path):
    # Given a three-camera drive of two minutes
    make_drive(tmp_path / "footage", cameras=THREE, minutes=2, spec=SPEC)
    # When run without --redis
    result = invoke([str(tmp_path / "footage"), "--out", str(tmp_path / "out"), "--timeout", "120"])
    # Then it ran on a private server's socket, one verdict per window, with a summary
    assert result.exit_code == 0, result.output
    assert "unix://" in result.output and "vera and vlm are off" in result.output
    windows = drive_windows(tmp_path / "out")
    assert windows and len(windows) == len(set(windows))
    assert "summary" in result.output
    assert json.loads((tmp_path / "out" / "drives.geojson").read_text())["type"] == "FeatureCollection"
    assert "<svg" in (tmp_path / "out" / "report.html").read_text()


def test_run_on_the_embedded_broker_survives_broken_and_one_camera_drives(tmp_path, monkeypatch):
    # Given no redis-server, a one-camera drive, and a drive whose clips are all broken
    monkeypatch.setattr(run_module.shutil, "which", lambda _name: None)
    footage = tmp_path / "footage"
    make_drive(footage / "good", cameras=("front",), minutes=1, spec=SPEC, layout="flat")
    broken = make_drive(footage / "bad", start="2024-05-03_08-00-00", cameras=THREE, minutes=1, spec=SPEC, layout="flat")
    zero_byte(broken.clip(0, "front"))
    not_a_video(broken.clip(0, "left_repeater"))
    not_a_video(broken.clip(0, "right_repeater"))
    # When run
    result = invoke([str(footage), "--out", str(tmp_path / "out"), "--timeout", "120"])
    # Then the good drive has verdicts, the broken one is reported, and no traceback shows
    assert result.exit_code == 0, result.output
    assert "memory://" in result.output and "Traceback" not in result.output
    assert {d for d, _ in drive_windows(tmp_path / "out")}
    assert "empty file" in result.output and "not a readable video" in result.output


def test_an_empty_folder_is_refused_with_exit_code_2(tmp_path):
    # Given an empty folder / When run / Then a clear message and exit code 2
    (tmp_path / "empty").mkdir()
    result = invoke([str(tmp_path / "empty")])
    assert result.exit_code == 2
    assert "no TeslaCam footage" in result.output and "Traceback" not in result.output

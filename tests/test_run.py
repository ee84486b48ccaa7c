"""``roadstream run`` through the CLI: private Redis, the embedded broker, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from fixtures.teslacam import THREE, ClipSpec, header_only, make_drive, not_a_video, zero_byte
from stages.report import read_verdicts
from workers import run as run_module
from workers.cli import cli
from workers.cli.run import register

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
    # labelled with the bounds its server was started with (private_broker's record)
    assert "private redis-server, memory bound" in result.output and "no persistence" in result.output
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


def _summaries(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "drives.jsonl").read_text().splitlines()]


def test_run_names_a_header_only_clip_and_an_absent_camera_everywhere(tmp_path):
    # Given two minutes of three cameras: minute 1's left_repeater clip is a header with no
    # frame, and minute 1 has no right_repeater clip
    drive = make_drive(tmp_path / "footage", cameras=THREE, minutes=2, spec=SPEC, missing={(1, "right_repeater")})
    empty = header_only(drive.clip(1, "left_repeater"))
    # When run
    out = tmp_path / "out"
    result = invoke([str(tmp_path / "footage"), "--out", str(out), "--timeout", "180"])
    assert result.exit_code == 0, result.output
    # Then the printed problems, the report and the drive summary name the file and the
    # absent camera's minute in words
    said = f"{empty}: holds no frames"
    absent = f"right_repeater: no clip in 1 of 2 minute(s) ({drive.minutes[1]})"
    printed = " ".join(result.output.split())  # rich wraps long lines
    assert said in printed and absent in printed
    report = (out / "report.html").read_text()
    assert said in report and absent in report
    (summary,) = _summaries(out)
    assert any(p.startswith(said) for p in summary["problems"])
    assert any(p.startswith(absent) for p in summary["problems"])
    assert summary["missing"] == {"left_repeater": [drive.minutes[1]], "right_repeater": [drive.minutes[1]]}
    # and each verdict of minute 1 lists both cameras as missing, those of minute 0 none
    verdicts = read_verdicts(out / "verdicts.jsonl")
    assert {tuple(v.missing_cameras) for v in verdicts if v.t_start >= 60} == {("left_repeater", "right_repeater")}
    assert {tuple(v.missing_cameras) for v in verdicts if v.t_start < 60} == {()}


def test_run_never_publishes_an_unset_gps_fix_as_a_position(tmp_path):
    # Given a saved event (with est_lat/est_lon) whose first minute's telemetry has no GPS
    # fix (latitude/longitude 0, 0) and whose second minute has one
    specs = {(0, c): ClipSpec(duration_s=2.0, gps_fix=False) for c in THREE}
    drive = make_drive(tmp_path / "footage", cameras=THREE, minutes=2, spec=SPEC, specs=specs, layout="saved")
    # When run
    out = tmp_path / "out"
    result = invoke([str(tmp_path / "footage"), "--out", str(out), "--timeout", "180"])
    assert result.exit_code == 0, result.output
    verdicts = read_verdicts(out / "verdicts.jsonl")
    # Then minute 0's windows carry the event's estimate, marked so; minute 1's the fixes
    first = [v.gps for v in verdicts if v.t_start < 60]
    second = [v.gps for v in verdicts if v.t_start >= 60]
    assert first and all((g.lat, g.lon, g.estimated) == (30.2226, -97.6188, True) for g in first)
    assert second and all(abs(g.lat - 30.2226) < 0.01 and not g.estimated for g in second)
    # and no position anywhere is 0, 0; the run names the clips without a fix
    assert "[0.0, 0.0]" not in (out / "drives.geojson").read_text().replace("\n", "").replace(" ", "")
    printed = " ".join(result.output.split())
    assert f"{drive.clip(0, 'front')}: telemetry of" in printed and "has no GPS fix" in printed

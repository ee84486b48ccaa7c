"""``roadstream run`` with worker processes gives the verdicts of its single-process mode."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from stages.report import read_verdicts
from workers.cli import cli
from workers.cli.run import register

SAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "sample"
#: The shipped models on the CPU take seconds a frame at their own size: fewer, smaller
#: frames keep these runs short (what is compared is the two modes, not the models).
FAST = ["--set", "detect.imgsz=320", "--set", "ingest.sample_fps=2"]


def _run(out: Path, workers: str):
    if "run" not in cli.commands:
        register(cli)
    runner = CliRunner(env={"COLUMNS": "200", "ROADSTREAM_REDIS_URL": None})
    return runner.invoke(cli, [*FAST, "run", str(SAMPLE), "--out", str(out), "--timeout", "300", "--workers", workers])


def _comparable(out: Path) -> list[tuple]:
    # Timings differ run to run; batching may change float sums in the last digits.
    return [(v.drive_id, v.window, v.roadwork, round(v.confidence, 4), v.cameras, v.objects, v.frames and len(v.frames))
            for v in read_verdicts(out / "verdicts.jsonl")]  # fmt: skip


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on the PATH")
def test_run_with_worker_processes_gives_the_single_process_verdicts(tmp_path: Path) -> None:
    # Given the sample drive, run in one process
    single = _run(tmp_path / "single", "1")
    assert single.exit_code == 0, single.output
    assert "one process" in single.output
    # When run with two ingest processes (per-camera jobs), a detect and a fuse process
    many = _run(tmp_path / "many", "ingest=2,detect=1,fuse=1")
    # Then it says so and writes the same verdicts
    assert many.exit_code == 0, many.output
    assert "ingest=2 detect=1" in many.output
    verdicts = _comparable(tmp_path / "single")
    assert verdicts and _comparable(tmp_path / "many") == verdicts
    assert any(v[2] for v in verdicts)  # the sample drive has roadwork windows


ROADWORK = Path("/work/shared/footage/roadwork")


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on the PATH")
def test_run_with_a_drive_split_into_spans_gives_the_single_process_verdicts(tmp_path: Path) -> None:
    from fixtures import teslacam as tc

    # Given a drive of three back-to-back 5 s minutes on three cameras: real work-zone
    # clips as content where ../shared/footage is mounted, else the fixture's pictures
    clips = sorted(ROADWORK.glob("*.mp4"))[:3] if ROADWORK.is_dir() else []
    sources = dict(zip(tc.THREE, clips, strict=False)) or None
    spec = tc.ClipSpec(duration_s=5.0, fps=36.0, size=(320, 240))
    tc.make_drive(tmp_path / "footage", minutes=3, cameras=tc.THREE, spec=spec, sources=sources, step_s=5)
    if "run" not in cli.commands:
        register(cli)
    runner = CliRunner(env={"COLUMNS": "200", "ROADSTREAM_REDIS_URL": None})

    def run(out: str, workers: str):
        # Spans of 5 s: each minute of each camera is its own job (9 jobs)
        args = [*FAST, "--set", "ingest.span_s=5", "run", str(tmp_path / "footage"), "--out", str(tmp_path / out),
                "--timeout", "300", "--workers", workers]  # fmt: skip
        return runner.invoke(cli, args)

    # When run in one process (one job for the drive), and with three ingest processes
    # sharing the drive's nine span jobs
    single = run("single", "1")
    assert single.exit_code == 0, single.output
    many = run("many", "ingest=3,detect=1,fuse=1")
    # Then both write the same verdicts over the drive's 15 s
    assert many.exit_code == 0, many.output
    verdicts = _comparable(tmp_path / "single")
    assert len(verdicts) >= 2 and _comparable(tmp_path / "many") == verdicts

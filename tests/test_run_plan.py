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


def _run(out: Path, workers: str):
    if "run" not in cli.commands:
        register(cli)
    runner = CliRunner(env={"COLUMNS": "200", "ROADSTREAM_REDIS_URL": None})
    return runner.invoke(cli, ["run", str(SAMPLE), "--out", str(out), "--timeout", "300", "--workers", workers])


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

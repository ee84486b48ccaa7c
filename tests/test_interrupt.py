"""Ctrl-C and SIGTERM during ``roadstream run``: it stops its workers and its private
Redis, removes its temporary folders, says what it had finished, and exits 130.

Each test runs the real command as a process with its own ``TMPDIR`` and signals it once
it is under way; nothing is timed: the checks are what it printed, its exit code, and
that no folder or process of it is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from redis_servers import REDIS_SERVER

from fixtures.teslacam import ClipSpec, make_drive

ROOT = Path(__file__).parent.parent

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="needs redis-server on the PATH")


def footage(root: Path) -> Path:
    """A short drive and a long one (5,400 frames at 5 a second), one camera each.

    The long one must outlast the signal by far: with 600 frames it once finished between
    the short drive's line and the interrupt taking effect (fresh-clone CI run), and with
    1,800 once more after CPU detection became 1.8x faster (the short drive's line came at
    13 s and the long drive's at 62 s here, unloaded). It is cut short: its length costs
    only the clips' making (4.5 s here).
    """
    make_drive(root, start="2024-05-01_10-00-00", cameras=("front",), minutes=1,
               spec=ClipSpec(duration_s=2.0, fps=10.0), layout="flat")  # fmt: skip
    make_drive(root, start="2024-05-02_09-00-00", cameras=("front",), minutes=36,
               spec=ClipSpec(duration_s=30.0, fps=10.0), layout="flat")  # fmt: skip
    return root


def start_run(tmp_path: Path, *options: str) -> subprocess.Popen:
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROADSTREAM_")}
    env.update(TMPDIR=str(temp), PYTHONPATH=str(ROOT), COLUMNS="100")
    command = [sys.executable, "-m", "workers.cli", "--set", "ingest.long_side=160", "--set", "detect.imgsz=160",
               "run", str(footage(tmp_path / "footage")), "--out", str(tmp_path / "out"), *options]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_until(process: subprocess.Popen, marker: str) -> list[str]:
    lines = []
    for line in process.stdout:
        lines.append(line)
        if marker in line:
            return lines
    pytest.fail("the run ended before printing " + repr(marker) + ":\n" + "".join(lines))


def leftovers(tmp_path: Path) -> tuple[list[str], list[str]]:
    """Folders of the run left in its TMPDIR (torch's own cache aside) and its processes still alive."""
    temp = tmp_path / "tmp"
    folders = sorted(p.name for p in temp.iterdir() if p.name.startswith("roadstream"))
    alive = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(temp) in cmdline:
                alive.append(cmdline)
    return folders, alive


def test_ctrl_c_stops_the_run_says_what_finished_and_cleans_up(tmp_path):
    # Given a run of two drives in one process, the short one finished
    run = start_run(tmp_path, "--workers", "1")
    printed = read_until(run, "finished:")
    first = printed[-1]
    # When Ctrl-C arrives
    run.send_signal(signal.SIGINT)
    rest = run.stdout.read()
    run.wait(timeout=300)  # a guard against a hang, not a timing check
    # Then it exits 130, says it was interrupted and which drive had finished, writes nothing
    assert run.returncode == 130, rest
    assert "interrupted: 1 of 2 drive(s) finished" in rest and "done in" not in rest
    assert "finished: 2024-05-01_10-00-00" in first and "  finished: 2024-05-01_10-00-00" in rest
    assert not (tmp_path / "out").exists()
    # And its private Redis and temporary folder are gone
    assert leftovers(tmp_path) == ([], [])


def test_sigterm_stops_worker_processes_and_the_private_redis(tmp_path):
    # Given a run with worker processes, one drive finished
    run = start_run(tmp_path, "--workers", "ingest=1,detect=1,fuse=1")
    read_until(run, "finished:")
    # When it is sent SIGTERM
    run.send_signal(signal.SIGTERM)
    rest = run.stdout.read()
    run.wait(timeout=300)
    # Then it exits 130 saying so, and leaves no worker, server or folder behind
    assert run.returncode == 130, rest
    assert "interrupted" in rest and "Traceback" not in rest
    assert leftovers(tmp_path) == ([], [])

"""Every command that needs Redis, pointed at a closed port: one line naming the URL, exit 1.

Each runs as a real ``roadstream`` process (``python -m workers.cli``), so a traceback on
stderr would show.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from redis_servers import RedisServers, free_port

ROOT = Path(__file__).parent.parent
SAMPLE = ROOT / "fixtures" / "sample"

#: Every command (and the variants the issue names) that talks to the broker.
COMMANDS = [
    ["status"],
    ["status", "--json"],
    ["status", "--watch"],
    ["submit", str(SAMPLE)],
    ["deadletters", "list"],
    ["deadletters", "show", "1-0"],
    ["deadletters", "requeue", "--all"],
    ["verdicts"],
    ["verdicts", "--follow"],
    ["eval", "--labels", "LABELS"],
    ["worker", "ingest"],
    ["worker", "detect"],
    ["worker", "fuse"],
    ["supervise", "ingest=1", "detect=1", "fuse=1"],
    ["supervise", "--processes", "ingest=1", "fuse=1"],
    ["run", str(SAMPLE), "--out", "OUT"],
]


@pytest.fixture(scope="module")
def closed_url() -> str:
    # A port just freed, with a password that must not be printed.
    return f"redis://user:s3cret@127.0.0.1:{free_port()}/0"


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_closed_port_gives_one_line_naming_the_url_and_exit_1(command, closed_url, tmp_path):
    # Given a command and a Redis URL nothing listens on
    labels = tmp_path / "labels.csv"
    labels.write_text("drive_id,label\nd,1\n")
    args = [str(labels) if a == "LABELS" else str(tmp_path / "out") if a == "OUT" else a for a in command]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROADSTREAM_")}
    env["PYTHONPATH"] = str(ROOT)
    env["ROADSTREAM_WORKER__START_WAIT_S"] = "0"  # workers wait for a late Redis by default
    # When it runs
    done = subprocess.run([sys.executable, "-m", "workers.cli", *args, "--redis", closed_url],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)  # fmt: skip
    # Then it exits 1 with one error line that names the URL (password hidden) and why
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    host = closed_url.split("@")[1]
    assert errors == [f"Error: cannot reach Redis at redis://user:***@{host}: " + errors[0].split(": ", 2)[2]], done.stderr
    assert "connect" in errors[0].lower() and "s3cret" not in done.stderr + done.stdout


@pytest.mark.parametrize("command", [["status"], ["deadletters", "list"], ["submit", str(SAMPLE)]], ids=" ".join)
def test_a_wrong_password_gives_one_line_naming_the_refusal_and_exit_1(command, tmp_path):
    # Given a password-protected server and a command with the wrong password
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROADSTREAM_")}
    env["PYTHONPATH"] = str(ROOT)
    with RedisServers(tmp_path) as servers:
        url = servers.start(password="right-one").url(password="wrong-one")
        # When it runs
        done = subprocess.run([sys.executable, "-m", "workers.cli", *command, "--redis", url],
                              capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)  # fmt: skip
    # Then one line says the credentials were refused (not "cannot reach"), password hidden
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout and "wrong-one" not in done.stderr + done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "refused the credentials" in errors[0], done.stderr

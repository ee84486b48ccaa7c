"""Secrets: a broker URL's password is never printed, and never on a child's command line.

``supervise --processes`` starts its children against a real password-protected
redis-server; the test reads their command lines and environments from ``/proc``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from redis_servers import REDIS_SERVER, RedisServers

from stream.urls import MASK, masked

PASSWORD = "Pa55-w0rd-x9"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"redis://roadstream:{PASSWORD}@127.0.0.1:6380/2", "redis://roadstream:***@127.0.0.1:6380/2"),
        (f"redis://:{PASSWORD}@h/0", "redis://:***@h/0"),
        (f"rediss://u:{PASSWORD}@h:1/0?ssl_ca_certs=%2Fca.pem", "rediss://u:***@h:1/0?ssl_ca_certs=%2Fca.pem"),
        (f"redis://h:6379/0?password={PASSWORD}&db=1", "redis://h:6379/0?password=***&db=1"),
        ("unix:///run/redis.sock?db=3", "unix:///run/redis.sock?db=3"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_a_url_is_shown_with_its_password_masked(url: str, shown: str) -> None:
    assert masked(url) == shown
    assert PASSWORD not in masked(url) and (MASK in shown or "@" not in url and "password" not in url)


@pytest.mark.redis
@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
def test_supervised_worker_processes_get_the_url_in_their_environment_not_argv(tmp_path: Path) -> None:
    # Given a password-protected redis-server, its URL in ROADSTREAM_REDIS_URL only
    with RedisServers(tmp_path) as servers:
        server = servers.start(password=PASSWORD)
        url = server.url()
        env = {**os.environ, "ROADSTREAM_REDIS_URL": url, "ROADSTREAM_NAMESPACE": "sup",
               "ROADSTREAM_WORKER__HEARTBEAT_S": "0.3"}  # fmt: skip
        log = (tmp_path / "supervise.log").open("wb")
        command = [sys.executable, "-m", "workers.cli", "supervise", "ingest=1", "--processes"]
        parent = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            # When it has started its worker, and the worker reached the server
            client = server.client()
            deadline = time.monotonic() + 60
            while not client.keys("sup:health:ingest:*"):
                assert parent.poll() is None and time.monotonic() < deadline, (tmp_path / "supervise.log").read_text()
                time.sleep(0.1)
            children = psutil.Process(parent.pid).children()

            # Then no command line holds the password; the child has the URL in its environment
            assert len(children) == 1
            for process in (psutil.Process(parent.pid), *children):
                assert PASSWORD not in " ".join(process.cmdline())
            assert children[0].environ()["ROADSTREAM_REDIS_URL"] == url
        finally:
            parent.send_signal(signal.SIGTERM)
            parent.wait(timeout=60)
            log.close()
        output = (tmp_path / "supervise.log").read_text()
        assert PASSWORD not in output

"""The health and metrics server listens on loopback unless told otherwise (``worker.metrics_host``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from redis_servers import free_port


@pytest.mark.parametrize(("host", "expected"), [(None, "127.0.0.1"), ("0.0.0.0", "0.0.0.0")])
def test_a_worker_serves_its_probes_on_the_configured_interface(tmp_path: Path, host: str | None, expected: str) -> None:
    # Given a worker (embedded broker) with a metrics port, and a metrics host or none
    port = free_port()
    env = {**os.environ, "ROADSTREAM_WORKER__METRICS_PORT": str(port)}
    if host is not None:
        env["ROADSTREAM_WORKER__METRICS_HOST"] = host
    log = (tmp_path / "worker.log").open("wb")
    command = [sys.executable, "-m", "workers.cli", "worker", "ingest", "--redis", "memory://bind"]
    worker = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # When it serves /live
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/live", timeout=2) as reply:
                    assert reply.status == 200
                    break
            except OSError:
                assert worker.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
                time.sleep(0.1)

        # Then it listens on that interface only
        listening = {c.laddr.ip for c in psutil.Process(worker.pid).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port}  # fmt: skip
        assert listening == {expected}
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
        log.close()

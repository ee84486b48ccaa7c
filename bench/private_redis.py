"""A private ``redis-server`` for the benchmarks: never a server nobody named.

A Redis on 127.0.0.1:6379 may hold somebody's data (the benchmarks write, delete and, in
``hop_bench``, flush keys), so every benchmark uses a server of its own on a free port
unless ``--redis URL`` names one.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import redis

#: The help of every benchmark's ``--redis``.
HELP = "a Redis URL (its keys are written and deleted); default: a private redis-server on a free port"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def redis_server(binary: str | None, url: str | None) -> Iterator[str]:
    """A Redis URL: the one given, or a private ``redis-server`` on a free port (no persistence).

    Raises:
        SystemExit: no URL given and no ``redis-server`` on the PATH.
    """
    if url:
        yield url
        return
    binary = binary or shutil.which("redis-server")
    if not binary:
        message = "no Redis: pass --redis URL or install redis-server"
        raise SystemExit(message)
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        for _ in range(100):
            with contextlib.suppress(redis.exceptions.ConnectionError):
                if redis.Redis.from_url(url).ping():
                    break
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)

"""Workers against a Redis that is not there yet, refuses them, or is out of memory.

Real ``redis-server`` processes (``tests/redis_servers.py``): a worker started before its
server waits for it (with a logged, growing delay) and then works; a wrong password ends
the worker at once with the reason named, no traceback; a server over ``maxmemory`` with
``noeviction`` makes writes fail, which the worker retries (reporting them) until memory
is freed, losing nothing and dead-lettering nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from redis_servers import REDIS_SERVER, RedisServer, RedisServers

from brokers.memory import MemoryBlobStore
from brokers.redis import RedisBroker
from fixtures.relay import RelayHandler, frame
from stream import codec, names
from stream.settings import load_settings
from workers.runtime import Worker

pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed"),
]
NS = "berr"


def worker_process(url: str, log: Path, **env: str) -> subprocess.Popen:
    """``roadstream worker ingest`` on ``url`` (given in the environment), output to ``log``."""
    environ = {**os.environ, "ROADSTREAM_REDIS_URL": url, "ROADSTREAM_NAMESPACE": NS,
               "ROADSTREAM_WORKER__HEARTBEAT_S": "0.3", **env}  # fmt: skip
    with log.open("wb") as sink:
        return subprocess.Popen([sys.executable, "-m", "workers.cli", "worker", "ingest"], env=environ,
                                stdout=sink, stderr=subprocess.STDOUT)  # fmt: skip


def wait_for(check, what: str, log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what}:\n{log.read_text(errors='replace')}"
        time.sleep(0.1)


def test_a_worker_started_before_redis_waits_for_it_then_works(tmp_path: Path) -> None:
    # Given a worker started against a server that is not up yet
    server = RedisServer(tmp_path / "redis")
    log = tmp_path / "worker.log"
    worker = worker_process(server.url(), log)
    try:
        wait_for(lambda: "broker not reachable at start" in log.read_text(), "no wait logged", log)
        assert worker.poll() is None

        # When the server comes up
        server.start()

        # Then the worker reaches it: its health record appears
        client = server.client()
        wait_for(lambda: bool(client.keys(f"{NS}:health:ingest:*")), "the worker never reached redis", log)
        assert worker.poll() is None
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        server.kill()


def test_a_worker_with_a_wrong_password_stops_at_once_naming_the_authentication_failure(tmp_path: Path) -> None:
    # Given a password-protected server and a worker with the wrong password
    with RedisServers(tmp_path) as servers:
        server = servers.start(password="right-one")
        log = tmp_path / "worker.log"
        worker = worker_process(server.url(password="wrong-one"), log)

        # When it starts: Then it exits non-zero, naming the failure, without a traceback
        assert worker.wait(timeout=60) == 1
        output = log.read_text()
        assert "authentication failed" in output and "unreachable" not in output
        assert "Traceback" not in output and "wrong-one" not in output


async def test_writes_refused_for_memory_are_retried_until_memory_is_freed(tmp_path: Path, caplog) -> None:
    # Given 20 frames on a relay stage's input, then the server's memory capped below use
    with RedisServers(tmp_path) as servers:
        server = servers.start(extra_config=["maxmemory-policy noeviction"])
        client = server.client()
        broker = RedisBroker(url=server.url(), namespace=NS)
        stream = names.stream_name("bench-in", ns=NS)
        for seq in range(20):
            await broker.publish(stream, codec.encode(frame("d1", seq)))
        client.config_set("maxmemory", 1)
        worker_settings = {"batch_size": 8, "max_wait_ms": 20, "heartbeat_s": 0.1, "grace_s": 2}
        settings = load_settings(environ={}, namespace=NS, worker=worker_settings)
        worker = Worker(RelayHandler(), broker, MemoryBlobStore(), settings, consumer="w1")
        caplog.set_level(logging.WARNING, logger="roadstream.worker")
        task = asyncio.create_task(worker.run())
        deadline = time.monotonic() + 60  # a bound that fails the test instead of hanging it
        try:
            # When its writes have been refused (out of memory) for a while
            while "out of memory" not in caplog.text:
                assert not task.done() and time.monotonic() < deadline, worker.failure
                await asyncio.sleep(0.05)
            refused = caplog.text.count("out of memory")
            assert not task.done() and worker.failure is None
            # and memory is freed
            client.config_set("maxmemory", 0)
            out = names.stream_name("bench-out", ns=NS)
            while client.xlen(out) < 20:
                assert not task.done() and time.monotonic() < deadline, worker.failure
                await asyncio.sleep(0.05)
        finally:
            worker.stop()
            await task
            await broker.close()

        # Then every frame went through once, none was dead-lettered, the refusals were logged
        assert client.xlen(out) == 20
        assert not client.exists(f"{NS}:deadletters")
        assert refused >= 1 and worker.failure is None


async def test_a_producer_waits_while_redis_memory_is_over_the_bound(tmp_path: Path, caplog) -> None:
    # Given an ingest worker whose memory bound is below what Redis uses, and a drive's job
    from fixtures import teslacam as tc
    from stages.discover import discover
    from brokers.redis import RedisBlobStore
    from workers.handlers.ingest import build

    footage = tmp_path / "footage"
    tc.make_drive(footage, minutes=1, cameras=("front",), spec=tc.ClipSpec(duration_s=1.0))
    with RedisServers(tmp_path / "redis") as servers:
        server = servers.start()
        client = server.client()
        settings = load_settings(environ={}, namespace=NS, broker={"max_used_memory": 1},
                                 ingest={"roots": [str(footage)]}, worker={"heartbeat_s": 0.1})  # fmt: skip
        broker = RedisBroker(url=server.url(), namespace=NS, settings=settings.broker)
        blobs = RedisBlobStore(server.url(), namespace=NS)
        (drive,) = discover(footage).drives
        await broker.publish(names.stream_name(names.JOBS, ns=NS), codec.encode(drive.to_job()))
        worker = Worker(build(settings, blobs), broker, blobs, settings, consumer="w1")
        caplog.set_level(logging.WARNING, logger="roadstream.worker")
        task = asyncio.create_task(worker.run())
        deadline = time.monotonic() + 60  # a bound that fails the test instead of hanging it
        frames = f"{NS}:frames:*"
        try:
            # When it has reached its first frames and found Redis over the bound
            while "over broker.max_used_memory" not in caplog.text:
                assert not task.done() and time.monotonic() < deadline, worker.failure
                await asyncio.sleep(0.05)
            # Then it publishes no frame while it waits (its "started" markers only)
            assert published_frames(client, frames) == 0
            # and once the bound is lifted, the drive goes through and ends
            settings.broker.max_used_memory = 0
            while not client.xlen(f"{NS}:drives") or not caplog.text.count("back under the bound"):
                assert not task.done() and time.monotonic() < deadline, worker.failure
                await asyncio.sleep(0.05)
        finally:
            worker.stop()
            await task
            await blobs.close()
            await broker.close()
        assert published_frames(client, frames) == 5  # 1 s at 5 frames/s


def published_frames(client, pattern: str) -> int:
    from stream.schemas import FrameRef

    entries = [f[b"d"] for k in client.scan_iter(pattern, _type="stream") for _, f in client.xrange(k)]
    return sum(isinstance(codec.decode(data), FrameRef) for data in entries)

"""Run many workers: as asyncio tasks in one process, or as N processes per stage.

In-process mode shares one broker connection and is what ``roadstream run`` and the
tests use. Process mode starts ``roadstream worker STAGE`` children, restarts one that
dies unexpectedly, and forwards SIGTERM/SIGINT so each child drains gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from brokers.base import Broker
from brokers.blobs import BlobStore
from brokers.connect import connect
from stream.settings import Settings
from workers import metrics
from workers.registry import builder
from workers.runtime import Worker

log = logging.getLogger("roadstream.supervisor")

#: A child that dies sooner than this after its start is not restarted in a tight loop.
RESTART_BACKOFF_S = 2.0


def build_workers(
    stages: Mapping[str, int], settings: Settings, broker: Broker, blobs: BlobStore, *, burst: bool = False
) -> list[Worker]:
    """Build ``n`` workers for each stage, each with its own handler.

    Raises:
        KeyError: a stage name is unknown.
    """
    workers = []
    for stage, count in stages.items():
        build = builder(stage)
        workers += [Worker(build(settings, blobs), broker, blobs, settings, burst=burst) for _ in range(count)]
    return workers


def install_signal_handlers(workers: Sequence[Worker]) -> None:
    """SIGTERM and SIGINT stop every worker gracefully (a second signal is not special)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, lambda: [w.stop() for w in workers])


async def run_workers(
    stages: Mapping[str, int], settings: Settings, *, url: str, burst: bool = False, signals: bool = True
) -> list[Worker]:
    """Run workers of several stages in this process until they stop.

    Parameters:
        stages: stage name -> number of workers.
        settings: all settings.
        url: the broker URL (``redis://…``, ``rediss://…``, ``unix://…``, ``memory://…``).
        burst: workers exit once their input is drained.
        signals: install SIGTERM/SIGINT handlers.

    Returns:
        The workers, after they stopped (their ``counts`` say what they did).
    """
    broker, blobs = connect(url, namespace=settings.namespace, settings=settings.broker)
    server = None
    try:
        workers = build_workers(stages, settings, broker, blobs, burst=burst)
        if signals:
            install_signal_handlers(workers)
        if settings.worker.metrics_port:
            server = await metrics.serve_http(
                settings.worker.metrics_port,
                host=settings.worker.metrics_host,
                live=lambda: all(w.live() for w in workers),
                ready=lambda: all(w.ready() for w in workers),
            )
        results = await asyncio.gather(*(_run_one(w, workers) for w in workers), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return workers
    finally:
        if server is not None:
            server.close()
        await blobs.close()
        await broker.close()


async def _run_one(worker: Worker, workers: Sequence[Worker]) -> None:
    # A worker that failed stops the others of the process: the process then exits
    # non-zero and is restarted whole, instead of running on with a stage missing.
    try:
        await worker.run()
    except BaseException:
        for other in workers:
            other.stop()
        raise


def run_processes(
    stages: Mapping[str, int],
    worker_args: Sequence[str] = (),
    *,
    prefix: Sequence[str] = (),
    poll_s: float = 0.5,
    env: Mapping[str, str] | None = None,
) -> int:
    """Run ``n`` processes of ``roadstream worker STAGE`` per stage until signalled.

    Parameters:
        stages: stage name -> process count.
        worker_args: extra arguments for each child (``--redis URL`` …).
        prefix: global options that go before ``worker`` (``--config``, ``--set``).
        poll_s: how often to look for dead children.
        env: the children's environment (the broker URL goes here, never in argv).

    Returns:
        0 after a clean stop.
    """
    stopping = False

    def start(stage: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "workers.cli", *prefix, "worker", stage, *worker_args]
        return subprocess.Popen(command, env=None if env is None else dict(env))

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child, _, _ in children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    children = [(start(stage), stage, time.monotonic()) for stage, n in stages.items() for _ in range(n)]
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stopping:
        time.sleep(poll_s)
        for index, (child, stage, started) in enumerate(children):
            if child.poll() is not None and not stopping:
                log.warning("worker %s (pid %d) exited with %s; restarting", stage, child.pid, child.returncode)
                time.sleep(max(0.0, RESTART_BACKOFF_S - (time.monotonic() - started)))
                children[index] = (start(stage), stage, time.monotonic())
    for child, _, _ in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=60)
    return 0

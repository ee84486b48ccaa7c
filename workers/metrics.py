"""Prometheus metrics of the workers, and the small HTTP server that serves them.

One set of metric families per process, labelled by stage, so several workers in one
process (``roadstream run``) export side by side. ``roadstream_group_lag`` is what the
KEDA Prometheus scaler sums for partitioned hops.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

ENTRIES_IN = Counter("roadstream_entries_in", "Entries read by a stage", ["stage"])
ENTRIES_OUT = Counter("roadstream_entries_out", "Entries published by a stage", ["stage"])
ENTRIES_FAILED = Counter("roadstream_entries_failed", "Entries a stage failed on", ["stage", "reason"])
DEAD_LETTERS = Counter("roadstream_dead_letters", "Entries moved to the dead-letter stream", ["stage"])
RECLAIMED = Counter("roadstream_entries_reclaimed", "Entries taken over from other consumers", ["stage"])
BATCH_SIZE = Histogram(
    "roadstream_batch_size", "Entries per batch", ["stage"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
STAGE_SECONDS = Histogram(
    "roadstream_stage_seconds",
    "Time a stage spent on one batch",
    ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
GROUP_LAG = Gauge("roadstream_group_lag", "Entries not yet delivered to a group", ["group", "stream"])
GROUP_PENDING = Gauge("roadstream_group_pending", "Entries delivered, not acknowledged", ["group", "stream"])
PARTITIONS_OWNED = Gauge("roadstream_partitions_owned", "Partitions this worker owns", ["stage", "consumer"])


async def serve_http(
    port: int, live: Callable[[], bool], ready: Callable[[], bool], host: str = "127.0.0.1"
) -> asyncio.Server:
    """Serve ``/metrics``, ``/live`` and ``/ready`` on ``port`` (plain asyncio, no framework).

    Parameters:
        port: TCP port; 0 picks a free one (read it from the returned server).
        live: says whether the worker's loop is alive (heartbeats are recent).
        ready: says whether the worker has started and reaches its broker.
        host: interface to bind (``worker.metrics_host``; loopback by default).

    Returns:
        The running server; close it to stop serving.
    """

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            request = await asyncio.wait_for(reader.readline(), timeout=5)
            path = request.split()[1].decode() if len(request.split()) > 1 else "/"
            if path.startswith("/metrics"):
                status, body, ctype = 200, generate_latest(), CONTENT_TYPE_LATEST
            elif path.startswith(("/live", "/ready")):
                ok = live() if path.startswith("/live") else ready()
                status, body, ctype = (200 if ok else 503), (b"ok\n" if ok else b"not ok\n"), "text/plain"
            else:
                status, body, ctype = 404, b"not found\n", "text/plain"
            head = f"HTTP/1.1 {status} X\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
            writer.write(head.encode() + b"connection: close\r\n\r\n" + body)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(respond, host, port)

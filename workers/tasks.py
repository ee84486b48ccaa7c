"""Small helpers for the worker's asyncio tasks: names, retries at start, cancellation."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable

from stream.errors import BrokerConnectionError

log = logging.getLogger("roadstream.worker")

#: First and longest delay between tries to reach the broker at start.
START_RETRY_S = 0.5
START_RETRY_MAX_S = 5.0
#: Longest wait for a cancelled task to end before shutdown goes on without it.
CANCEL_WAIT_S = 5.0


def consumer_name(stage: str) -> str:
    """A consumer name unique to this process and worker."""
    return f"{stage}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


async def retry_while_unreachable(
    step: Callable[[], Awaitable[None]], *, wait_s: float, stopping: Callable[[], bool], consumer: str
) -> None:
    """Run ``step``; while the broker is unreachable, try again after a growing delay,
    logged each time, for up to ``wait_s`` seconds.

    Raises:
        BrokerConnectionError: still unreachable after ``wait_s``, or ``stopping()`` said so.
    """
    delay, waited = START_RETRY_S, 0.0
    while True:
        try:
            await step()
            return
        except BrokerConnectionError as exc:
            if stopping() or waited >= wait_s:
                raise
            log.warning("worker %s: broker not reachable at start (%s); trying again in %.1f s", consumer, exc, delay)
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, START_RETRY_MAX_S)


async def cancel_all(tasks: list[asyncio.Task], consumer: str) -> None:
    """Cancel tasks and wait for them, but never forever: a task that swallowed its
    cancellation (a cancel turned into a connection error) must not hang shutdown."""
    for task in tasks:
        task.cancel()
    done, pending = await asyncio.wait(tasks, timeout=CANCEL_WAIT_S)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            log.error("worker %s: task failed: %r", consumer, task.exception())
    for task in pending:
        log.error("worker %s: task %s did not stop when cancelled; left behind", consumer, task.get_name())


async def drain(
    tasks: list[asyncio.Task], queue: asyncio.Queue, busy: Callable[[], int], grace_s: float, consumer: str
) -> None:
    """Stop a worker's tasks: the reader (``tasks[0]``) at once, the processors once the
    queue is empty and none is busy, or after ``grace_s``. Batches read but never handled
    are cancelled: their entries stay pending and are reclaimed."""
    tasks[0].cancel()
    deadline = time.monotonic() + grace_s
    while (busy() or not queue.empty()) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await cancel_all(tasks, consumer)
    left = []
    while not queue.empty():
        left.append(queue.get_nowait()[1])
    if left:
        await cancel_all(left, consumer)

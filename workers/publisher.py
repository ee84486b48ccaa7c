"""The ``Publisher`` a worker hands its handler: publish now, small values, backpressure."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from stream import names
from workers.handler import Output

if TYPE_CHECKING:
    from workers.runtime import Worker

log = logging.getLogger("roadstream.worker")
#: Which group consumes each hop (the one whose backlog backpressure watches).
HOP_CONSUMER = {hop: stage for stage, hops in names.STAGE_INPUTS.items() for hop in hops}


class WorkerPublisher:
    """Publishes handler outputs and applies backpressure on the next hop."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def publish(self, outputs: Sequence[Output]) -> None:
        await self._worker.publish(outputs)

    async def put_value(self, key: str, value: bytes, ttl_ms: int | None = None) -> None:
        await self._worker.broker.put_value(key, value, ttl_ms)

    async def get_value(self, key: str) -> bytes | None:
        return await self._worker.broker.get_value(key)

    async def wait_for_room(self, hop: str, partition: int | None = None, *, backlog: bool = True,
                            memory: bool = True) -> None:  # fmt: skip
        worker = self._worker
        group = HOP_CONSUMER.get(hop)
        if group is not None and backlog:
            stream = worker.stream(hop, partition)
            await worker.broker.wait_for_room(stream, group)
        if not memory:
            return
        bound = worker.settings.broker.max_blob_bytes
        while await worker.blobs.bytes_in_flight() > bound and not worker.stopping:
            await asyncio.sleep(0.05)
        await self._wait_for_memory()

    async def _wait_for_memory(self) -> None:
        """Wait while the server's memory is over ``broker.max_used_memory``: writes slow
        down before Redis refuses them (OOM). Said once per wait, and when it ends."""
        worker = self._worker
        waited_since = None
        while (bound := worker.settings.broker.max_used_memory) and not worker.stopping:
            used = await worker.broker.used_memory()
            if used is None or used <= bound:
                break
            if waited_since is None:
                waited_since = time.monotonic()
                log.warning("worker %s: redis uses %d bytes, over broker.max_used_memory %d; waiting",
                            worker.consumer, used, bound)  # fmt: skip
            await asyncio.sleep(0.1)
        if waited_since is not None and not worker.stopping:
            log.warning("worker %s: redis memory back under the bound after %.1f s", worker.consumer,
                        time.monotonic() - waited_since)  # fmt: skip

"""What a worker's heartbeat does: leases and take-overs, touching, reclaiming, trimming, health.

Each duty is one method that ``workers.runtime.Worker``'s heartbeat loop calls on its own
schedule; the delivery state they change lives in ``workers.ownership.Ownership``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import TYPE_CHECKING

from brokers.base import Entry
from brokers.partitions import PartitionManager
from stream import names
from workers.handler import Delivery

if TYPE_CHECKING:
    from workers.runtime import Worker

log = logging.getLogger("roadstream.worker")


class Upkeep:
    """The heartbeat's duties for one worker."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._last = {"touch": time.monotonic(), "reclaim": time.monotonic(), "trim": time.monotonic()}

    def period(self) -> float:
        """Seconds between beats: the heartbeat, shorter for leases (a third of their TTL)
        and for touching (a third of the idle time after which entries are reclaimed)."""
        settings = self._worker.settings
        interval = settings.worker.heartbeat_s
        if self._worker.handler.partitioned:
            interval = min(interval, settings.broker.lease_ttl_ms / 3000)
        return min(interval, settings.broker.claim_idle_ms / 3000)

    async def beat(self) -> None:
        """One beat: renew leases, then touch, reclaim and trim when each is due, then
        write the health record."""
        settings = self._worker.settings
        every = {
            "touch": (settings.broker.claim_idle_ms / 3000, self.touch_held),
            "reclaim": (settings.worker.reclaim_interval_s, self.reclaim),
            "trim": (settings.worker.trim_interval_s, self.trim),
        }
        now = time.monotonic()
        if self._worker.own.leases is not None:
            await self.refresh_partitions()
        for duty, (interval, run) in every.items():
            if (duty != "trim" or interval > 0) and now - self._last[duty] >= interval:
                await run()
                self._last[duty] = now
        await self.record_health()

    async def join(self) -> None:
        """Create the input groups, or take partitions (their leases and replays)."""
        worker = self._worker
        if not worker.handler.partitioned:
            for hop in worker.handler.inputs:
                await worker.broker.ensure_group(worker.stream(hop), worker.group)
            return
        if worker.own.leases is None:
            bounds = worker.settings.broker
            count = bounds.frame_partitions if names.FRAMES in worker.handler.inputs else bounds.fuse_partitions
            worker.own.leases = PartitionManager(
                worker.broker, worker.group, worker.consumer, count, bounds.lease_ttl_ms
            )
        await self.refresh_partitions()

    async def refresh_partitions(self) -> None:
        """Renew leases; drop revoked partitions, take over assigned ones (``Ownership.refresh``)."""
        worker = self._worker
        revoked = await worker.own.refresh(self._claim_for_takeover)
        gone = [worker.stream(hop, p) for p in revoked for hop in worker.handler.inputs]
        worker.emit("partitions", worker.consumer, len(worker.own.leases.owned), gone)

    async def _claim_for_takeover(self, stream: str) -> list[Delivery]:
        worker = self._worker
        await worker.broker.ensure_group(stream, worker.group)
        # A takeover is no failed delivery: keep the counters as they were.
        claimed = await self._claim_all(stream, min_idle_ms=0, count_delivery=False)
        if not claimed:
            return []
        worker.emit("reclaimed", len(claimed))
        return await worker.reader.accept(sorted(claimed, key=lambda e: e.order), taking_over=True)

    async def _claim_all(self, stream: str, *, min_idle_ms: int, count_delivery: bool = True) -> list[Entry]:
        worker = self._worker
        entries = await worker.broker.claim_all(
            worker.group, worker.consumer, stream, min_idle_ms=min_idle_ms, count_delivery=count_delivery
        )
        # An entry this worker still holds went idle (a touch came late): it stays held.
        return await worker.failures.dead_letter_exhausted([e for e in entries if not worker.own.holds(e)])

    async def touch_held(self) -> None:
        """Reset the idle time of every held entry, so no one reclaims it while we live."""
        worker = self._worker
        for entries in worker.own.by_stream().values():
            await worker.broker.touch(worker.group, worker.consumer, entries)

    async def reclaim(self) -> None:
        """Take over entries that went idle (their consumer died or gave up); export lag."""
        worker = self._worker
        streams = worker.input_streams()
        for stream in streams:
            claimed = await self._claim_all(stream, min_idle_ms=worker.settings.broker.claim_idle_ms)
            if claimed:
                log.info("worker %s: reclaimed %d entries of %s", worker.consumer, len(claimed), stream)
                worker.emit("reclaimed", len(claimed))
                await worker.own.reclaimed(await worker.reader.accept(sorted(claimed, key=lambda e: e.order)))
        for stream in streams:
            stats = await worker.broker.stats(stream)
            group = stats.group(worker.group)
            worker.emit("lag", stream, group.lag if group else stats.length, group.pending if group else 0)

    async def trim(self) -> None:
        """Trim what the worker reads below what every group acknowledged (``Broker.trim``
        keeps anything pending or unread), and cap the stage hops it writes that no group
        reads (segments while vera is off), which would otherwise grow without bound."""
        worker = self._worker
        for stream in worker.input_streams():
            worker.emit("trimmed", await worker.broker.trim(stream))
        cap = worker.settings.broker.ungrouped_cap
        for stream in sorted(worker.outputs):
            worker.emit("trimmed", await worker.broker.cap(stream, cap))

    async def record_health(self) -> None:
        """Write the worker's health record (a key with a TTL of three heartbeats)."""
        worker = self._worker
        record = {
            "consumer": worker.consumer,
            "group": worker.group,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "at": time.time(),
            "counts": worker.counts,
            "held": len(worker.own.held),
            "partitions": sorted(worker.own.leases.owned) if worker.own.leases else None,
        }
        ttl_ms = int(max(3 * worker.settings.worker.heartbeat_s, 3) * 1000)
        key = names.health_name(worker.group, worker.consumer, ns=worker.broker.namespace)
        await worker.broker.put_value(key, json.dumps(record).encode(), ttl_ms=ttl_ms)

"""Reading batches: replayed deliveries first, then new entries until full or timed out.

The reading half of ``workers.runtime.Worker`` (a stream muxer's size-or-timeout): it
decodes and holds what it reads (``Ownership.hold``), dead-letters what cannot be read,
and keeps a partition's order (entries of a partition rebuilt during a read go behind its
replay).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from brokers.base import Entry
from stream import codec
from stream.errors import DecodeError
from workers.handler import Delivery

if TYPE_CHECKING:
    from workers.runtime import Worker


class BatchReader:
    """Cuts a worker's input into batches of at most ``worker.batch_size``."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def next_batch(self) -> list[Delivery]:
        """Up to ``batch_size`` entries: replayed ones first, then new ones until full or
        until ``max_wait_ms`` after the first arrived (a stream muxer's size-or-timeout)."""
        own = self._worker.own
        size = self._worker.settings.worker.batch_size
        wait_s = self._worker.settings.worker.max_wait_ms / 1000
        if not own.fresh():
            return []
        batch = own.take(size)
        try:
            return self._cut(await self._fill(batch, size, wait_s))
        except BaseException:
            # Replayed (or accepted) deliveries taken into this batch are held: a failed read
            # must not drop them, or they stay touched and unhandled for good. Back in front.
            own.put_back(batch)
            raise

    async def _fill(self, batch: list[Delivery], size: int, wait_s: float) -> list[Delivery]:
        """Add new entries to ``batch`` (in place) until full or the muxer's timeout."""
        worker = self._worker
        deadline = time.monotonic() + wait_s if batch else None
        while len(batch) < size and not worker.stopping:
            streams = worker.input_streams()
            if not streams:
                break
            if deadline is None:
                block_ms = max(1, int(wait_s * 1000)) if worker.burst else 1000
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                block_ms = max(1, int(remaining * 1000))
            generations = worker.own.generations()
            reading = worker.own.reading(streams)
            try:
                entries = await worker.broker.read(
                    worker.group, worker.consumer, streams, count=size - len(batch),
                    block_ms=worker.own.block_ms(block_ms),
                )
            finally:
                worker.own.read_done(reading)
            if not entries:
                if deadline is None:
                    break  # nothing came within a poll: let the loop tick
                continue
            batch += worker.own.behind_replays(await self.accept(entries), generations)
            if deadline is None:
                deadline = time.monotonic() + wait_s
            batch += worker.own.take(size - len(batch))
        return batch

    def _cut(self, batch: list[Delivery]) -> list[Delivery]:
        size = self._worker.settings.worker.batch_size
        # A read over many streams may bring up to ``size`` from each: keep batches at the
        # bound (fixed shapes for the GPU) and hand the rest over first next time. Older
        # entries of a partition are never behind them: those were taken first.
        batch, extra = batch[:size], batch[size:]
        self._worker.own.queue(extra)
        return batch

    async def accept(self, entries: Sequence[Entry], *, taking_over: bool = False) -> list[Delivery]:
        """Decode entries and hold them; dead-letter the ones that do not decode or are not accepted.

        Parameters:
            entries: as read or claimed, in stream order.
            taking_over: claimed for a take-over (their partition is not ready yet).
        """
        worker, own = self._worker, self._worker.own
        deliveries = []
        for entry in entries:
            partition = own.partition_of(entry.stream)
            if not taking_over and not own.admits(partition):
                continue  # revoked while this read was in flight; reclaimed by its owner
            if entry.problem is not None:
                await worker.failures.dead_letter_unread(entry, f"unreadable entry: {entry.problem}")
                continue
            try:
                message = codec.decode(entry.data, worker.handler.accepts or None)
            except DecodeError as exc:
                await worker.failures.dead_letter_unread(entry, f"undecodable entry: {exc.reason}")
                continue
            deliveries.append(own.hold(entry, message, partition))
        worker.emit("entries_in", len(deliveries))
        return deliveries

"""What the runtime does with entries that fail: retry, find the culprit, dead-letter.

* a stateless stage's failed batch is handled again entry by entry, so one bad entry
  fails alone (``one_by_one``); a stateful stage's entries all fail and are replayed;
* an ``InputError``, or a failure at ``max_deliveries``, dead-letters the entry at once;
  any other failure leaves it pending for redelivery, its error kept by the broker
  (``Broker.record_error``) for the dead letter of its last try;
* undecodable entries go to the dead-letter stream before any handler sees them;
* after a dead letter the stage may publish what tells downstream not to wait
  (``Handler.dead_lettered``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from brokers.base import Entry
from stream import codec
from stream.errors import BrokerConnectionError, DecodeError, InputError
from workers.handler import BatchResult, Delivery

if TYPE_CHECKING:
    from workers.runtime import Worker

log = logging.getLogger("roadstream.worker")


class Failures:
    """The failure policy of one worker (its broker, handler, settings and hooks)."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def one_by_one(self, batch: list[Delivery], error: Exception) -> BatchResult:
        """After an unexpected error on a batch, find the entries that caused it.

        A stateless stage handles each entry again, alone (its outputs are idempotent, by
        dedupe key), so one bad entry fails alone with its own error. A stateful one cannot
        (its state took part of the batch): all its entries fail, and ``Ownership.rebuild``
        replays them, each counted one more delivery.
        """
        worker = self._worker
        if worker.handler.partitioned or len(batch) == 1:
            return BatchResult(ack=[], failed=[(d, error) for d in batch])
        result = BatchResult(ack=[])
        for delivery in batch:
            try:
                alone = await worker.handler.handle([delivery])
            except BrokerConnectionError:
                raise
            except Exception as exc:
                entry = delivery.entry
                log.warning("worker %s: %s %s fails alone: %r", worker.consumer, entry.stream, entry.id, exc)
                result.failed.append((delivery, exc))
                continue
            result.outputs += alone.outputs
            result.ack += [delivery] if alone.ack is None else alone.ack
            result.failed += alone.failed
        return result

    async def fail(self, delivery: Delivery, exc: BaseException) -> bool:
        """Dead-letter a failed entry, or leave it for another try; True when it is retried."""
        worker = self._worker
        entry = delivery.entry
        reason = type(exc).__name__
        worker.emit("entry_failed", reason)
        worker.own.release([delivery])
        error = f"{reason}: {exc}"
        context = self.context(entry, getattr(delivery.message, "drive_id", None))
        if isinstance(exc, InputError) or entry.deliveries >= worker.settings.broker.max_deliveries:
            await self.dead_letter(entry, error, context)
            return False
        log.info("worker %s: %s %s failed, left for redelivery: %s", worker.consumer, entry.stream, entry.id, error,
                 extra=context)  # fmt: skip
        # Left pending: redelivered with a higher count. Keep the reason for the dead
        # letter, in case the next try is the last.
        await worker.broker.record_error(worker.group, entry, error)
        return True

    def context(self, entry: Entry, drive: str | None = None) -> dict[str, object]:
        """Log fields that say where a record comes from (JSON logs write them as keys)."""
        worker = self._worker
        return {
            "stage": worker.group, "consumer": worker.consumer, "stream": entry.stream, "entry": entry.id, "drive": drive,
        }  # fmt: skip

    async def dead_letter(self, entry: Entry, error: str, context: dict[str, object] | None = None) -> None:
        """Move an entry to the dead-letter stream, then let the stage say what downstream
        should stop waiting for."""
        worker = self._worker
        await worker.broker.dead_letter(worker.group, entry, error, consumer=worker.consumer)
        worker.emit("dead_lettered")
        context = context or self.context(entry)
        log.warning("worker %s: dead-lettered %s %s: %s", worker.consumer, entry.stream, entry.id, error, extra=context)
        # Let the stage tell downstream not to wait for what this entry would have given
        # (ingest ends the drive), so nobody waits on a timeout for it.
        try:
            message = codec.decode(entry.data, worker.handler.accepts or None)
        except DecodeError:
            return
        await worker.publish(await worker.handler.dead_lettered(message, error))

    async def dead_letter_unread(self, entry: Entry, error: str) -> None:
        """Dead-letter an entry no handler will see. When the broker drops meanwhile, the
        entry stays pending and unheld (so it goes idle and is reclaimed), and the entries
        accepted before it in the same read are still handed over."""
        try:
            await self.dead_letter(entry, error)
        except BrokerConnectionError as exc:
            log.warning("worker %s: could not dead-letter %s %s (%s); left pending", self._worker.consumer,
                        entry.stream, entry.id, exc)  # fmt: skip

    async def dead_letter_exhausted(self, entries: list[Entry]) -> list[Entry]:
        """Dead-letter claimed entries past ``max_deliveries``; returns the others."""
        worker = self._worker
        keep = []
        for entry in entries:
            if entry.deliveries > worker.settings.broker.max_deliveries:
                last = await worker.broker.last_error(worker.group, entry)
                reason = last or "no worker finished it (crashed or timed out)"
                await self.dead_letter(entry, f"failed {entry.deliveries - 1} deliveries; last: {reason}")
            else:
                keep.append(entry)
        return keep

"""The generic worker: read a batch, run the stage, publish, then acknowledge.

Shape (after arq's ``Worker.main``): a reader task fills a queue of ``prefetch`` batches,
starting each batch's ``Handler.prepare`` (blobs fetched, JPEGs decoded, GPU work
launched) as a task of its own, so the IO and device work of the next batches overlap the
stage's work on the current one; ``concurrency`` processor tasks hand each batch, with what
its preparation returned, to ``Handler.handle``; a heartbeat task does the upkeep
(``workers.upkeep``: leases, touching held entries, reclaiming, trimming, health).

Nothing is acknowledged before its outputs are published (idempotently, by dedupe key);
held entries are touched, so no one reclaims them while this worker lives; failures are
retried by redelivery, then dead-lettered (``workers.failures``); a partitioned stage
replays a partition's pending entries, in order, when it takes it over
(``workers.ownership``). Metrics and counts are hooks (``workers.hooks``) called through
``Worker.emit``. docs/runtime.md has the whole contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from brokers.base import Broker, Publish
from brokers.blobs import BlobStore
from stream import codec, names
from stream.errors import BrokerConnectionError, WorkerFailed
from stream.settings import Settings
from workers.failures import Failures
from workers.handler import BatchResult, Delivery, Handler, Output
from workers.hooks import CountingHooks, Hooks, PrometheusHooks
from workers.ownership import Ownership, key
from workers.publisher import HOP_CONSUMER, WorkerPublisher
from workers.reader import BatchReader
from workers.tasks import cancel_all, consumer_name, drain, retry_while_unreachable
from workers.upkeep import Upkeep

log = logging.getLogger("roadstream.worker")

#: Seconds to wait before reading again after the broker's connection dropped.
RECONNECT_DELAY_S = 1.0


class Worker:
    """Runs one handler against a broker until stopped.

    Parameters:
        handler: the stage binding.
        broker: the transport.
        blobs: the frame blob store (handed to the handler by its builder).
        settings: all settings; ``settings.worker`` shapes this loop.
        consumer: the consumer name; unique per process by default.
        burst: exit once the input is drained and nothing is held.
        hooks: extra hooks (metrics and counts are always on).
    """

    def __init__(
        self,
        handler: Handler,
        broker: Broker,
        blobs: BlobStore,
        settings: Settings,
        *,
        consumer: str | None = None,
        burst: bool = False,
        hooks: Sequence[Hooks] = (),
    ) -> None:
        self.handler = handler
        self.broker = broker
        self.blobs = blobs
        self.settings = settings
        self.group = handler.group
        self.consumer = consumer or consumer_name(handler.group)
        self.burst = burst
        self.stopping = False
        self.started = False
        #: Why one of the worker's own tasks ended unexpectedly (then it is not live).
        self.failure: BaseException | None = None
        self.last_beat = time.monotonic()
        self._counting = CountingHooks()
        self.hooks: list[Hooks] = [self._counting, PrometheusHooks(), *hooks]
        self.own = Ownership(handler, self.stream)
        self.failures = Failures(self)
        self.reader = BatchReader(self)
        self.upkeep = Upkeep(self)
        self.outputs: set[str] = set()  # streams of stage hops this worker wrote (capped if ungrouped)
        # Batches read ahead, each with the task preparing it.
        self._queue: asyncio.Queue[tuple[list[Delivery], asyncio.Task]] = asyncio.Queue(
            maxsize=max(1, settings.worker.prefetch)
        )
        # prefetch 0: a batch is read only once a processor is free to take it, so entries
        # this worker cannot start yet stay in the stream for other workers (ingest jobs:
        # one process reading ahead held 32 drives' jobs while eleven others idled).
        self._slots = asyncio.Semaphore(self._processors()) if settings.worker.prefetch == 0 else None
        self._busy = 0
        self._stop_event = asyncio.Event()
        self._beating = True

    @property
    def counts(self) -> dict[str, int]:
        """Entries in, out, failed, dead-lettered and trimmed so far."""
        return self._counting.counts

    def emit(self, event: str, *args: object) -> None:
        """Call hook ``event`` of every hook with this worker's group first; a failing hook
        is logged and the others still run (a broken exporter never stops a stage)."""
        for hooks in self.hooks:
            try:
                getattr(hooks, event)(self.group, *args)
            except Exception:
                log.exception("worker %s: hook %s.%s failed", self.consumer, type(hooks).__name__, event)

    def stream(self, hop: str, partition: int | None = None) -> str:
        """Stream name of a hop (partition) in this worker's namespace."""
        return names.stream_name(hop, partition, ns=self.broker.namespace)

    def input_streams(self) -> list[str]:
        """The streams this worker reads now (owned, ready partitions only, when partitioned)."""
        return self.own.streams()

    # -- lifecycle -----------------------------------------------------------------

    def stop(self) -> None:
        """Ask the worker to stop: no new reads, in-flight work finishes within the grace."""
        self.stopping = True
        self._stop_event.set()

    async def run(self) -> None:
        """Start the handler and run until ``stop()`` (or, in burst mode, until drained)."""
        self.handler.publisher = WorkerPublisher(self)
        await self.handler.start()
        await retry_while_unreachable(
            self.upkeep.join, wait_s=self.settings.worker.start_wait_s, stopping=lambda: self.stopping, consumer=self.consumer
        )
        self.started = True
        tasks = [asyncio.create_task(self._read_loop(), name=f"{self.consumer}-read")]
        tasks += [
            asyncio.create_task(self._process_loop(), name=f"{self.consumer}-process-{i}")
            for i in range(self._processors())
        ]
        beat = asyncio.create_task(self._heartbeat_loop(), name=f"{self.consumer}-beat")
        stopped = asyncio.create_task(self._stop_event.wait(), name=f"{self.consumer}-stop")
        try:
            # Supervise our own tasks: none may end while the worker runs. One that does
            # (an unexpected error) stops the worker, which then reports not-live and
            # raises, so that its process exits non-zero and is restarted.
            done, _ = await asyncio.wait([stopped, beat, *tasks], return_when=asyncio.FIRST_COMPLETED)
            ended = [task for task in done if task is not stopped]
            if ended and not self.stopping:
                self._task_ended(ended[0])
            # Readers stop at once; processors get the grace period to finish their batch.
            await drain(tasks, self._queue, lambda: self._busy, self.settings.worker.grace_s, self.consumer)
        finally:
            stopped.cancel()
            self._beating = False
            await cancel_all([beat], self.consumer)
            await self._shutdown()
        if self.failure is not None:
            message = f"worker {self.consumer} stopped: {self.failure!r}"
            raise WorkerFailed(message) from self.failure

    def _task_ended(self, task: asyncio.Task) -> None:
        """Record why one of our tasks ended while the worker ran, and stop."""
        exc = None if task.cancelled() else task.exception()
        self.failure = exc or RuntimeError(f"task {task.get_name()} ended")
        log.error("worker %s: task %s ended unexpectedly; stopping", self.consumer, task.get_name(), exc_info=exc)
        self.stop()

    async def _shutdown(self) -> None:
        with contextlib.suppress(Exception):
            await self.handler.stop()
        with contextlib.suppress(Exception):
            await self.own.stop()
        log.info("worker %s stopped: %s", self.consumer, self.counts)

    # -- reading -------------------------------------------------------------------

    async def _read_loop(self) -> None:
        idle_rounds = 0
        while not self.stopping:
            if self._slots is not None:
                await self._slots.acquire()
            try:
                batch = await self.reader.next_batch()
            except BrokerConnectionError as exc:
                self._release_slot()
                log.warning("worker %s: broker unreachable (%s); retrying", self.consumer, exc)
                await self.own.drop_all()  # a lost reply: take every partition over again
                await asyncio.sleep(RECONNECT_DELAY_S)
                continue
            if not batch:
                self._release_slot()
                idle_rounds += 1
                try:
                    await self._on_idle(idle_rounds)
                except BrokerConnectionError as exc:
                    log.warning("worker %s: broker unreachable while idle (%s); recovering", self.consumer, exc)
                    await self._recover([])
                continue
            idle_rounds = 0
            preparing = asyncio.create_task(self._prepare(batch), name=f"{self.consumer}-prepare")
            try:
                await self._queue.put((batch, preparing))
            except asyncio.CancelledError:
                preparing.cancel()
                raise

    async def _prepare(self, batch: list[Delivery]) -> object:
        try:
            return await self.handler.prepare(batch)
        except Exception as exc:  # prepare is best effort; handle() prepares again (and fails there)
            log.warning("worker %s: prepare failed: %r", self.consumer, exc)
            return None

    async def _on_idle(self, idle_rounds: int) -> None:
        if self._queue.empty() and not self._busy and self.own.fresh():
            async with self.own.lock:
                result = await self.handler.tick()
                if result.outputs or result.ack or result.failed:
                    await self._finish([], result)
        if self.burst and idle_rounds >= 3 and not self.own.held and self._queue.empty() and not self._busy:
            self.stop()
        if not self.input_streams():
            await asyncio.sleep(self.settings.worker.max_wait_ms / 1000)

    # -- processing ----------------------------------------------------------------

    async def _process_loop(self) -> None:
        while True:
            batch, preparing = await self._queue.get()
            self._busy += 1
            try:
                await self._process(batch, await preparing)
            except BrokerConnectionError as exc:
                if self.stopping:
                    return  # possibly our own cancellation, turned into a connection error
                log.warning("worker %s: broker unreachable mid-batch (%s); recovering", self.consumer, exc)
                await self._recover(batch)
            finally:
                self._busy -= 1
                self._release_slot()

    def _processors(self) -> int:
        """Processor tasks: one for a partitioned stage (order), ``worker.concurrency`` otherwise."""
        return 1 if self.handler.partitioned else max(1, self.settings.worker.concurrency)

    def _release_slot(self) -> None:
        if self._slots is not None:
            self._slots.release()

    async def _recover(self, batch: list[Delivery]) -> None:
        """Try again what a dropped connection cut short (see ``Ownership.recover``)."""
        await asyncio.sleep(RECONNECT_DELAY_S)
        await self.own.recover(batch)

    async def _process(self, batch: list[Delivery], prepared: object) -> None:
        if self.handler.partitioned:
            async with self.own.lock:
                await self._process_current(batch, prepared)
        else:
            await self._process_current(batch, prepared)

    async def _process_current(self, batch: list[Delivery], prepared: object) -> None:
        batch = [d for d in batch if self.own.current(d)]
        if not batch:
            return
        started = time.perf_counter()
        try:
            result = await self.handler.handle(batch, prepared)
        except BrokerConnectionError:
            raise  # not the entries' fault: the whole batch is tried again (_recover)
        except Exception as exc:
            log.exception("worker %s: stage failed on a batch of %d", self.consumer, len(batch))
            result = await self.failures.one_by_one(batch, exc)
        self.emit("batch_done", time.perf_counter() - started, len(batch))
        if not self.own.fresh():
            # Stalled past the leases while handling (or before): another worker may own
            # these partitions now and be replaying the same entries. Publish and ack
            # nothing; the state this batch changed is dropped, and the next beat takes
            # each partition over again from its pending entries if it is still ours.
            for partition in sorted({d.partition for d in batch}):
                await self.own.drop(partition)
            return
        await self._finish(batch, result)

    async def _finish(self, batch: list[Delivery], result: BatchResult) -> None:
        """Publish, then dead-letter or leave failures, then ack what is safe."""
        while True:
            try:
                await self.publish(result.outputs)
                break
            except BrokerConnectionError as exc:
                if self.stopping:
                    return  # nothing acked: the entries are reclaimed after we are gone
                log.warning("worker %s: publish failed (%s); retrying", self.consumer, exc)
                await asyncio.sleep(RECONNECT_DELAY_S)
        failed_keys = {key(d) for d, _ in result.failed}
        to_ack = batch if result.ack is None else result.ack
        to_ack = [d for d in to_ack if key(d) not in failed_keys]
        if to_ack:
            await self.broker.ack(self.group, [d.entry for d in to_ack])
            self.own.release(to_ack)
        retry: dict[int, list[Delivery]] = {}
        for delivery, exc in result.failed:
            if await self.failures.fail(delivery, exc) and delivery.partition is not None:
                retry.setdefault(delivery.partition, []).append(delivery)
        for partition, failed in sorted(retry.items()):
            await self.own.rebuild(partition, failed)

    async def publish(self, outputs: Sequence[Output]) -> None:
        """Encode and publish outputs in one round trip (idempotent by dedupe key)."""
        if not outputs:
            return
        items = [Publish(self.stream(o.hop, o.partition), codec.encode(o.message), o.dedupe_key) for o in outputs]
        await self.broker.publish_many(items)
        # Only hops a stage is meant to read: verdicts and drive markers are the output
        # users read by range, never capped.
        self.outputs.update(item.stream for o, item in zip(outputs, items, strict=True) if o.hop in HOP_CONSUMER)
        self.emit("entries_out", len(items))

    # -- heartbeat: leases, touching, reclaiming, trimming, health ---------------------

    async def _heartbeat_loop(self) -> None:
        # A flag, not only cancellation: redis-py can turn a cancel that lands mid-command
        # into a connection error, which this loop survives on purpose.
        while self._beating:
            await asyncio.sleep(self.upkeep.period())
            try:
                await self.upkeep.beat()
                self.last_beat = time.monotonic()
            except BrokerConnectionError as exc:
                log.warning("worker %s: heartbeat failed (%s)", self.consumer, exc)
            # Anything else ends the heartbeat, and so the worker (see ``run``): a beat
            # that fails each time would leave held entries touched and never reclaimed.

    def live(self) -> bool:
        """Whether the heartbeat ran recently and no task of the worker failed (the liveness probe)."""
        return self.failure is None and time.monotonic() - self.last_beat < 3 * max(self.settings.worker.heartbeat_s, 1)

    def ready(self) -> bool:
        """Whether the worker started and is taking work (the readiness probe)."""
        return self.started and not self.stopping and self.live()


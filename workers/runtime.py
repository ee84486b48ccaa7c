"""The generic worker: read a batch, run the stage, publish, then acknowledge.

Shape of the loop (after arq's ``Worker.main``): a reader task fills a queue of
``prefetch`` batches, starting each batch's *preparation* (the handler's ``prepare``:
blobs fetched, JPEGs decoded, GPU work launched) as a task of its own, so the IO and
device work of the next batches overlap each other and the stage's work on the current
one; ``concurrency`` processor tasks take batches from the queue, each once its
preparation is done; a heartbeat task renews partition leases, touches
entries still held, reclaims idle entries of dead consumers and writes health.

Delivery guarantees:

* nothing is acknowledged before its outputs are published (publishing is idempotent
  by dedupe key, so a crash between the two yields the same entries again, once);
* an entry a handler still holds (an open window) is *touched*, so no one reclaims it
  while this worker lives; when the worker dies, its entries go idle and are claimed;
* undecodable entries and ``InputError`` failures go to the dead-letter stream at once,
  other failures are retried by redelivery until ``max_deliveries``;
* a partitioned stage replays a partition's pending entries, in order, when it takes the
  partition over, so its state is rebuilt exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

from brokers.base import Broker, Entry, Publish
from brokers.blobs import BlobStore
from brokers.partitions import PartitionManager
from stream import codec, names
from stream.errors import BrokerConnectionError, DecodeError, InputError, WorkerFailed
from stream.settings import Settings
from workers import metrics
from workers.handler import BatchResult, Delivery, Handler, Output

log = logging.getLogger("roadstream.worker")

#: Which group consumes each hop (the one whose backlog backpressure watches).
HOP_CONSUMER = {hop: stage for stage, hops in names.STAGE_INPUTS.items() for hop in hops}
#: Seconds to wait before reading again after the broker's connection dropped.
RECONNECT_DELAY_S = 1.0
#: First and longest delay between tries to reach the broker at start.
START_RETRY_S = 0.5
START_RETRY_MAX_S = 5.0


def consumer_name(stage: str) -> str:
    """A consumer name unique to this process and worker."""
    return f"{stage}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class _Publisher:
    """Publishes handler outputs and applies backpressure on the next hop."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def publish(self, outputs: Sequence[Output]) -> None:
        await self._worker.publish(outputs)

    async def put_value(self, key: str, value: bytes, ttl_ms: int | None = None) -> None:
        await self._worker.broker.put_value(key, value, ttl_ms)

    async def get_value(self, key: str) -> bytes | None:
        return await self._worker.broker.get_value(key)

    async def wait_for_room(self, hop: str, partition: int | None = None) -> None:
        worker = self._worker
        group = HOP_CONSUMER.get(hop)
        if group is not None:
            stream = worker.stream(hop, partition)
            await worker.broker.wait_for_room(stream, group)
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


class Worker:
    """Runs one handler against a broker until stopped.

    Parameters:
        handler: the stage binding.
        broker: the transport.
        blobs: the frame blob store (handed to the handler by its builder).
        settings: all settings; ``settings.worker`` shapes this loop.
        consumer: the consumer name; unique per process by default.
        burst: exit once the input is drained and nothing is held.
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
        self.counts = {"in": 0, "out": 0, "failed": 0, "dead": 0, "trimmed": 0}
        self._outputs: set[str] = set()  # streams of stage hops this worker wrote (capped if ungrouped)
        self._held: dict[tuple[str, str], Delivery] = {}  # (stream, id) -> delivery
        self._replay: list[Delivery] = []  # claimed entries to hand over before new reads
        self._partitions: PartitionManager | None = None
        # Owned partitions whose pending entries are already queued for replay: only
        # these are read, so no new entry of a partition overtakes its replayed ones.
        self._ready: set[int] = set()
        self._stream_partition: dict[str, int | None] = {}
        # Bumped each time a partition's state is dropped (revoked, rebuilt, taken over).
        self._generation: dict[int | None, int] = {}
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
        # Handler state changes one at a time: a batch being handled never sees its
        # partition revoked or rebuilt under it by the heartbeat.
        self._state_lock = asyncio.Lock()

    # -- names ---------------------------------------------------------------------

    def stream(self, hop: str, partition: int | None = None) -> str:
        """Stream name of a hop (partition) in this worker's namespace."""
        return names.stream_name(hop, partition, ns=self.broker.namespace)

    @property
    def _partition_count(self) -> int:
        frames = names.FRAMES in self.handler.inputs
        bounds = self.settings.broker
        return bounds.frame_partitions if frames else bounds.fuse_partitions

    def input_streams(self) -> list[str]:
        """The streams this worker reads now (owned partitions only, when partitioned)."""
        if not self.handler.partitioned:
            return [self.stream(hop) for hop in self.handler.inputs]
        if not self._leases_fresh():
            return []
        return [self.stream(hop, p) for p in sorted(self._ready) for hop in self.handler.inputs]

    def _leases_fresh(self) -> bool:
        """False when a partitioned worker may have lost its leases since it last renewed
        them (it stalled past the TTL): it then reads, handles and publishes nothing for
        its partitions until the heartbeat has refreshed them (and found which are lost)."""
        return self._partitions is None or self._partitions.fresh()

    # -- lifecycle -----------------------------------------------------------------

    def stop(self) -> None:
        """Ask the worker to stop: no new reads, in-flight work finishes within the grace."""
        self.stopping = True
        self._stop_event.set()

    async def run(self) -> None:
        """Start the handler and run until ``stop()`` (or, in burst mode, until drained)."""
        self.handler.publisher = _Publisher(self)
        await self.handler.start()
        await self._wait_for_broker(self._join_broker)
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
            await self._drain(tasks)
        finally:
            stopped.cancel()
            self._beating = False
            await _cancel_all([beat], self.consumer)
            await self._shutdown()
        if self.failure is not None:
            message = f"worker {self.consumer} stopped: {self.failure!r}"
            raise WorkerFailed(message) from self.failure

    async def _join_broker(self) -> None:
        """Create the input groups, or take partitions (their leases and replays)."""
        for hop in self.handler.inputs:
            if not self.handler.partitioned:
                await self.broker.ensure_group(self.stream(hop), self.group)
        if self.handler.partitioned:
            if self._partitions is None:
                self._partitions = PartitionManager(
                    self.broker,
                    self.group,
                    self.consumer,
                    self._partition_count,
                    self.settings.broker.lease_ttl_ms,
                )
            await self._refresh_partitions()

    async def _wait_for_broker(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run ``step``; while the broker is unreachable, try again after a growing delay,
        logged each time, for up to ``worker.start_wait_s`` (then its error is raised)."""
        delay, waited = START_RETRY_S, 0.0
        while True:
            try:
                await step()
                return
            except BrokerConnectionError as exc:
                if self.stopping or waited >= self.settings.worker.start_wait_s:
                    raise
                log.warning("worker %s: broker not reachable at start (%s); trying again in %.1f s", self.consumer, exc, delay)
                await asyncio.sleep(delay)
                waited += delay
                delay = min(delay * 2, START_RETRY_MAX_S)

    def _task_ended(self, task: asyncio.Task) -> None:
        """Record why one of our tasks ended while the worker ran, and stop."""
        exc = None if task.cancelled() else task.exception()
        self.failure = exc or RuntimeError(f"task {task.get_name()} ended")
        log.error("worker %s: task %s ended unexpectedly; stopping", self.consumer, task.get_name(), exc_info=exc)
        self.stop()

    async def _drain(self, tasks: list[asyncio.Task]) -> None:
        # Readers stop at once; processors get the grace period to finish their batch.
        tasks[0].cancel()
        deadline = time.monotonic() + self.settings.worker.grace_s
        while (self._busy or not self._queue.empty()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await _cancel_all(tasks, self.consumer)
        left = []  # batches read but never handled: their entries stay pending (reclaimed)
        while not self._queue.empty():
            left.append(self._queue.get_nowait()[1])
        if left:
            await _cancel_all(left, self.consumer)

    async def _shutdown(self) -> None:
        with contextlib.suppress(Exception):
            await self.handler.stop()
        if self._partitions is not None:
            with contextlib.suppress(Exception):
                await self._partitions.stop()
        log.info("worker %s stopped: %s", self.consumer, self.counts)

    # -- reading -------------------------------------------------------------------

    async def _read_loop(self) -> None:
        idle_rounds = 0
        while not self.stopping:
            if self._slots is not None:
                await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BrokerConnectionError as exc:
                self._release_slot()
                log.warning("worker %s: broker unreachable (%s); retrying", self.consumer, exc)
                await self._drop_partitions()
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

    async def _prepare(self, batch: list[Delivery]) -> None:
        try:
            await self.handler.prepare(batch)
        except Exception as exc:  # prepare is best effort; handle() sees the failure again
            log.warning("worker %s: prepare failed: %r", self.consumer, exc)

    async def _drop_partitions(self) -> None:
        """After a failed read, hand every owned partition to the heartbeat to take over again.

        A read whose reply was lost (the connection dropped after Redis ran it) delivered
        entries that this worker never saw; later reads skip them. A partitioned stage
        must not go on without them, so it drops its partitions' state and the next beat
        takes each over again: claiming all its pending entries, those included, in order.
        """
        if self._partitions is None:
            return
        async with self._state_lock:
            for partition in sorted(self._ready):
                await self._drop_state(partition)

    async def _on_idle(self, idle_rounds: int) -> None:
        if self._queue.empty() and not self._busy and self._leases_fresh():
            async with self._state_lock:
                result = await self.handler.tick()
                if result.outputs or result.ack or result.failed:
                    await self._finish([], result)
        if self.burst and idle_rounds >= 3 and not self._held and self._queue.empty() and not self._busy:
            self.stop()
        if not self.input_streams():
            await asyncio.sleep(self.settings.worker.max_wait_ms / 1000)

    async def _next_batch(self) -> list[Delivery]:
        """Up to ``batch_size`` entries: replayed ones first, then new ones until full or
        until ``max_wait_ms`` after the first arrived (a stream muxer's size-or-timeout)."""
        size = self.settings.worker.batch_size
        wait_s = self.settings.worker.max_wait_ms / 1000
        if not self._leases_fresh():
            return []
        batch = self._take_replay(size)
        try:
            return self._cut(await self._fill(batch, size, wait_s))
        except BaseException:
            # Replayed (or accepted) deliveries taken into this batch are held: a failed read
            # must not drop them, or they stay touched and unhandled for good. Back in front.
            self._replay = batch + self._replay
            raise

    async def _fill(self, batch: list[Delivery], size: int, wait_s: float) -> list[Delivery]:
        """Add new entries to ``batch`` (in place) until full or the muxer's timeout."""
        deadline = time.monotonic() + wait_s if batch else None
        while len(batch) < size and not self.stopping:
            streams = self.input_streams()
            if not streams:
                break
            if deadline is None:
                block_ms = max(1, int(wait_s * 1000)) if self.burst else 1000
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                block_ms = max(1, int(remaining * 1000))
            generations = dict(self._generation)
            entries = await self.broker.read(
                self.group, self.consumer, streams, count=size - len(batch), block_ms=block_ms
            )
            if not entries:
                if deadline is None:
                    break  # nothing came within a poll: let the loop tick
                continue
            batch += self._behind_replays(await self._accept(entries), generations)
            if deadline is None:
                deadline = time.monotonic() + wait_s
            batch += self._take_replay(size - len(batch))
        return batch

    def _cut(self, batch: list[Delivery]) -> list[Delivery]:
        size = self.settings.worker.batch_size
        # A read over many streams may bring up to ``size`` from each: keep batches at the
        # bound (fixed shapes for the GPU) and hand the rest over first next time. Older
        # entries of a partition are never behind them: those were taken first.
        batch, extra = batch[:size], batch[size:]
        self._replay += extra
        return batch

    def _behind_replays(self, accepted: list[Delivery], generations: dict[int | None, int]) -> list[Delivery]:
        """New entries of a partition rebuilt or taken over while the read was in flight
        go behind that partition's replay (older entries, queued meanwhile), never ahead
        of it; the others join the batch."""
        moved = [d for d in accepted if self._generation.get(d.partition, 0) != generations.get(d.partition, 0)]
        if not moved:
            return accepted
        self._replay += moved
        return [d for d in accepted if self._generation.get(d.partition, 0) == generations.get(d.partition, 0)]

    def _current(self, delivery: Delivery) -> bool:
        """False for a delivery whose partition was revoked or rebuilt since it was read."""
        return self._held.get(_key(delivery)) is delivery

    def _take_replay(self, limit: int) -> list[Delivery]:
        taken, self._replay = self._replay[:limit], self._replay[limit:]
        return taken

    async def _accept(self, entries: Sequence[Entry], *, taking_over: bool = False) -> list[Delivery]:
        """Decode entries; dead-letter the ones that do not decode or are not accepted."""
        deliveries = []
        for entry in entries:
            partition = self._partition_of(entry.stream)
            if self._partitions is not None and not taking_over and partition not in self._ready:
                continue  # revoked while this read was in flight; reclaimed by its owner
            if entry.problem is not None:
                await self._dead_letter_unread(entry, f"unreadable entry: {entry.problem}")
                continue
            try:
                message = codec.decode(entry.data, self.handler.accepts or None)
            except DecodeError as exc:
                await self._dead_letter_unread(entry, f"undecodable entry: {exc.reason}")
                continue
            delivery = Delivery(entry, message, partition)
            self._held[(entry.stream, entry.id)] = delivery
            deliveries.append(delivery)
        metrics.ENTRIES_IN.labels(self.group).inc(len(deliveries))
        self.counts["in"] += len(deliveries)
        return deliveries

    async def _dead_letter_unread(self, entry: Entry, error: str) -> None:
        """Dead-letter an entry no handler will see. When the broker drops meanwhile, the
        entry stays pending and unheld (so it goes idle and is reclaimed), and the entries
        accepted before it in the same read are still handed over."""
        try:
            await self._dead_letter(entry, error)
        except BrokerConnectionError as exc:
            log.warning("worker %s: could not dead-letter %s %s (%s); left pending", self.consumer, entry.stream, entry.id, exc)

    def _partition_of(self, stream: str) -> int | None:
        if stream not in self._stream_partition:
            partition = None
            if self.handler.partitioned:
                partition = names.stream_partition(stream)
            self._stream_partition[stream] = partition
        return self._stream_partition[stream]

    # -- processing ----------------------------------------------------------------

    async def _process_loop(self) -> None:
        while True:
            batch, preparing = await self._queue.get()
            self._busy += 1
            try:
                await preparing
                await self._process(batch)
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
        """Try again what a dropped connection cut short (nothing unacked is lost).

        The handler may have moved on without its outputs or acks reaching the broker: a
        partitioned stage rebuilds every partition it owns from the entries it holds; a
        stateless one queues the batch's unacked entries again. Deliveries are not
        counted: the broker failed, not the entries.
        """
        await asyncio.sleep(RECONNECT_DELAY_S)
        if self.handler.partitioned:
            async with self._state_lock:
                for partition in sorted(self._ready):
                    await self._rebuild(partition)
        else:
            self._replay += [d for d in batch if self._current(d)]

    async def _process(self, batch: list[Delivery]) -> None:
        if self.handler.partitioned:
            async with self._state_lock:
                await self._process_current(batch)
        else:
            await self._process_current(batch)

    async def _process_current(self, batch: list[Delivery]) -> None:
        batch = [d for d in batch if self._current(d)]
        if not batch:
            return
        started = time.perf_counter()
        try:
            result = await self.handler.handle(batch)
        except BrokerConnectionError:
            raise  # not the entries' fault: the whole batch is tried again (_recover)
        except Exception as exc:
            log.exception("worker %s: stage failed on a batch of %d", self.consumer, len(batch))
            result = await self._one_by_one(batch, exc)
        metrics.STAGE_SECONDS.labels(self.group).observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.labels(self.group).observe(len(batch))
        if not self._leases_fresh():
            # Stalled past the leases while handling (or before): another worker may own
            # these partitions now and be replaying the same entries. Publish and ack
            # nothing; the state this batch changed is dropped, and the next beat takes
            # each partition over again from its pending entries if it is still ours.
            for partition in sorted({d.partition for d in batch}):
                await self._drop_state(partition)
            return
        await self._finish(batch, result)

    async def _one_by_one(self, batch: list[Delivery], error: Exception) -> BatchResult:
        """After an unexpected error on a batch, find the entries that caused it.

        A stateless stage handles each entry again, alone (its outputs are idempotent, by
        dedupe key), so one bad entry fails alone with its own error. A stateful one cannot
        (its state took part of the batch): all its entries fail, and ``_rebuild`` replays
        them, each counted one more delivery.
        """
        if self.handler.partitioned or len(batch) == 1:
            return BatchResult(ack=[], failed=[(d, error) for d in batch])
        result = BatchResult(ack=[])
        for delivery in batch:
            try:
                alone = await self.handler.handle([delivery])
            except BrokerConnectionError:
                raise
            except Exception as exc:
                log.warning("worker %s: %s %s fails alone: %r", self.consumer, delivery.entry.stream, delivery.entry.id, exc)
                result.failed.append((delivery, exc))
                continue
            result.outputs += alone.outputs
            result.ack += [delivery] if alone.ack is None else alone.ack
            result.failed += alone.failed
        return result

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
        failed_keys = {_key(d) for d, _ in result.failed}
        to_ack = batch if result.ack is None else result.ack
        to_ack = [d for d in to_ack if _key(d) not in failed_keys]
        if to_ack:
            await self.broker.ack(self.group, [d.entry for d in to_ack])
            for delivery in to_ack:
                self._held.pop(_key(delivery), None)
        retry: dict[int, list[Delivery]] = {}
        for delivery, exc in result.failed:
            if await self._fail(delivery, exc) and delivery.partition is not None:
                retry.setdefault(delivery.partition, []).append(delivery)
        for partition, failed in sorted(retry.items()):
            await self._rebuild(partition, failed)

    async def _fail(self, delivery: Delivery, exc: BaseException) -> bool:
        """Dead-letter a failed entry, or leave it for another try; True when it is retried."""
        entry = delivery.entry
        reason = type(exc).__name__
        metrics.ENTRIES_FAILED.labels(self.group, reason).inc()
        self.counts["failed"] += 1
        self._held.pop(_key(delivery), None)
        error = f"{reason}: {exc}"
        context = self._context(entry, getattr(delivery.message, "drive_id", None))
        if isinstance(exc, InputError) or entry.deliveries >= self.settings.broker.max_deliveries:
            await self._dead_letter(entry, error, context)
            return False
        log.info("worker %s: %s %s failed, left for redelivery: %s", self.consumer, entry.stream, entry.id, error, extra=context)
        # Left pending: redelivered with a higher count. Keep the reason for the dead
        # letter, in case the next try is the last.
        await self.broker.record_error(self.group, entry, error)
        return True

    def _context(self, entry: Entry, drive: str | None = None) -> dict[str, object]:
        """Log fields that say where a record comes from (JSON logs write them as keys)."""
        return {"stage": self.group, "consumer": self.consumer, "stream": entry.stream, "entry": entry.id, "drive": drive}

    async def _dead_letter(self, entry: Entry, error: str, context: dict[str, object] | None = None) -> None:
        await self.broker.dead_letter(self.group, entry, error, consumer=self.consumer)
        metrics.DEAD_LETTERS.labels(self.group).inc()
        self.counts["dead"] += 1
        context = context or self._context(entry)
        log.warning("worker %s: dead-lettered %s %s: %s", self.consumer, entry.stream, entry.id, error, extra=context)
        await self._after_dead_letter(entry, error)

    async def _after_dead_letter(self, entry: Entry, error: str) -> None:
        # Let the stage tell downstream not to wait for what this entry would have given
        # (ingest ends the drive), so nobody waits on a timeout for it.
        try:
            message = codec.decode(entry.data, self.handler.accepts or None)
        except DecodeError:
            return
        await self.publish(await self.handler.dead_lettered(message, error))

    async def publish(self, outputs: Sequence[Output]) -> None:
        """Encode and publish outputs in one round trip (idempotent by dedupe key)."""
        if not outputs:
            return
        items = [Publish(self.stream(o.hop, o.partition), codec.encode(o.message), o.dedupe_key) for o in outputs]
        await self.broker.publish_many(items)
        # Only hops a stage is meant to read: verdicts and drive markers are the output
        # users read by range, never capped.
        self._outputs.update(item.stream for o, item in zip(outputs, items, strict=True) if o.hop in HOP_CONSUMER)
        metrics.ENTRIES_OUT.labels(self.group).inc(len(items))
        self.counts["out"] += len(items)

    # -- partitions, reclaiming, health -------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.worker.heartbeat_s
        if self.handler.partitioned:
            interval = min(interval, self.settings.broker.lease_ttl_ms / 3000)
        touch_every = self.settings.broker.claim_idle_ms / 3000
        reclaim_every = self.settings.worker.reclaim_interval_s
        trim_every = self.settings.worker.trim_interval_s
        last_touch = last_reclaim = last_trim = time.monotonic()
        # A flag, not only cancellation: redis-py can turn a cancel that lands mid-command
        # into a connection error, which this loop survives on purpose.
        while self._beating:
            await asyncio.sleep(min(interval, touch_every))
            try:
                now = time.monotonic()
                if self._partitions is not None:
                    await self._refresh_partitions()
                if now - last_touch >= touch_every:
                    await self._touch_held()
                    last_touch = now
                if now - last_reclaim >= reclaim_every:
                    await self._reclaim()
                    last_reclaim = now
                if trim_every > 0 and now - last_trim >= trim_every:
                    await self._trim()
                    last_trim = now
                await self._record_health()
                self.last_beat = time.monotonic()
            except BrokerConnectionError as exc:
                log.warning("worker %s: heartbeat failed (%s)", self.consumer, exc)
            # Anything else ends the heartbeat, and so the worker (see ``run``): a beat
            # that fails each time would leave held entries touched and never reclaimed.

    async def _refresh_partitions(self) -> None:
        # Leases are renewed outside the lock, so a long batch cannot let them lapse. Surplus
        # ones are given back only under it, once no batch of theirs is being handled:
        # the next owner then claims only what this worker has not published and acked.
        assigned, revoked = await self._partitions.refresh(release_surplus=False)
        metrics.PARTITIONS_OWNED.labels(self.group, self.consumer).set(len(self._partitions.owned))
        for partition in revoked:  # its lag is exported by its new owner now
            for hop in self.handler.inputs:
                with contextlib.suppress(KeyError):
                    metrics.GROUP_LAG.remove(self.group, self.stream(hop, partition))
                    metrics.GROUP_PENDING.remove(self.group, self.stream(hop, partition))
        # A takeover that a dropped connection cut short is done again on a later beat.
        unready = self._partitions.owned - self._ready
        if not (assigned or revoked or unready):
            return
        async with self._state_lock:
            for partition in sorted(revoked):
                await self._drop_state(partition)
            await self._partitions.release(revoked)  # lost ones are another's: left alone
            for partition in sorted(assigned | unready):
                await self._take_over(partition)

    async def _drop_state(self, partition: int) -> None:
        """Drop what the handler and this worker hold of a partition (its entries stay pending)."""
        await self.handler.revoked(partition)
        self._forget_partition(partition)

    def _forget_partition(self, partition: int) -> None:
        self._generation[partition] = self._generation.get(partition, 0) + 1
        self._ready.discard(partition)
        self._held = {k: d for k, d in self._held.items() if d.partition != partition}
        self._replay = [d for d in self._replay if d.partition != partition]

    async def _take_over(self, partition: int) -> None:
        """Claim every pending entry of a partition and replay them, oldest first."""
        await self.handler.assigned(partition)
        try:
            for hop in self.handler.inputs:
                stream = self.stream(hop, partition)
                await self.broker.ensure_group(stream, self.group)
                # A takeover is no failed delivery: keep the counters as they were.
                claimed = await self._claim_all(stream, min_idle_ms=0, count_delivery=False)
                if claimed:
                    metrics.RECLAIMED.labels(self.group).inc(len(claimed))
                    self._replay += await self._accept(sorted(claimed, key=lambda e: e.order), taking_over=True)
        except BrokerConnectionError:
            # Half a replay would rebuild half a state: drop it, claim it all next beat.
            await self._drop_state(partition)
            raise
        self._ready.add(partition)

    async def _rebuild(self, partition: int, failed: Sequence[Delivery] = (), claimed: Sequence[Delivery] = ()) -> None:
        """Rebuild a partition's state by replaying, in order, what it holds.

        Held entries are replayed from memory with their delivery count unchanged; failed
        ones count one more delivery, so a poison entry is dead-lettered in the end while
        its innocent neighbours are not. New ``Delivery`` objects replace the old ones, so
        a batch already queued with the old ones skips them (see ``_current``).
        """
        failed_keys = {_key(d) for d in failed}
        pending = [d for d in self._held.values() if d.partition == partition and _key(d) not in failed_keys]
        pending += [Delivery(replace(d.entry, deliveries=d.entry.deliveries + 1), d.message, partition) for d in failed]
        pending += list(claimed)
        await self._drop_state(partition)
        if self._partitions is None or partition not in self._partitions.owned:
            return  # no longer ours: its new owner replays it
        await self.handler.assigned(partition)
        self._ready.add(partition)
        replay = []
        for delivery in sorted(pending, key=lambda d: d.entry.order):
            fresh = Delivery(delivery.entry, delivery.message, partition)
            self._held[_key(fresh)] = fresh
            replay.append(fresh)
        self._replay = replay + self._replay

    async def _claim_all(self, stream: str, *, min_idle_ms: int, count_delivery: bool = True) -> list[Entry]:
        entries = await self.broker.claim_all(
            self.group, self.consumer, stream, min_idle_ms=min_idle_ms, count_delivery=count_delivery
        )
        # An entry this worker still holds went idle (a touch came late): it stays held.
        return await self._dead_letter_exhausted([e for e in entries if (e.stream, e.id) not in self._held])

    async def _dead_letter_exhausted(self, entries: list[Entry]) -> list[Entry]:
        keep = []
        for entry in entries:
            if entry.deliveries > self.settings.broker.max_deliveries:
                last = await self.broker.last_error(self.group, entry)
                reason = last or "no worker finished it (crashed or timed out)"
                await self._dead_letter(entry, f"failed {entry.deliveries - 1} deliveries; last: {reason}")
            else:
                keep.append(entry)
        return keep

    async def _touch_held(self) -> None:
        by_stream: dict[str, list[Entry]] = {}
        for delivery in list(self._held.values()):
            by_stream.setdefault(delivery.entry.stream, []).append(delivery.entry)
        for entries in by_stream.values():
            await self.broker.touch(self.group, self.consumer, entries)

    async def _reclaim(self) -> None:
        """Take over entries that went idle: their consumer died or gave up."""
        streams = self.input_streams()
        for stream in streams:
            claimed = await self._claim_all(stream, min_idle_ms=self.settings.broker.claim_idle_ms)
            if claimed:
                log.info("worker %s: reclaimed %d entries of %s", self.consumer, len(claimed), stream)
                metrics.RECLAIMED.labels(self.group).inc(len(claimed))
                accepted = await self._accept(sorted(claimed, key=lambda e: e.order))
                if self.handler.partitioned:
                    # Late entries of a partition must not reach its state out of order.
                    async with self._state_lock:
                        for partition in sorted({d.partition for d in accepted}):
                            mine = [d for d in accepted if d.partition == partition]
                            for delivery in mine:
                                self._held.pop(_key(delivery), None)
                            await self._rebuild(partition, claimed=mine)
                else:
                    self._replay += accepted
        await self._export_lag(streams)

    async def _trim(self) -> None:
        """Trim what this worker reads below what every group acknowledged (``Broker.trim``
        keeps anything pending or unread), and cap the stage hops it writes that no group
        reads (segments while vera is off), which would otherwise grow without bound."""
        for stream in self.input_streams():
            self.counts["trimmed"] += await self.broker.trim(stream)
        cap = self.settings.broker.ungrouped_cap
        for stream in sorted(self._outputs):
            self.counts["trimmed"] += await self.broker.cap(stream, cap)

    async def _export_lag(self, streams: list[str]) -> None:
        for stream in streams:
            stats = await self.broker.stats(stream)
            group = stats.group(self.group)
            metrics.GROUP_LAG.labels(self.group, stream).set(group.lag if group else stats.length)
            metrics.GROUP_PENDING.labels(self.group, stream).set(group.pending if group else 0)

    async def _record_health(self) -> None:
        record = {
            "consumer": self.consumer,
            "group": self.group,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "at": time.time(),
            "counts": self.counts,
            "held": len(self._held),
            "partitions": sorted(self._partitions.owned) if self._partitions else None,
        }
        ttl_ms = int(max(3 * self.settings.worker.heartbeat_s, 3) * 1000)
        key = names.health_name(self.group, self.consumer, ns=self.broker.namespace)
        await self.broker.put_value(key, json.dumps(record).encode(), ttl_ms=ttl_ms)

    def live(self) -> bool:
        """Whether the heartbeat ran recently and no task of the worker failed (the liveness probe)."""
        return self.failure is None and time.monotonic() - self.last_beat < 3 * max(self.settings.worker.heartbeat_s, 1)

    def ready(self) -> bool:
        """Whether the worker started and is taking work (the readiness probe)."""
        return self.started and not self.stopping and self.live()


#: Longest wait for a cancelled task to end before shutdown goes on without it.
CANCEL_WAIT_S = 5.0


async def _cancel_all(tasks: list[asyncio.Task], consumer: str) -> None:
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


def _key(delivery: Delivery) -> tuple[str, str]:
    return delivery.entry.stream, delivery.entry.id

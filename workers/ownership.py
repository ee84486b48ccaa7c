"""What a worker holds and replays: partition ownership, take-over, rebuild, ordered replay.

``Ownership`` keeps the runtime's delivery state apart from its read, process and
heartbeat loops (``workers.runtime.Worker``), after dramatiq's split of its worker into
consumer and worker threads. It never calls the broker itself: leases come from a
``brokers.partitions.PartitionManager`` (or anything with its ``refresh``/``release``/
``fresh``/``owned``), and a take-over gets the claimed deliveries from a function the
runtime passes in. So it is tested with a stub handler and stub leases (tests/test_ownership.py).

The rules it keeps:

* **Held**: every delivery read and not yet acknowledged or failed is held, so the
  heartbeat touches it; acknowledging one *releases* it (``release``).
* **Ordered replay**: claimed entries of a partition taken over are queued, oldest first,
  before the partition is read (only *ready* partitions are read), so no new entry of a
  partition overtakes its replayed ones.
* **Rebuild**: a partition whose state may be wrong (a failed batch, late entries, a
  dropped connection) is dropped and rebuilt from what it holds, in order; failed entries
  count one more delivery, so a poison entry is dead-lettered in the end while its
  innocent neighbours are not.
* **Staleness**: new ``Delivery`` objects replace the old ones on a rebuild, so a batch
  queued with the old ones skips them (``current``); entries read while their partition
  was rebuilt go behind its replay (``behind_replays``, by the generation counter).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Protocol

from brokers.base import Entry
from stream import names
from stream.errors import BrokerConnectionError
from workers.handler import Delivery, Handler

#: A delivery's key: (stream, entry id).
Key = tuple[str, str]
#: Claims a stream's pending entries for a take-over and returns them accepted (decoded).
Claim = Callable[[str], Awaitable[list[Delivery]]]


class PartitionLeases(Protocol):
    """What ``Ownership`` needs of ``brokers.partitions.PartitionManager``."""

    owned: set[int]

    def fresh(self) -> bool: ...

    def fresh_s(self) -> float: ...

    async def refresh(self, *, release_surplus: bool = True) -> tuple[set[int], set[int]]: ...

    async def release(self, partitions: set[int]) -> None: ...

    async def stop(self) -> None: ...


def key(delivery: Delivery) -> Key:
    """The (stream, entry id) of a delivery."""
    return delivery.entry.stream, delivery.entry.id


class Ownership:
    """The deliveries one worker holds and replays, and the partitions it owns.

    Parameters:
        handler: the stage binding (its ``assigned``/``revoked`` are called here).
        stream: ``(hop, partition) -> stream name`` in the worker's namespace.
        leases: partition leases; ``None`` for a stage that is not partitioned (set later
            with ``own`` once the broker is reachable).
    """

    def __init__(
        self, handler: Handler, stream: Callable[[str, int | None], str], leases: PartitionLeases | None = None
    ) -> None:
        self.handler = handler
        self.leases = leases
        self._stream = stream
        self.held: dict[Key, Delivery] = {}
        self.replay: list[Delivery] = []  # claimed or put-back deliveries, handed over before new reads
        # Owned partitions whose pending entries are already queued for replay: only
        # these are read, so no new entry of a partition overtakes its replayed ones.
        self.ready: set[int] = set()
        # Bumped each time a partition's state is dropped (revoked, rebuilt, taken over).
        self.generation: dict[int | None, int] = {}
        self._stream_partition: dict[str, int | None] = {}
        # Partitions each read in flight may deliver entries of (see ``settle_reads``).
        self._reads: dict[object, set[int | None]] = {}
        # Handler state changes one at a time: a batch being handled never sees its
        # partition revoked or rebuilt under it by the heartbeat.
        self.lock = asyncio.Lock()

    # -- what is read ----------------------------------------------------------------

    def fresh(self) -> bool:
        """False when a partitioned worker may have lost its leases since it last renewed
        them (it stalled past the TTL): it then reads, handles and publishes nothing for
        its partitions until the heartbeat has refreshed them (and found which are lost)."""
        return self.leases is None or self.leases.fresh()

    def streams(self) -> list[str]:
        """The streams to read now (owned, ready partitions only, when partitioned)."""
        if not self.handler.partitioned:
            return [self._stream(hop, None) for hop in self.handler.inputs]
        if not self.fresh():
            return []
        return [self._stream(hop, p) for p in sorted(self.ready) for hop in self.handler.inputs]

    def block_ms(self, block_ms: int) -> int:
        """How long a read may block: never past the time the leases are fresh, so a read
        of a worker that stalls cannot deliver entries after its leases expired and a new
        owner claimed the partition (the new owner would read past them: out of order)."""
        if not self.handler.partitioned or self.leases is None:
            return block_ms
        return max(1, min(block_ms, int(self.leases.fresh_s() * 1000)))

    def reading(self, streams: Sequence[str]) -> object:
        """Note a read of ``streams`` starting; pass the token to ``read_done``."""
        token = object()
        self._reads[token] = {self.partition_of(s) for s in streams}
        return token

    def read_done(self, token: object) -> None:
        """Note a read ended (with or without entries)."""
        self._reads.pop(token, None)

    async def settle_reads(self, partitions: set[int], timeout_s: float = 5.0) -> bool:
        """Wait until no read in flight may still deliver entries of ``partitions``.

        A blocked read issued while they were ours would take entries published after a
        new owner claimed the partition's pending ones; the new owner would read past them
        and get them only when they were reclaimed, after later entries (out of order).

        Returns:
            False when reads were still in flight after ``timeout_s``.
        """
        deadline = asyncio.get_running_loop().time() + timeout_s
        while any(covered & partitions for covered in self._reads.values()):
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def partition_of(self, stream: str) -> int | None:
        """The partition a stream belongs to (``None`` when not partitioned)."""
        if stream not in self._stream_partition:
            partition = names.stream_partition(stream) if self.handler.partitioned else None
            self._stream_partition[stream] = partition
        return self._stream_partition[stream]

    def admits(self, partition: int | None) -> bool:
        """False for an entry of a partition revoked while its read was in flight."""
        return self.leases is None or partition in self.ready

    # -- held deliveries ---------------------------------------------------------------

    def hold(self, entry: Entry, message: object, partition: int | None) -> Delivery:
        """A new delivery, held until released (acknowledged) or failed."""
        delivery = Delivery(entry, message, partition)
        self.held[key(delivery)] = delivery
        return delivery

    def release(self, deliveries: Sequence[Delivery]) -> None:
        """Stop holding deliveries (acknowledged, or failed)."""
        for delivery in deliveries:
            self.held.pop(key(delivery), None)

    def holds(self, entry: Entry) -> bool:
        """Whether an entry is held by this worker."""
        return (entry.stream, entry.id) in self.held

    def current(self, delivery: Delivery) -> bool:
        """False for a delivery whose partition was revoked or rebuilt since it was read."""
        return self.held.get(key(delivery)) is delivery

    def by_stream(self) -> dict[str, list[Entry]]:
        """The held entries of each stream (to touch them)."""
        grouped: dict[str, list[Entry]] = {}
        for delivery in list(self.held.values()):
            grouped.setdefault(delivery.entry.stream, []).append(delivery.entry)
        return grouped

    # -- the replay queue ----------------------------------------------------------------

    def take(self, limit: int) -> list[Delivery]:
        """Up to ``limit`` queued deliveries, oldest first."""
        taken, self.replay = self.replay[:limit], self.replay[limit:]
        return taken

    def put_back(self, deliveries: list[Delivery]) -> None:
        """Queue deliveries again in front (taken into a batch that was never handed over)."""
        self.replay = deliveries + self.replay

    def queue(self, deliveries: Sequence[Delivery]) -> None:
        """Queue deliveries behind those already queued."""
        self.replay += deliveries

    def requeue(self, batch: Sequence[Delivery]) -> None:
        """Queue a stateless batch's deliveries that are still current (after a dropped connection)."""
        self.replay += [d for d in batch if self.current(d)]

    def generations(self) -> dict[int | None, int]:
        """A snapshot of the generation counters, taken before a read (see ``behind_replays``)."""
        return dict(self.generation)

    def behind_replays(self, accepted: list[Delivery], before: dict[int | None, int]) -> list[Delivery]:
        """New entries of a partition rebuilt or taken over while the read was in flight
        go behind that partition's replay (older entries, queued meanwhile), never ahead
        of it; the others are returned, to join the batch."""
        moved = [d for d in accepted if self.generation.get(d.partition, 0) != before.get(d.partition, 0)]
        if not moved:
            return accepted
        self.replay += moved
        return [d for d in accepted if self.generation.get(d.partition, 0) == before.get(d.partition, 0)]

    # -- partitions ----------------------------------------------------------------------

    async def refresh(self, claim: Claim) -> set[int]:
        """Renew leases, drop revoked partitions, take over new (and unfinished) ones.

        Leases are renewed outside the lock, so a long batch cannot let them lapse. Surplus
        ones are given back only under it, once no batch of theirs is being handled: the
        next owner then claims only what this worker has not published and acked.

        Returns:
            The partitions revoked.
        """
        assert self.leases is not None
        assigned, revoked = await self.leases.refresh(release_surplus=False)
        # A takeover that a dropped connection cut short is done again on a later beat.
        unready = self.leases.owned - self.ready
        if not (assigned or revoked or unready):
            return revoked
        async with self.lock:
            for partition in sorted(revoked):
                await self.drop(partition)
            # Released while a read of them is in flight, they could be claimed by the next
            # owner before that read takes new entries; left to expire if it never ends.
            if revoked and await self.settle_reads(revoked):
                await self.leases.release(revoked)  # lost ones are another's: left alone
            for partition in sorted(assigned | unready):
                await self.take_over(partition, claim)
        return revoked

    async def take_over(self, partition: int, claim: Claim) -> None:
        """Claim every pending entry of a partition and queue them, oldest first."""
        await self.handler.assigned(partition)
        try:
            for hop in self.handler.inputs:
                # Claim first, then queue: ``self.replay += await …`` would read the list
                # before the claim's round trips and write it back after, undoing what
                # the reader took from it meanwhile (replaying those entries twice).
                claimed = await claim(self._stream(hop, partition))
                self.replay += claimed
        except BrokerConnectionError:
            # Half a replay would rebuild half a state: drop it, claim it all next beat.
            await self.drop(partition)
            raise
        self.ready.add(partition)

    async def drop(self, partition: int) -> None:
        """Drop what the handler and this worker hold of a partition (its entries stay pending)."""
        await self.handler.revoked(partition)
        self.forget(partition)

    def forget(self, partition: int) -> None:
        """Forget a partition's held and queued deliveries; make queued batches of it stale."""
        self.generation[partition] = self.generation.get(partition, 0) + 1
        self.ready.discard(partition)
        self.held = {k: d for k, d in self.held.items() if d.partition != partition}
        self.replay = [d for d in self.replay if d.partition != partition]

    async def drop_all(self) -> None:
        """Drop every ready partition's state; the next refresh takes each over again."""
        async with self.lock:
            for partition in sorted(self.ready):
                await self.drop(partition)

    async def rebuild(self, partition: int, failed: Sequence[Delivery] = (), claimed: Sequence[Delivery] = ()) -> None:
        """Rebuild a partition's state by replaying, in order, what it holds.

        Held entries are replayed with their delivery count unchanged; ``failed`` ones
        count one more delivery; ``claimed`` ones (reclaimed late) join them. New
        ``Delivery`` objects replace the old ones, so a batch already queued with the old
        ones skips them (see ``current``). Call it under ``lock``.
        """
        failed_keys = {key(d) for d in failed}
        pending = [d for d in self.held.values() if d.partition == partition and key(d) not in failed_keys]
        pending += [Delivery(replace(d.entry, deliveries=d.entry.deliveries + 1), d.message, partition) for d in failed]
        pending += list(claimed)
        await self.drop(partition)
        if self.leases is None or partition not in self.leases.owned:
            return  # no longer ours: its new owner replays it
        await self.handler.assigned(partition)
        self.ready.add(partition)
        replay = [self.hold(d.entry, d.message, partition) for d in sorted(pending, key=lambda d: d.entry.order)]
        self.replay = replay + self.replay

    async def rebuild_all(self) -> None:
        """Rebuild every ready partition (after a dropped connection cut a batch short)."""
        async with self.lock:
            for partition in sorted(self.ready):
                await self.rebuild(partition)

    async def recover(self, batch: Sequence[Delivery]) -> None:
        """Try again what a dropped connection cut short (nothing unacked is lost).

        The handler may have moved on without its outputs or acks reaching the broker: a
        partitioned stage rebuilds every partition it owns from the entries it holds; a
        stateless one queues the batch's unacked entries again. Deliveries are not
        counted: the broker failed, not the entries.
        """
        if self.handler.partitioned:
            await self.rebuild_all()
        else:
            self.requeue(batch)

    async def reclaimed(self, accepted: list[Delivery]) -> None:
        """Hand over entries reclaimed late: a partition's go through a rebuild (so they
        never reach its state out of order), a stateless stage's are queued."""
        if not self.handler.partitioned:
            self.replay += accepted
            return
        async with self.lock:
            for partition in sorted({d.partition for d in accepted}):
                mine = [d for d in accepted if d.partition == partition]
                self.release(mine)
                await self.rebuild(partition, claimed=mine)

    async def stop(self) -> None:
        """Give the leases back."""
        if self.leases is not None:
            await self.leases.stop()

"""The in-process broker: Redis Streams semantics without a Redis server.

``roadstream run`` uses it for a single-machine pipeline, so it is a real implementation
and the conformance suite holds it to the same behaviour as ``RedisBroker``: entry ids
like Redis's ``ms-seq``; per group a last-delivered id and a pending-entries list that
records consumer, delivery time and delivery count; idle times on ``time.monotonic()``;
leases, pools, values and dedupe keys that expire.

All state lives in a ``MemoryState`` that several ``MemoryBroker`` objects may share, so
several workers in one process (each with its own broker object and settings) see the
same streams. Every method runs without awaiting while it changes state, so on one event
loop no lock is needed; blocking reads wait on an ``asyncio.Condition`` that publishing
notifies.
"""

from __future__ import annotations

import asyncio
import bisect
import fnmatch
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from brokers.base import Broker, Entry, GroupStats, Publish, StreamStats
from brokers.blobs import DEFAULT_BLOB_TTL_S, BlobStore
from stream.names import DEFAULT_NAMESPACE, parse_entry_id
from stream.settings import BrokerSettings

Id = tuple[int, int]

#: Expired dedupe keys, values and blobs are swept out at most this often (seconds),
#: so a long single-machine run does not keep every frame it ever saw.
PRUNE_EVERY_S = 10.0


def format_id(entry_id: Id) -> str:
    """``(ms, seq)`` as Redis writes it."""
    return f"{entry_id[0]}-{entry_id[1]}"


@dataclass
class Pending:
    """A delivered, unacknowledged entry in a group's pending-entries list."""

    consumer: str
    delivered_at: float
    deliveries: int


@dataclass
class Group:
    """One consumer group of a stream."""

    last_delivered: Id = (0, 0)
    pel: dict[Id, Pending] = field(default_factory=dict)
    consumers: set[str] = field(default_factory=set)


@dataclass
class Stream:
    """Entries in id order and the stream's groups."""

    entries: dict[Id, bytes] = field(default_factory=dict)
    ids: list[Id] = field(default_factory=list)  # sorted, so reads and trims bisect
    last_id: Id = (0, 0)
    groups: dict[str, Group] = field(default_factory=dict)

    def add(self, entry_id: Id, data: bytes) -> None:
        """Append an entry (ids only grow)."""
        self.entries[entry_id] = data
        self.ids.append(entry_id)
        self.last_id = entry_id

    def after(self, entry_id: Id, limit: int | None = None) -> list[Id]:
        """Ids of entries newer than ``entry_id``, oldest first."""
        start = bisect.bisect_right(self.ids, entry_id)
        return self.ids[start : None if limit is None else start + limit]

    def count_after(self, entry_id: Id) -> int:
        """How many entries are newer than ``entry_id``."""
        return len(self.ids) - bisect.bisect_right(self.ids, entry_id)

    def delete(self, entry_id: Id) -> bool:
        """Remove one entry; ``False`` when it was not there."""
        if self.entries.pop(entry_id, None) is None:
            return False
        del self.ids[bisect.bisect_left(self.ids, entry_id)]
        return True

    def trim_below(self, min_id: Id) -> int:
        """Remove every entry older than ``min_id``; returns how many."""
        cut = bisect.bisect_left(self.ids, min_id)
        for entry_id in self.ids[:cut]:
            del self.entries[entry_id]
        del self.ids[:cut]
        return cut


@dataclass
class MemoryState:
    """Everything a memory broker holds; shared by the brokers of one process."""

    streams: dict[str, Stream] = field(default_factory=dict)
    dedupe: dict[tuple[str, str], tuple[Id, float]] = field(default_factory=dict)
    leases: dict[str, tuple[str, float]] = field(default_factory=dict)
    pools: dict[str, dict[str, float]] = field(default_factory=dict)
    values: dict[str, tuple[bytes, float | None]] = field(default_factory=dict)
    _condition: asyncio.Condition | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _pruned_at: float = 0.0

    def prune(self) -> None:
        """Forget expired dedupe keys and values, at most every ``PRUNE_EVERY_S``."""
        now = time.monotonic()
        if now - self._pruned_at < PRUNE_EVERY_S:
            return
        self._pruned_at = now
        self.dedupe = {k: v for k, v in self.dedupe.items() if v[1] > now}
        self.values = {k: v for k, v in self.values.items() if v[1] is None or v[1] > now}

    def condition(self) -> asyncio.Condition:
        """The condition publishers notify, bound to the running event loop.

        A new loop (each test has its own) gets a new condition: asyncio primitives
        may not cross loops.
        """
        loop = asyncio.get_running_loop()
        if self._condition is None or self._loop is not loop:
            self._condition, self._loop = asyncio.Condition(), loop
        return self._condition

    def next_id(self, stream: Stream) -> Id:
        """A new id after the stream's last one, from the wall clock like Redis."""
        ms = int(time.time() * 1000)
        last_ms, last_seq = stream.last_id
        return (ms, 0) if ms > last_ms else (last_ms, last_seq + 1)


class MemoryBroker(Broker):
    """The ``Broker`` in process.

    Parameters:
        namespace: prefix of the keys this broker makes itself.
        settings: transport bounds.
        state: the state to share with other brokers; a fresh one by default.
    """

    def __init__(
        self,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        settings: BrokerSettings | None = None,
        state: MemoryState | None = None,
    ) -> None:
        super().__init__(namespace=namespace, settings=settings)
        self.state = state if state is not None else MemoryState()

    def _stream(self, name: str) -> Stream:
        return self.state.streams.setdefault(name, Stream())

    def _group(self, stream: str, group: str) -> Group:
        return self._stream(stream).groups.setdefault(group, Group())

    # -- groups and publishing ----------------------------------------------------

    async def ensure_group(self, stream: str, group: str) -> None:
        """Create ``group`` on ``stream`` (and the stream) if missing; reads from the start."""
        self._group(stream, group)

    async def publish_many(self, items: Sequence[Publish]) -> list[str]:
        """Add entries in order; an item whose dedupe key is known gets the earlier id.

        Returns:
            The entry id of each item.
        """
        self.state.prune()
        ids = [format_id(self._add(item)) for item in items]
        if items:
            condition = self.state.condition()
            async with condition:
                condition.notify_all()
        return ids

    def _add(self, item: Publish) -> Id:
        now = time.monotonic()
        dedupe = (item.stream, item.dedupe_key) if item.dedupe_key is not None else None
        if dedupe is not None:
            seen = self.state.dedupe.get(dedupe)
            if seen is not None and seen[1] > now:
                return seen[0]
        stream = self._stream(item.stream)
        entry_id = self.state.next_id(stream)
        stream.add(entry_id, item.data)
        if dedupe is not None:
            self.state.dedupe[dedupe] = (entry_id, now + self.settings.dedupe_ttl_s)
        return entry_id

    # -- consuming ----------------------------------------------------------------

    async def read(
        self, group: str, consumer: str, streams: Sequence[str], *, count: int, block_ms: int
    ) -> list[Entry]:
        """Read up to ``count`` new entries (per stream) for ``consumer``.

        Blocks up to ``block_ms`` when none is there (0: do not block). Creates the group
        on streams that have none.
        """
        deadline = time.monotonic() + block_ms / 1000
        condition = self.state.condition()
        async with condition:
            while True:
                entries = [e for s in streams for e in self._deliver(group, consumer, s, count)]
                remaining = deadline - time.monotonic()
                if entries or remaining <= 0:
                    return entries
                try:
                    await asyncio.wait_for(condition.wait(), remaining)
                except TimeoutError:
                    return []

    def _deliver(self, group_name: str, consumer: str, stream_name: str, count: int) -> list[Entry]:
        stream = self._stream(stream_name)
        group = self._group(stream_name, group_name)
        group.consumers.add(consumer)
        now = time.monotonic()
        entries = []
        for entry_id in stream.after(group.last_delivered, count):
            group.pel[entry_id] = Pending(consumer, now, 1)
            group.last_delivered = entry_id
            entries.append(Entry(stream_name, format_id(entry_id), stream.entries[entry_id], 1))
        return entries

    async def ack(self, group: str, entries: Sequence[Entry]) -> int:
        """Acknowledge entries; returns how many were still pending."""
        acked = 0
        for entry in entries:
            stream = self.state.streams.get(entry.stream)
            pel = stream.groups[group].pel if stream and group in stream.groups else {}
            acked += pel.pop(parse_entry_id(entry.id), None) is not None
        return acked

    async def claim(
        self,
        group: str,
        consumer: str,
        stream: str,
        *,
        min_idle_ms: int,
        count: int,
        count_delivery: bool = True,
        start: str = "0-0",
    ) -> list[Entry]:
        """Take over entries pending longer than ``min_idle_ms`` (like XAUTOCLAIM), in id
        order from ``start`` on.

        Returned entries carry their delivery count including this delivery; entries
        deleted while pending are dropped from the pending list.
        """
        entries = self._stream(stream).entries
        state = self._group(stream, group)
        state.consumers.add(consumer)
        now = time.monotonic()
        claimed = []
        first = parse_entry_id(start)
        for entry_id, pending in sorted(state.pel.items(), key=lambda item: item[0]):
            if entry_id < first:
                continue
            if len(claimed) >= count:
                break
            if entry_id not in entries:
                del state.pel[entry_id]
            elif (now - pending.delivered_at) * 1000 >= min_idle_ms:
                pending.consumer, pending.delivered_at = consumer, now
                pending.deliveries += 1 if count_delivery else 0
                claimed.append(Entry(stream, format_id(entry_id), entries[entry_id], pending.deliveries))
        return claimed

    async def touch(self, group: str, consumer: str, entries: Sequence[Entry]) -> None:
        """Reset the idle time of entries still being worked on, without a delivery."""
        now = time.monotonic()
        for entry in entries:
            state = self._group(entry.stream, group)
            pending = state.pel.get(parse_entry_id(entry.id))
            if pending is not None:
                state.consumers.add(consumer)
                pending.consumer, pending.delivered_at = consumer, now

    # -- inspection and trimming --------------------------------------------------

    async def stats(self, stream: str) -> StreamStats:
        """Length, and per group: consumers, pending and lag."""
        state = self.state.streams.get(stream)
        if state is None:
            return StreamStats(stream, 0)
        groups = [
            GroupStats(
                name,
                len(g.consumers),
                len(g.pel),
                state.count_after(g.last_delivered),
                format_id(g.last_delivered),
            )
            for name, g in state.groups.items()
        ]
        return StreamStats(stream, len(state.entries), groups)

    async def trim(self, stream: str) -> int:
        """Remove entries every group has acknowledged; never a pending or unread one.

        Returns:
            How many entries were removed.
        """
        state = self.state.streams.get(stream)
        if state is None or not state.groups:
            return 0
        floors = [self._floor(state, g) for g in state.groups.values()]
        needed = [f for f in floors if f is not None]
        min_id = min(needed) if needed else (2**64, 0)
        return state.trim_below(min_id)

    async def cap(self, stream: str, max_len: int) -> int:
        """Keep the newest ``max_len`` entries of a stream that no group reads."""
        state = self.state.streams.get(stream)
        if state is None or state.groups or len(state.ids) <= max_len:
            return 0
        return state.trim_below(state.ids[len(state.ids) - max_len])

    @staticmethod
    def _floor(stream: Stream, group: Group) -> Id | None:
        candidates = [next(iter(group.pel))] if group.pel else []  # the PEL is in id order
        candidates += stream.after(group.last_delivered, 1)
        return min(candidates) if candidates else None

    async def streams(self, pattern: str = "*") -> list[str]:
        """Names of existing streams that match a glob pattern."""
        return sorted(n for n in self.state.streams if fnmatch.fnmatchcase(n, pattern))

    async def range(self, stream: str, *, start: str = "-", end: str = "+", count: int = 100) -> list[Entry]:
        """Entries between two ids (inclusive; ``(id`` excludes), without any group.

        Their ``deliveries`` is 0: reading a range delivers nothing to anyone.
        """
        state = self.state.streams.get(stream)
        if state is None:
            return []
        low, high = _bound(start, upper=False), _bound(end, upper=True)
        ids = [i for i in state.ids if low(i) and high(i)][:count]
        return [Entry(stream, format_id(i), state.entries[i], 0) for i in ids]

    async def delete_entries(self, stream: str, ids: Sequence[str]) -> int:
        """Delete entries by id (used by dead-letter requeue)."""
        state = self.state.streams.get(stream)
        if state is None:
            return 0
        return sum(state.delete(parse_entry_id(i)) for i in ids)

    # -- leases and pools ---------------------------------------------------------

    async def lease(self, name: str, owner: str, ttl_ms: int) -> bool:
        """Take or renew a lease; ``False`` when another owner holds it."""
        holder = await self.lease_owner(name)
        if holder not in (None, owner):
            return False
        self.state.leases[name] = (owner, time.monotonic() + ttl_ms / 1000)
        return True

    async def release(self, name: str, owner: str) -> bool:
        """Give a lease back; only its owner can."""
        if await self.lease_owner(name) != owner:
            return False
        del self.state.leases[name]
        return True

    async def lease_owner(self, name: str) -> str | None:
        """Who holds a lease now, if anyone."""
        held = self.state.leases.get(name)
        if held is None or held[1] <= time.monotonic():
            self.state.leases.pop(name, None)
            return None
        return held[0]

    async def join(self, pool: str, member: str, ttl_ms: int) -> None:
        """Say that ``member`` is alive in ``pool`` for the next ``ttl_ms``."""
        self.state.pools.setdefault(pool, {})[member] = time.monotonic() + ttl_ms / 1000

    async def leave(self, pool: str, member: str) -> None:
        """Remove a member from a pool at once."""
        self.state.pools.get(pool, {}).pop(member, None)

    async def members(self, pool: str) -> list[str]:
        """Live members of a pool, sorted (expired ones are pruned on the way)."""
        now = time.monotonic()
        live = {m: t for m, t in self.state.pools.get(pool, {}).items() if t > now}
        self.state.pools[pool] = live
        return sorted(live)

    # -- small values -------------------------------------------------------------

    async def put_value(self, key: str, value: bytes, ttl_ms: int | None = None) -> None:
        """Store a small value (health records, last errors)."""
        expires = None if ttl_ms is None else time.monotonic() + ttl_ms / 1000
        self.state.values[key] = (value, expires)

    async def get_value(self, key: str) -> bytes | None:
        """Read a small value, ``None`` when absent or expired."""
        held = self.state.values.get(key)
        if held is None or (held[1] is not None and held[1] <= time.monotonic()):
            self.state.values.pop(key, None)
            return None
        return held[0]

    async def keys(self, pattern: str) -> list[str]:
        """Names of live small values that match a glob pattern."""
        names = [k for k in list(self.state.values) if fnmatch.fnmatchcase(k, pattern)]
        return sorted([k for k in names if await self.get_value(k) is not None])

    async def close(self) -> None:
        """Nothing to release: the state outlives a broker that shares it."""


def _bound(text: str, *, upper: bool):  # noqa: ANN202 - a tiny predicate factory
    exclusive = text.startswith("(")
    bound = parse_entry_id(text.lstrip("("), upper=upper and not exclusive)
    if upper:
        return (lambda i: i < bound) if exclusive else (lambda i: i <= bound)
    return (lambda i: i > bound) if exclusive else (lambda i: i >= bound)


class MemoryBlobStore(BlobStore):
    """Frame blobs in process, with TTLs and the in-flight byte count."""

    def __init__(self) -> None:
        self._blobs: dict[str, tuple[bytes, float]] = {}
        self._versions: dict[str, tuple[int, float]] = {}  # put_versioned: key -> (version, expiry)
        self._in_flight = 0
        self._pruned_at = 0.0

    async def put_many(self, blobs: Mapping[str, bytes], *, ttl_s: int = DEFAULT_BLOB_TTL_S) -> None:
        """Store blobs under their keys, each expiring after ``ttl_s``."""
        self._prune()
        expires = time.monotonic() + ttl_s
        for key, blob in blobs.items():
            self._blobs[key] = (blob, expires)
            self._in_flight += len(blob)

    async def put_versioned(self, key: str, blob: bytes, version: int, *, ttl_s: int) -> bool:
        """Store ``blob`` unless ``key`` holds a higher version."""
        now = time.monotonic()
        held = self._versions.get(key)
        if held is not None and held[1] > now and held[0] > version:
            return False
        self._blobs[key] = (blob, now + ttl_s)
        self._versions[key] = (version, now + ttl_s)
        return True

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Fetch blobs in key order; ``None`` for a key that expired or never was."""
        now = time.monotonic()
        found = [self._blobs.get(k) for k in keys]
        return [held[0] if held is not None and held[1] > now else None for held in found]

    async def delete_many(self, keys: Sequence[str]) -> int:
        """Delete blobs; returns how many existed (and had not expired)."""
        live = await self.get_many(keys)
        for key in keys:
            self._blobs.pop(key, None)
        return sum(blob is not None for blob in live)

    async def expire_many(self, keys: Sequence[str], ttl_s: int) -> int:
        """Make blobs expire within ``ttl_s`` (never later than they would)."""
        now = time.monotonic()
        found = 0
        for key in keys:
            held = self._blobs.get(key)
            if held is not None and held[1] > now:
                self._blobs[key] = (held[0], min(held[1], now + ttl_s))
                found += 1
        return found

    async def bytes_in_flight(self) -> int:
        """Bytes put and not yet released."""
        return self._in_flight

    async def release(self, nbytes: int) -> None:
        """Take ``nbytes`` off the in-flight count, never below zero."""
        self._in_flight = max(0, self._in_flight - nbytes)

    async def close(self) -> None:
        """Nothing to release: the store may be shared and stays usable."""

    def _prune(self) -> None:
        now = time.monotonic()
        if now - self._pruned_at >= PRUNE_EVERY_S:
            self._pruned_at = now
            self._blobs = {k: v for k, v in self._blobs.items() if v[1] > now}
            self._versions = {k: v for k, v in self._versions.items() if v[1] > now}

"""The ``Broker`` interface: streams, consumer groups, leases — and nothing about frames.

Three small interfaces: ``Broker`` (streams and consumer groups), ``Leases`` (leases and
member pools, what ``brokers.partitions`` needs) and ``KeyValue`` (small values: health
records, last errors). ``Broker`` extends the other two, so one object serves all three,
but a user that needs only leases or values types its argument with the small one.
Implementations (``brokers.redis.RedisBroker``, ``brokers.memory.MemoryBroker``) fill in
the primitives; the behaviour built on them (dead-lettering, claiming every page,
backpressure, single publish, last errors) is written once here. Payloads are opaque bytes: the broker never decodes
them, except that a dead letter is itself a ``stream.schemas.DeadLetter``.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from stream import codec
from stream.names import DEFAULT_NAMESPACE, dead_letter_name, error_name, parse_entry_id
from stream.schemas import DeadLetter
from stream.settings import BrokerSettings


@dataclass(frozen=True)
class Entry:
    """One delivered stream entry. ``deliveries`` counts this delivery too.

    ``problem`` says why the entry cannot be read at all (it has no payload field, written
    by something that is not roadstream); ``data`` is then empty and the runtime
    dead-letters the entry with that reason.
    """

    stream: str
    id: str
    data: bytes
    deliveries: int = 1
    problem: str | None = None

    @property
    def order(self) -> tuple[int, int]:
        """``(ms, seq)``: sorts entries of one stream as the stream does, its first element
        the millisecond the entry was added; so that nobody above the broker parses ids."""
        return parse_entry_id(self.id)


@dataclass(frozen=True)
class Publish:
    """One entry to add. With a ``dedupe_key``, publishing it twice leaves one entry."""

    stream: str
    data: bytes
    dedupe_key: str | None = None


@dataclass(frozen=True)
class GroupStats:
    """A consumer group's view of a stream."""

    name: str
    consumers: int
    pending: int  # delivered, not acknowledged
    lag: int  # not yet delivered to the group
    last_delivered_id: str


@dataclass(frozen=True)
class StreamStats:
    """Length and per-group state of one stream."""

    stream: str
    length: int
    groups: list[GroupStats] = field(default_factory=list)

    def group(self, name: str) -> GroupStats | None:
        """The stats of one group, or ``None`` when the group does not exist."""
        return next((g for g in self.groups if g.name == name), None)

    def backlog(self, group: str) -> int:
        """Entries the group still has to finish: undelivered plus pending."""
        stats = self.group(group)
        return self.length if stats is None else stats.lag + stats.pending


#: Entries taken per ``claim`` call while ``claim_all`` pages through a pending list.
CLAIM_PAGE = 2048
#: How long a failing entry's last error is kept (for its dead letter, and reports).
ERROR_TTL_MS = 24 * 3600 * 1000


class Leases(ABC):
    """Leases (keys one owner holds for a while) and pools of live members."""

    @abstractmethod
    async def lease(self, name: str, owner: str, ttl_ms: int) -> bool:
        """Take or renew a lease; ``False`` when another owner holds it."""

    @abstractmethod
    async def release(self, name: str, owner: str) -> bool:
        """Give a lease back; only its owner can."""

    @abstractmethod
    async def lease_owner(self, name: str) -> str | None:
        """Who holds a lease now, if anyone."""

    @abstractmethod
    async def join(self, pool: str, member: str, ttl_ms: int) -> None:
        """Say that ``member`` is alive in ``pool`` for the next ``ttl_ms``."""

    @abstractmethod
    async def leave(self, pool: str, member: str) -> None:
        """Remove a member from a pool at once."""

    @abstractmethod
    async def members(self, pool: str) -> list[str]:
        """Live members of a pool, sorted."""


class KeyValue(ABC):
    """A small key-value space with expiry."""

    @abstractmethod
    async def put_value(self, key: str, value: bytes, ttl_ms: int | None = None) -> None:
        """Store a small value (health records, last errors)."""

    @abstractmethod
    async def get_value(self, key: str) -> bytes | None:
        """Read a small value, ``None`` when absent or expired."""

    @abstractmethod
    async def keys(self, pattern: str) -> list[str]:
        """Names of small values that match a glob pattern."""


class Broker(Leases, KeyValue, ABC):
    """Streams with consumer groups (and, inherited, leases and a small key-value space).

    Parameters:
        namespace: prefix of every key this broker writes.
        settings: transport bounds (claim idle time, dead-letter count, …).
    """

    def __init__(self, *, namespace: str = DEFAULT_NAMESPACE, settings: BrokerSettings | None = None) -> None:
        self.namespace = namespace
        self.settings = settings or BrokerSettings()

    # -- primitives every implementation provides ---------------------------------

    @abstractmethod
    async def ensure_group(self, stream: str, group: str) -> None:
        """Create ``group`` on ``stream`` (and the stream) if missing; reads from the start."""

    @abstractmethod
    async def publish_many(self, items: Sequence[Publish]) -> list[str]:
        """Add entries in one round trip, in order.

        Returns:
            The entry id of each item; for an item whose dedupe key was seen before,
            the id of the entry published then.
        """

    @abstractmethod
    async def read(
        self, group: str, consumer: str, streams: Sequence[str], *, count: int, block_ms: int
    ) -> list[Entry]:
        """Read up to ``count`` new entries (per stream) for ``consumer``.

        Blocks up to ``block_ms`` when none is there (0: do not block). Creates the group
        on streams that have none. Entries come in stream order.
        """

    @abstractmethod
    async def ack(self, group: str, entries: Sequence[Entry]) -> int:
        """Acknowledge entries; returns how many were still pending."""

    @abstractmethod
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
        """Take over entries pending longer than ``min_idle_ms`` (XAUTOCLAIM), one page:
        up to ``count`` entries from id ``start`` on, in id order (``claim_all`` pages).

        Returned entries carry their delivery count including this delivery; entries
        trimmed away while pending are dropped from the pending list. With
        ``count_delivery=False`` (XAUTOCLAIM … JUSTID) the counter is left alone: a
        partition handed over on a rebalance is not a failed delivery of its entries.
        """

    @abstractmethod
    async def touch(self, group: str, consumer: str, entries: Sequence[Entry]) -> None:
        """Reset the idle time of entries still being worked on (XCLAIM … JUSTID).

        A long job (ingesting a drive) is touched periodically so that ``claim`` of
        another consumer does not take it over while its worker is alive.
        """

    @abstractmethod
    async def stats(self, stream: str) -> StreamStats:
        """Length, and per group: consumers, pending and lag."""

    @abstractmethod
    async def trim(self, stream: str) -> int:
        """Remove entries every group has acknowledged; never a pending or unread one.

        Returns:
            How many entries were removed.
        """

    @abstractmethod
    async def cap(self, stream: str, max_len: int) -> int:
        """Keep about the newest ``max_len`` entries of a stream that no group reads.

        A stream with a group is left alone (``trim`` is what is safe there).

        Returns:
            How many entries were removed.
        """

    @abstractmethod
    async def streams(self, pattern: str = "*") -> list[str]:
        """Names of existing streams that match a glob pattern."""

    @abstractmethod
    async def range(self, stream: str, *, start: str = "-", end: str = "+", count: int = 100) -> list[Entry]:
        """Entries between two ids (inclusive; ``(id`` excludes), without any group."""

    @abstractmethod
    async def delete_entries(self, stream: str, ids: Sequence[str]) -> int:
        """Delete entries by id (used by dead-letter requeue)."""

    async def close(self) -> None:
        """Release connections; nothing by default (an in-process broker holds none)."""

    async def used_memory(self) -> int | None:
        """Bytes the server uses (Redis ``used_memory``); ``None`` when it cannot say."""
        return None

    # -- behaviour built on the primitives -----------------------------------------

    async def publish(self, stream: str, data: bytes, *, dedupe_key: str | None = None) -> str:
        """Add one entry; see ``publish_many``."""
        (entry_id,) = await self.publish_many([Publish(stream, data, dedupe_key)])
        return entry_id

    @property
    def dead_letter_stream(self) -> str:
        """The namespace's dead-letter stream."""
        return dead_letter_name(self.namespace)

    async def dead_letter(self, group: str, entry: Entry, error: str, *, consumer: str = "") -> str:
        """Move an entry to the dead-letter stream with the reason, then ack it.

        Publishing comes first and is deduplicated by source entry, so a crash between
        the two steps leaves one dead letter and the entry still pending.

        Returns:
            The dead letter's entry id.
        """
        letter = DeadLetter(
            stream=entry.stream,
            group=group,
            entry_id=entry.id,
            error=error,
            deliveries=entry.deliveries,
            consumer=consumer,
            raw=entry.data,
            at_utc=time.time(),
        )
        dedupe = f"dlq:{group}:{entry.stream}:{entry.id}"
        letter_id = await self.publish(self.dead_letter_stream, codec.encode(letter), dedupe_key=dedupe)
        await self.ack(group, [entry])
        return letter_id

    async def claim_all(
        self,
        group: str,
        consumer: str,
        stream: str,
        *,
        min_idle_ms: int,
        count_delivery: bool = True,
        page: int = CLAIM_PAGE,
    ) -> list[Entry]:
        """Take over every entry pending longer than ``min_idle_ms``, page after page.

        Each page starts after the last entry of the one before: with ``min_idle_ms=0``
        (a take-over) a claimed entry is at once claimable again, so starting over from
        the oldest would bring the first page back and stop there.

        Returns:
            The claimed entries in id order; see ``claim``.
        """
        claimed: list[Entry] = []
        start = "0-0"
        while True:
            entries = await self.claim(
                group, consumer, stream, min_idle_ms=min_idle_ms, count=page, count_delivery=count_delivery, start=start
            )
            claimed += entries
            if len(entries) < page:
                return claimed
            ms, seq = entries[-1].order
            start = f"{ms}-{seq + 1}"

    async def record_error(self, group: str, entry: Entry, error: str) -> None:
        """Keep why ``group`` failed on an entry left for redelivery (for its dead letter)."""
        await self.put_value(error_name(group, entry.stream, entry.id, self.namespace), error.encode(), ERROR_TTL_MS)

    async def last_error(self, group: str, entry: Entry) -> str | None:
        """The error ``record_error`` kept for an entry, ``None`` when there is none (any more)."""
        value = await self.get_value(error_name(group, entry.stream, entry.id, self.namespace))
        return value.decode() if value is not None else None

    async def wait_for_room(
        self,
        stream: str,
        group: str,
        *,
        max_backlog: int | None = None,
        poll_s: float = 0.05,
        timeout_s: float | None = None,
    ) -> float:
        """Backpressure: wait while ``group`` has more than ``max_backlog`` entries to do.

        Parameters:
            stream: the next hop.
            group: the group that consumes it.
            max_backlog: bound on lag plus pending; ``settings.max_lag`` by default.
            poll_s: how often to look again.
            timeout_s: give up waiting after this (``None``: wait as long as needed).

        Returns:
            Seconds spent waiting.
        """
        bound = self.settings.max_lag if max_backlog is None else max_backlog
        started = time.monotonic()
        while (await self.stats(stream)).backlog(group) > bound:
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                break
            await asyncio.sleep(poll_s)
        return time.monotonic() - started

    async def __aenter__(self) -> Broker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

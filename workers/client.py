"""A small client for the verdicts stream.

Two ways to read, both async iterators of ``Item`` (entry id and decoded ``Verdict`` or
``DriveSummary``):

* ``read(from_id=…)`` — from an entry id on, no server-side state. Keep the last id you
  handled and pass it next time to resume (``roadstream verdicts --from ID``)::

      async with VerdictClient.from_url("redis://127.0.0.1:6379/0") as client:
          async for item in client.read(follow=True):
              print(item.id, item.message)

* ``consume(group, consumer)`` — through a consumer group: each verdict goes to one
  member of the group, and is acknowledged when your loop asks for the next one, so a
  crashed reader's verdicts are read again by the group.

Entries that do not decode are skipped with a warning (the verdict stream is written by
fuse only, so that means a newer schema than this client knows).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from brokers.base import Broker, Entry
from stream import codec, names
from stream.errors import DecodeError
from stream.names import DEFAULT_NAMESPACE
from stream.schemas import DriveSummary, Verdict

log = logging.getLogger("roadstream.client")

#: How often ``read(follow=True)`` looks for new verdicts.
DEFAULT_POLL_S = 0.2


@dataclass(frozen=True)
class Item:
    """One entry of the verdicts stream."""

    id: str
    message: Verdict | DriveSummary


class VerdictClient:
    """Reads verdicts and drive summaries.

    Parameters:
        broker: an open broker (``brokers.connect.connect``); closed by ``close`` only
            when the client opened it itself (``from_url``).
        poll_s: pause between looks when following.
    """

    def __init__(self, broker: Broker, *, poll_s: float = DEFAULT_POLL_S) -> None:
        self.broker = broker
        self.poll_s = poll_s
        self.stream = names.stream_name(names.VERDICTS, ns=broker.namespace)
        self._owned: list = []

    @classmethod
    def from_url(cls, url: str, *, namespace: str = DEFAULT_NAMESPACE, poll_s: float = DEFAULT_POLL_S) -> VerdictClient:
        """A client over its own connection to ``url`` (redis://…, unix://…, memory://…)."""
        from brokers.connect import connect

        broker, blobs = connect(url, namespace=namespace)
        client = cls(broker, poll_s=poll_s)
        client._owned = [broker, blobs]
        return client

    async def read(
        self, *, from_id: str = "0", follow: bool = False, count: int = 500, limit: int | None = None
    ) -> AsyncIterator[Item]:
        """Verdicts after ``from_id`` (exclusive; ``"0"`` for all), in stream order.

        Parameters:
            from_id: the last entry id already handled.
            follow: wait for new verdicts instead of stopping at the end.
            count: entries fetched per round trip.
            limit: stop after this many items.
        """
        last, seen = from_id, 0
        while True:
            start = "-" if last in ("0", "0-0", "-") else f"({last}"
            entries = await self.broker.range(self.stream, start=start, count=count)
            for entry in entries:
                last = entry.id
                item = _decode(entry)
                if item is not None:
                    yield item
                    seen += 1
                    if limit is not None and seen >= limit:
                        return
            if not entries:
                if not follow:
                    return
                await asyncio.sleep(self.poll_s)

    async def consume(
        self, group: str, consumer: str, *, follow: bool = True, count: int = 100, block_ms: int = 1000
    ) -> AsyncIterator[Item]:
        """Verdicts through a consumer group, each acknowledged once the next is asked for.

        Parameters:
            group: the group's name; created on first use, reading from the start.
            consumer: this reader's name inside the group.
            follow: wait for new verdicts instead of stopping when none is left.
            count: entries per read.
            block_ms: how long one read waits for new entries.
        """
        await self.broker.ensure_group(self.stream, group)
        while True:
            entries = await self.broker.read(group, consumer, [self.stream], count=count, block_ms=block_ms)
            if not entries and not follow:
                return
            for entry in entries:
                item = _decode(entry)
                if item is not None:
                    yield item
                await self.broker.ack(group, [entry])

    async def close(self) -> None:
        """Close the connection the client opened itself."""
        for owned in self._owned:
            await owned.close()
        self._owned = []

    async def __aenter__(self) -> VerdictClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _decode(entry: Entry) -> Item | None:
    try:
        return Item(entry.id, codec.decode(entry.data, (Verdict, DriveSummary)))
    except DecodeError as exc:
        log.warning("verdicts entry %s skipped: %s", entry.id, exc.reason)
        return None

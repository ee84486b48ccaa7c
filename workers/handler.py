"""What the runtime calls: a ``Handler`` binds one stage to its input and output hops.

The runtime (``workers.runtime.Worker``) reads batches, decodes entries (undecodable ones
go to the dead-letter stream before a handler sees them), calls ``handle``, publishes
the outputs it returns, then acknowledges. A stateless handler lets the runtime ack the
whole batch; a stateful one (temporal windows, fuse) names in ``BatchResult.ack`` only
the deliveries whose outputs are now published, and keeps the rest pending — a crash
then loses nothing, because the next owner of the partition replays them.

Handlers do IO only through the blob store they are given and the outputs they return;
the work itself is a pure stage from ``stages/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from brokers.base import Entry
from stream.schemas import Message


@dataclass(frozen=True)
class Delivery:
    """A decoded entry handed to a handler."""

    entry: Entry
    message: Message
    partition: int | None = None


@dataclass(frozen=True)
class Output:
    """An entry to publish. ``dedupe_key`` must be deterministic (``stream.ids``)."""

    hop: str
    message: Message
    dedupe_key: str | None = None
    partition: int | None = None


@dataclass
class BatchResult:
    """What a handler made of a batch.

    Attributes:
        outputs: entries to publish before anything is acknowledged.
        ack: deliveries now safe to acknowledge; ``None`` means the whole batch.
        failed: deliveries that failed, with the error. An ``InputError`` is
            dead-lettered at once; any other error leaves the entry pending, to be
            redelivered until ``max_deliveries`` and then dead-lettered.
    """

    outputs: list[Output] = field(default_factory=list)
    ack: list[Delivery] | None = None
    failed: list[tuple[Delivery, BaseException]] = field(default_factory=list)


class Publisher(Protocol):
    """Given to a handler by the runtime, for stages that emit while they work (ingest)."""

    async def publish(self, outputs: Sequence[Output]) -> None:
        """Publish now (idempotently, by each output's dedupe key)."""

    async def put_value(self, key: str, value: bytes, ttl_ms: int | None = None) -> None:
        """Store a small value in the broker (a split drive's per-camera records)."""

    async def get_value(self, key: str) -> bytes | None:
        """Read a small value; ``None`` when absent or expired."""

    async def wait_for_room(self, hop: str, partition: int | None = None, *, backlog: bool = True,
                            memory: bool = True) -> None:  # fmt: skip
        """Backpressure: wait while that hop's backlog (``backlog``) or the blob bytes in
        flight and the server's memory (``memory``) are too high."""


class Handler:
    """Base of every stage binding; override ``handle`` and what else you need.

    Class attributes:
        group: the consumer group (the stage's name).
        inputs: hops read (``stream.names`` constants).
        partitioned: inputs are partitioned and owned through leases.
        accepts: message types the handler takes; others are dead-lettered.
    """

    group: str = ""
    inputs: tuple[str, ...] = ()
    partitioned: bool = False
    accepts: tuple[type[Message], ...] = ()
    #: Set by the runtime before ``start``.
    publisher: Publisher | None = None

    async def start(self) -> None:
        """Load models and open connections; raise to stop the worker with a message."""

    async def prepare(self, batch: list[Delivery]) -> Any:
        """Fetch and decode a batch's inputs (blobs, JPEGs) ahead of ``handle``.

        The runtime calls it for the next batch while ``handle`` of the current one runs,
        so IO overlaps compute, and hands what it returns to ``handle`` with that batch
        (nothing is kept on the handler between the two). ``None`` by default.
        """
        return None

    async def handle(self, batch: list[Delivery], prepared: Any = None) -> BatchResult:
        """Process one batch (entries from all owned partitions, each in order).

        Parameters:
            batch: the deliveries still current (a partition revoked or rebuilt since the
                read drops its deliveries from the batch).
            prepared: what ``prepare`` returned for this batch (it may cover deliveries
                dropped since); ``None`` when it was not prepared (a retry entry by
                entry, a failed ``prepare``, a test): prepare it then.
        """
        raise NotImplementedError

    async def tick(self) -> BatchResult:
        """Called when a read returns nothing: close windows whose timeout passed."""
        return BatchResult(ack=[])

    async def assigned(self, partition: int) -> None:
        """A partition was taken over; its pending entries will be replayed next."""

    async def revoked(self, partition: int) -> None:
        """A partition went to another worker: drop its state, ack nothing more of it."""

    async def dead_lettered(self, message: Message, error: str) -> list[Output]:
        """An input was dead-lettered for good: what to publish so that downstream stops
        waiting for its outputs (the runtime publishes them). Nothing by default."""
        return []

    async def stop(self) -> None:
        """Release models and connections."""

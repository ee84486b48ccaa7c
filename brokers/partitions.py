"""Partition ownership over leases: who of a group's workers owns which partition.

Written only against the ``Leases`` primitives of ``brokers.base`` (``join``/``members``
and ``lease``/``release``/``lease_owner``; from the broker, its ``namespace`` and
``settings``), so it works the same on Redis and in process.

Why it works this way:

* **Rendezvous hashing** (highest random weight) over the live members decides who
  *should* own each partition. Every member computes the same answer from the same
  member list with no coordination, and a member joining or leaving moves mostly the
  partitions it gains or loses, not a reshuffle of all of them.
* **Bounded loads.** Plain rendezvous hashing splits few partitions unevenly (16 over
  three members came out 3/5/8), and the busiest member bounds the stage. Each member
  takes at most its fair share (``partitions / members`` rounded up, for only as many
  members as the remainder asks), and a partition whose first choice is full goes to its
  next choice. Shares differ by at most one partition; a member joining or leaving still
  moves about its own share.
* **Leases decide who *does* own it.** Computing an assignment is not enough: two members
  may briefly disagree on the member list. A partition is worked on only under a lease
  (a key with a TTL that one owner holds), so it is never owned twice. A member that
  should own a partition still held by another simply waits: the holder releases it on
  its next refresh (rebalancing on join), or its lease expires when it died.
* **Knowing when not to act.** A member that stalled (a long GC, SIGSTOP, a stuck call)
  may have lost its leases without having run a refresh to find out. ``fresh`` says
  whether the last successful refresh is recent enough that the leases cannot have
  expired since; a runtime reads, handles and publishes a partition's work only then.
* **Fencing.** Before renewing, a member checks that the lease is still its own; if
  another owner took it (our renewals stalled past the TTL), the partition is reported
  revoked so the runtime drops its state for it instead of acting on it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

from brokers.base import Broker
from stream.names import lease_name, members_name, stable_hash


def _weight(group: str, partition: int, member: str) -> tuple[int, str]:
    """A member's rendezvous weight for a partition (ties, never seen, go by name)."""
    return stable_hash(group, str(partition), member), member


def rendezvous_owner(group: str, partition: int, members: Iterable[str]) -> str | None:
    """The member that should own ``partition`` with no bound on loads: the highest weight."""
    return max(members, key=lambda m: _weight(group, partition, m), default=None)


def balanced_owners(group: str, partitions: int, members: Iterable[str]) -> dict[int, str]:
    """Owner of every partition: rendezvous hashing with bounded loads.

    Partitions are placed in index order, each with its highest-ranked member that still
    has room. Every member gets ``partitions // len(members)`` or one more, and exactly
    ``partitions % len(members)`` members get one more.
    """
    pool = sorted(set(members))
    if not pool:
        return {}
    floor, extra = divmod(partitions, len(pool))
    load = dict.fromkeys(pool, 0)
    above_floor = 0
    owners: dict[int, str] = {}
    for partition in range(partitions):
        ranked = sorted(pool, key=lambda m: _weight(group, partition, m), reverse=True)
        for member in ranked:
            if load[member] < floor or (load[member] == floor and above_floor < extra):
                above_floor += load[member] == floor
                load[member] += 1
                owners[partition] = member
                break
    return owners


class PartitionManager:
    """Holds the partitions one member of a group should own, through renewed leases.

    Call ``refresh`` every ``interval_s`` (a third of the lease TTL); call ``stop`` on
    shutdown. A member whose refreshes stop drops out of the pool after ``ttl_ms``, its
    leases expire, and the others take its partitions over.

    Parameters:
        broker: the transport.
        group: the consumer group (stage) whose partitions are shared out.
        member: this member's name, unique in the group (the consumer name).
        partitions: how many partitions the group's hop has.
        ttl_ms: lease and membership time-to-live; ``broker.settings.lease_ttl_ms`` by default.
    """

    def __init__(
        self, broker: Broker, group: str, member: str, partitions: int, ttl_ms: int | None = None
    ) -> None:
        self.broker = broker
        self.group = group
        self.member = member
        self.partitions = partitions
        self.ttl_ms = ttl_ms if ttl_ms is not None else broker.settings.lease_ttl_ms
        self.pool = members_name(group, broker.namespace)
        #: Partitions this member holds the lease of, as of the last ``refresh``.
        self.owned: set[int] = set()
        self._refreshed_at = -math.inf  # monotonic start of the last refresh that completed

    def fresh(self) -> bool:
        """True while the leases renewed by the last refresh cannot have expired yet.

        Counted from that refresh's start (its renewals came later, so they last longer),
        with a third of the TTL to spare for the work done on the strength of it.
        """
        return time.monotonic() < self._refreshed_at + 2 * self.ttl_ms / 3000

    def fresh_s(self) -> float:
        """Seconds ``fresh`` stays true (0 or less: not fresh)."""
        return self._refreshed_at + 2 * self.ttl_ms / 3000 - time.monotonic()

    @property
    def interval_s(self) -> float:
        """How often to call ``refresh``: a third of the TTL, so one late beat loses nothing."""
        return self.ttl_ms / 3000

    def lease_key(self, partition: int) -> str:
        """The lease key of one partition of this group."""
        return lease_name(self.group, partition, self.broker.namespace)

    async def wanted(self) -> set[int]:
        """The partitions this member should own among the live members (``balanced_owners``)."""
        members = set(await self.broker.members(self.pool)) | {self.member}
        owners = balanced_owners(self.group, self.partitions, members)
        return {p for p, owner in owners.items() if owner == self.member}

    async def refresh(self, *, release_surplus: bool = True) -> tuple[set[int], set[int]]:
        """Heartbeat, renew held leases, give back surplus ones, take free wanted ones.

        Parameters:
            release_surplus: give surplus leases back at once. A runtime that is still
                working on a surplus partition passes ``False``, finishes the work, drops
                the partition's state and then calls ``release``: released earlier, the
                next owner would claim entries this member is about to publish and ack.

        Returns:
            (newly assigned, revoked) partitions since the last refresh. Revoked ones were
            lost to another owner or are surplus: they now belong to another member.
        """
        started = time.monotonic()
        await self.broker.join(self.pool, self.member, self.ttl_ms)
        wanted = await self.wanted()
        lost = {p for p in self.owned if not await self._renew(p)}
        surplus = self.owned - lost - wanted
        if release_surplus:  # rebalance: another member should own them now
            await self.release(surplus)
        taken = {p for p in sorted(wanted - self.owned) if await self._take(p)}
        revoked = lost | surplus
        self.owned = (self.owned - revoked) | taken
        self._refreshed_at = started
        return taken, revoked

    async def release(self, partitions: Iterable[int]) -> None:
        """Give these partitions' leases back (only where this member still holds them)."""
        for partition in sorted(partitions):
            await self.broker.release(self.lease_key(partition), self.member)

    async def _renew(self, partition: int) -> bool:
        # Fencing: a lease another owner took while we stalled is lost, not renewed.
        key = self.lease_key(partition)
        if await self.broker.lease_owner(key) != self.member:
            return False
        return await self.broker.lease(key, self.member, self.ttl_ms)

    async def _take(self, partition: int) -> bool:
        # Fails while the previous owner still holds it; it gives it back or expires.
        return await self.broker.lease(self.lease_key(partition), self.member, self.ttl_ms)

    async def stop(self) -> set[int]:
        """Release every lease held and leave the pool, so others take over at once.

        Returns:
            The partitions given back.
        """
        released = set(self.owned)
        for partition in sorted(released):
            await self.broker.release(self.lease_key(partition), self.member)
        await self.broker.leave(self.pool, self.member)
        self.owned = set()
        return released

"""Partition ownership and replay (``workers.ownership.Ownership``), with no broker at all:
a stub handler records what it is told, stub leases say what is owned."""

from __future__ import annotations

import pytest

from brokers.base import Entry
from stream import names
from stream.errors import BrokerConnectionError
from workers.handler import Delivery, Handler
from workers.ownership import Ownership


class Stage(Handler):
    group = "detect"
    inputs = (names.FRAMES,)
    partitioned = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    async def assigned(self, partition: int) -> None:
        self.calls.append(("assigned", partition))

    async def revoked(self, partition: int) -> None:
        self.calls.append(("revoked", partition))


class StubLeases:
    def __init__(self, owned: set[int] = frozenset(), *, assigned: set[int] = frozenset()) -> None:
        self.owned = set(owned)
        self.is_fresh = True
        self.next: tuple[set[int], set[int]] = (set(assigned), set())
        self.released: list[set[int]] = []

    def fresh(self) -> bool:
        return self.is_fresh

    async def refresh(self, *, release_surplus: bool = True) -> tuple[set[int], set[int]]:
        assigned, revoked = self.next
        self.owned = (self.owned | assigned) - revoked
        self.next = (set(), set())
        return assigned, revoked

    async def release(self, partitions: set[int]) -> None:
        self.released.append(set(partitions))

    async def stop(self) -> None:
        pass


def stream(hop: str, partition: int | None) -> str:
    return names.stream_name(hop, partition)


def entry(partition: int, ms: int, deliveries: int = 1) -> Entry:
    return Entry(stream(names.FRAMES, partition), f"{ms}-0", b"", deliveries)


def owning(*partitions: int) -> tuple[Ownership, Stage, StubLeases]:
    stage, leases = Stage(), StubLeases(set(partitions))
    own = Ownership(stage, stream, leases)
    own.ready |= set(partitions)
    return own, stage, leases


def hold(own: Ownership, *entries: Entry) -> list[Delivery]:
    return [own.hold(e, None, own.partition_of(e.stream)) for e in entries]


async def test_a_takeover_queues_the_claimed_entries_before_the_partition_is_read() -> None:
    # Given leases that assign partition 3, whose pending entries a claim brings out of order
    stage, leases = Stage(), StubLeases(assigned={3})
    own = Ownership(stage, stream, leases)

    async def claim(name: str) -> list[Delivery]:
        assert name == stream(names.FRAMES, 3)
        return hold(own, entry(3, 10), entry(3, 20))

    # When the leases are refreshed
    await own.refresh(claim)

    # Then the partition is taken over: told to the stage, its entries queued, then read
    assert stage.calls == [("assigned", 3)]
    assert [d.entry.id for d in own.take(10)] == ["10-0", "20-0"]
    assert own.streams() == [stream(names.FRAMES, 3)]


async def test_a_takeover_cut_short_is_dropped_and_done_again_next_refresh() -> None:
    # Given a claim that fails once with a dropped connection
    stage, leases = Stage(), StubLeases(assigned={1})
    own = Ownership(stage, stream, leases)
    failures = [BrokerConnectionError("gone")]

    async def claim(name: str) -> list[Delivery]:
        if failures:
            raise failures.pop()
        return hold(own, entry(1, 5))

    # When the first refresh fails, then a second runs
    with pytest.raises(BrokerConnectionError):
        await own.refresh(claim)
    assert own.streams() == [] and own.replay == []
    await own.refresh(claim)

    # Then the partition was dropped, then taken over whole
    assert stage.calls == [("assigned", 1), ("revoked", 1), ("assigned", 1)]
    assert own.streams() == [stream(names.FRAMES, 1)]
    assert [d.entry.id for d in own.replay] == ["5-0"]


async def test_a_revoked_partition_is_dropped_and_its_lease_given_back() -> None:
    # Given partitions 0 and 1 owned, with entries held, and leases that revoke 1
    own, stage, leases = owning(0, 1)
    hold(own, entry(0, 7), entry(1, 8))
    leases.next = (set(), {1})

    # When refreshed
    revoked = await own.refresh(lambda name: None)

    # Then 1 is forgotten (not read, not held), told to the stage and released
    assert revoked == {1}
    assert stage.calls == [("revoked", 1)]
    assert leases.released == [{1}]
    assert own.streams() == [stream(names.FRAMES, 0)]
    assert [d.entry.id for d in own.held.values()] == ["7-0"]


async def test_a_rebuild_replays_held_entries_in_order_counting_the_failed_one() -> None:
    # Given three held entries of partition 2, the middle one failed
    own, stage, _ = owning(2)
    first, failed, last = hold(own, entry(2, 30), entry(2, 10), entry(2, 20))

    # When the partition is rebuilt
    async with own.lock:
        await own.rebuild(2, failed=[failed])

    # Then all three are replayed oldest first, the failed one counted once more
    replay = own.take(10)
    assert [(d.entry.id, d.entry.deliveries) for d in replay] == [("10-0", 2), ("20-0", 1), ("30-0", 1)]
    assert stage.calls == [("revoked", 2), ("assigned", 2)]
    # and a batch still holding the old deliveries sees them as stale
    assert not own.current(first) and not own.current(last)
    assert all(own.current(d) for d in replay)


async def test_a_partition_no_longer_owned_is_not_rebuilt() -> None:
    # Given a held entry of a partition whose lease is gone
    own, stage, leases = owning(4)
    hold(own, entry(4, 1))
    leases.owned = set()

    # When it is rebuilt
    await own.rebuild(4)

    # Then its state is dropped and nothing is queued: its new owner replays it
    assert stage.calls == [("revoked", 4)]
    assert own.replay == [] and own.held == {}


async def test_released_entries_are_no_longer_held() -> None:
    # Given two held entries
    own, _, _ = owning(0)
    acked, kept = hold(own, entry(0, 1), entry(0, 2))

    # When the first is released after its batch
    own.release([acked])

    # Then only the second is held (and touched)
    assert not own.holds(acked.entry) and own.holds(kept.entry)
    assert own.by_stream() == {stream(names.FRAMES, 0): [kept.entry]}


async def test_entries_read_during_a_rebuild_go_behind_its_replay() -> None:
    # Given a read started before partition 0 was rebuilt, partition 1 untouched
    own, _, _ = owning(0, 1)
    hold(own, entry(0, 1))
    before = own.generations()
    async with own.lock:
        await own.rebuild(0)

    # When the read's entries arrive
    read = hold(own, entry(0, 2), entry(1, 3))
    joined = own.behind_replays(read, before)

    # Then partition 0's new entry waits behind its replayed older one; 1's joins the batch
    assert [d.entry.id for d in joined] == ["3-0"]
    assert [d.entry.id for d in own.take(10)] == ["1-0", "2-0"]


async def test_stale_leases_read_nothing_and_revoked_partitions_admit_nothing() -> None:
    # Given partition 0 owned and ready, 1 not
    own, _, leases = owning(0)

    # Then an entry of 1 (revoked while a read was in flight) is not admitted
    assert own.admits(0) and not own.admits(1)
    # and once the leases may have lapsed (a stall), nothing is read
    leases.is_fresh = False
    assert own.streams() == []


async def test_reclaimed_entries_of_a_partition_go_through_a_rebuild_in_order() -> None:
    # Given one held entry of partition 0, then an older one reclaimed late
    own, _, _ = owning(0)
    hold(own, entry(0, 20))
    late = hold(own, entry(0, 10))

    # When handed over
    await own.reclaimed(late)

    # Then the partition replays both, oldest first
    assert [d.entry.id for d in own.take(10)] == ["10-0", "20-0"]


async def test_replays_taken_while_a_takeover_claims_are_not_queued_again() -> None:
    # Given a queued replay of partition 0, and leases that assign partition 1
    own, _, leases = owning(0)
    own.queue(hold(own, entry(0, 1)))
    leases.next = ({1}, set())

    async def claim(name: str) -> list[Delivery]:
        # the reader takes the queued replay while the claim's round trips run
        assert [d.entry.id for d in own.take(10)] == ["1-0"]
        return hold(own, entry(1, 2))

    # When partition 1 is taken over
    await own.refresh(claim)

    # Then only its claimed entry is queued: the taken one is not handed over twice
    assert [d.entry.id for d in own.replay] == ["2-0"]

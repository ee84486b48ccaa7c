"""Partition ownership through leases, run against every Broker (see ``conftest.broker``)."""

from __future__ import annotations

import asyncio
from collections import Counter

from brokers.base import Broker
from brokers.partitions import PartitionManager, balanced_owners, rendezvous_owner

PARTITIONS = 8
GROUP = "detect"


def managers(broker: Broker, *names: str) -> list[PartitionManager]:
    return [PartitionManager(broker, GROUP, name, PARTITIONS) for name in names]


def assert_disjoint(members: list[PartitionManager]) -> None:
    seen: set[int] = set()
    for member in members:
        assert not seen & member.owned, f"partitions {seen & member.owned} owned twice"
        seen |= member.owned


async def settle(members: list[PartitionManager], rounds: int = 4) -> None:
    """Refresh every member a few rounds, checking that no partition is owned twice."""
    for _ in range(rounds):
        for member in members:
            await member.refresh()
            assert_disjoint(list(dict.fromkeys(members)))


async def heartbeat(members: list[PartitionManager], seconds: float) -> None:
    """Refresh the members every third of the TTL for a while."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        await settle(members, rounds=1)
        await asyncio.sleep(members[0].interval_s)


def test_rendezvous_moves_only_partitions_to_a_joining_member() -> None:
    # Given the owners of 64 partitions among three members
    before = {p: rendezvous_owner(GROUP, p, ["a", "b", "c"]) for p in range(64)}
    # When a fourth member joins
    after = {p: rendezvous_owner(GROUP, p, ["a", "b", "c", "d"]) for p in range(64)}
    # Then every partition that moved went to the new member, and it got some
    moved = {p for p in before if before[p] != after[p]}
    assert moved
    assert all(after[p] == "d" for p in moved)


def test_balanced_owners_split_partitions_evenly_where_plain_rendezvous_does_not() -> None:
    plain_spreads = []
    # Given 16 partitions and member sets of 2 to 6 workers
    for count in range(2, 7):
        members = [f"w{i}" for i in range(count)]
        # When the balanced assignment places the partitions
        owners = balanced_owners(GROUP, 16, members)
        # Then every partition has one owner and the shares differ by at most one
        loads = Counter(owners.values())
        assert sorted(owners) == list(range(16))
        assert set(loads) == set(members)
        assert max(loads.values()) - min(loads.values()) <= 1
        plain = Counter(rendezvous_owner(GROUP, p, members) for p in range(16))
        plain_spreads.append(max(plain.values()) - min(plain.values()) if len(plain) == count else 16)
    # (plain rendezvous hashing of the same members is uneven: the case this fixes)
    assert max(plain_spreads) > 1


def test_balanced_owners_move_about_a_share_when_a_member_joins() -> None:
    # Given 64 partitions over four members
    members = ["a", "b", "c", "d"]
    before = balanced_owners(GROUP, 64, members)
    # When a fifth joins
    after = balanced_owners(GROUP, 64, [*members, "e"])
    # Then it gets its share, and few partitions move between the others (not a reshuffle)
    moved = {p for p in before if before[p] != after[p]}
    assert sum(o == "e" for o in after.values()) in (12, 13)
    assert len(moved - {p for p in after if after[p] == "e"}) <= 8


async def test_two_members_split_all_partitions(broker: Broker) -> None:
    # Given two members; When they refresh a few rounds
    a, b = managers(broker, "a", "b")
    await settle([a, b])
    # Then they own every partition between them, each some, none twice
    assert a.owned | b.owned == set(range(PARTITIONS))
    assert a.owned
    assert b.owned
    owners = {p: await broker.lease_owner(a.lease_key(p)) for p in range(PARTITIONS)}
    assert owners == {p: "a" if p in a.owned else "b" for p in range(PARTITIONS)}


async def test_refresh_reports_newly_assigned_partitions_once(broker: Broker) -> None:
    # Given a lone member; When it refreshes twice
    (a,) = managers(broker, "a")
    first = await a.refresh()
    second = await a.refresh()
    # Then all partitions are assigned on the first refresh, nothing changes on the second
    assert first == (set(range(PARTITIONS)), set())
    assert second == (set(), set())


async def test_survivor_takes_over_partitions_of_a_member_that_stopped_heartbeating(broker: Broker) -> None:
    # Given two members sharing the partitions
    a, b = managers(broker, "a", "b")
    await settle([a, b])
    # When a stops heartbeating for longer than the TTL while b keeps on
    await heartbeat([b], seconds=a.ttl_ms / 1000 * 1.5)
    await settle([b], rounds=2)  # a late beat of b itself costs it a round, not the result
    # Then b owns every partition
    assert b.owned == set(range(PARTITIONS))


async def test_stalled_member_learns_its_partitions_were_revoked(broker: Broker) -> None:
    # Given a member a that stalled past its TTL while b took its partitions over
    a, b = managers(broker, "a", "b")
    await settle([a, b])
    had = set(a.owned)
    await heartbeat([b], seconds=a.ttl_ms / 1000 * 1.5)
    # When a refreshes again
    _, revoked = await a.refresh()
    # Then it reports every partition it had as revoked and owns none of b's
    assert had <= revoked
    assert not a.owned & b.owned


async def test_joining_member_gets_a_share_and_none_is_owned_twice(broker: Broker) -> None:
    # Given two members owning all partitions
    a, b = managers(broker, "a", "b")
    await settle([a, b])
    # When a third joins and all refresh (disjointness checked after every refresh)
    (c,) = managers(broker, "c")
    await settle([c, a, b, c])
    # Then the third owns the partitions the balanced assignment gives it, and all are owned
    assert c.owned == {p for p, o in balanced_owners(GROUP, PARTITIONS, ["a", "b", "c"]).items() if o == "c"}
    assert a.owned | b.owned | c.owned == set(range(PARTITIONS))


async def test_stopped_member_hands_over_at_once(broker: Broker) -> None:
    # Given two members sharing the partitions
    a, b = managers(broker, "a", "b")
    await settle([a, b])
    # When a stops cleanly and b refreshes (well within the TTL)
    released = await a.stop()
    assigned, _ = await b.refresh()
    # Then b takes a's partitions without waiting for leases to expire
    assert assigned == released
    assert b.owned == set(range(PARTITIONS))
    assert await broker.members(b.pool) == ["b"]

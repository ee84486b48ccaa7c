"""One behaviour per test, run against every Broker implementation: in process, one Redis
server and a local Redis Cluster (``broker`` below, over ``conftest.make_broker``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from conftest import ALL_KINDS, REDIS_URL_FIXTURES, make_broker

from brokers.base import Broker, Entry, Publish
from brokers.connect import connect, forget_memory
from brokers.memory import MemoryBroker
from brokers.redis import RedisBroker
from stream import codec
from stream.errors import BrokerConnectionError, ConfigError
from stream.names import stream_name
from stream.schemas import DeadLetter
from stream.settings import BrokerSettings

TEST_NAMESPACE = "rstest"
STREAM = stream_name("frames", 0, TEST_NAMESPACE)
OTHER = stream_name("frames", 1, TEST_NAMESPACE)
GROUP = "detect"


@pytest.fixture(params=ALL_KINDS)
async def broker(request: pytest.FixtureRequest, broker_settings: BrokerSettings) -> AsyncIterator[Broker]:
    """A broker of each implementation, a cluster's too, closed after the test."""
    made = make_broker(request, request.param, broker_settings)
    yield made
    await made.close()


@pytest.fixture(params=[pytest.param(kind, marks=pytest.mark.redis) for kind in REDIS_URL_FIXTURES])
def any_redis_url(request: pytest.FixtureRequest) -> str:
    """The test server's URL, then the test cluster's."""
    return request.getfixturevalue(REDIS_URL_FIXTURES[request.param])


async def publish_n(broker: Broker, n: int, stream: str = STREAM) -> list[str]:
    """Publish entries ``b"0"``, ``b"1"``, … and return their ids."""
    return await broker.publish_many([Publish(stream, str(i).encode()) for i in range(n)])


async def read_all(broker: Broker, consumer: str = "c1", group: str = GROUP, count: int = 100) -> list[Entry]:
    return await broker.read(group, consumer, [STREAM], count=count, block_ms=0)


# -- delivery and ack -------------------------------------------------------------------


async def test_read_delivers_published_entries_once(broker: Broker) -> None:
    # Given two published entries
    ids = await publish_n(broker, 2)
    # When a consumer reads twice
    first = await read_all(broker)
    second = await read_all(broker)
    # Then the first read has both, as first deliveries, and the second has none
    assert [e.id for e in first] == ids
    assert [e.data for e in first] == [b"0", b"1"]
    assert [e.deliveries for e in first] == [1, 1]
    assert second == []


async def test_ack_removes_entries_from_pending(broker: Broker) -> None:
    # Given three delivered entries
    await publish_n(broker, 3)
    entries = await read_all(broker)
    # When two are acked (one twice)
    acked = await broker.ack(GROUP, entries[:2])
    again = await broker.ack(GROUP, entries[:1])
    # Then only the third stays pending
    assert (acked, again) == (2, 0)
    assert (await broker.stats(STREAM)).group(GROUP).pending == 1


async def test_entries_of_a_stream_come_in_order_across_reads(broker: Broker) -> None:
    # Given ten entries
    ids = await publish_n(broker, 10)
    # When read three at a time
    seen: list[str] = []
    while batch := await read_all(broker, count=3):
        seen += [e.id for e in batch]
    # Then they arrive in publish order
    assert seen == ids


async def test_read_takes_count_per_stream_from_several_streams(broker: Broker) -> None:
    # Given entries on two streams
    await publish_n(broker, 3, STREAM)
    await publish_n(broker, 3, OTHER)
    # When one read asks for two per stream
    entries = await broker.read(GROUP, "c1", [STREAM, OTHER], count=2, block_ms=0)
    # Then it gets two of each
    assert sorted(e.stream for e in entries) == [STREAM, STREAM, OTHER, OTHER]


async def test_blocking_read_wakes_up_on_publish(broker: Broker) -> None:
    # Given a consumer blocked on an empty stream
    await broker.ensure_group(STREAM, GROUP)
    reader = asyncio.create_task(broker.read(GROUP, "c1", [STREAM], count=10, block_ms=5000))
    await asyncio.sleep(0.05)
    # When an entry is published
    (entry_id,) = await publish_n(broker, 1)
    # Then the blocked read returns it
    entries = await asyncio.wait_for(reader, 5)
    assert [e.id for e in entries] == [entry_id]


async def test_nonblocking_read_of_empty_stream_returns_nothing(broker: Broker) -> None:
    # Given no entries; When read without blocking; Then nothing comes back
    assert await broker.read(GROUP, "c1", [STREAM], count=10, block_ms=0) == []


# -- redelivery, delivery counts, dead letters --------------------------------------------


async def test_idle_entry_of_a_dead_consumer_is_claimed_by_another(broker: Broker) -> None:
    # Given an entry delivered to c1, which then dies without acking
    await publish_n(broker, 2)
    dead = await read_all(broker, "c1")
    await asyncio.sleep(0.15)
    # When c2 claims entries idle longer than the bound
    claimed = await broker.claim(GROUP, "c2", STREAM, min_idle_ms=100, count=10)
    # Then c2 gets them, with the same payloads, as second deliveries
    assert [(e.id, e.data) for e in claimed] == [(e.id, e.data) for e in dead]
    assert [e.deliveries for e in claimed] == [2, 2]


async def test_recent_entries_are_not_claimed(broker: Broker) -> None:
    # Given an entry just delivered to c1
    await publish_n(broker, 1)
    await read_all(broker, "c1")
    # When c2 claims with a long idle bound; Then it gets nothing
    assert await broker.claim(GROUP, "c2", STREAM, min_idle_ms=60_000, count=10) == []


async def test_each_claim_counts_one_more_delivery(broker: Broker) -> None:
    # Given an entry delivered once
    await publish_n(broker, 1)
    await read_all(broker, "c1")
    # When it is claimed three times
    counts = []
    for consumer in ("c2", "c3", "c4"):
        (entry,) = await broker.claim(GROUP, consumer, STREAM, min_idle_ms=0, count=10)
        counts.append(entry.deliveries)
    # Then each claim counts its delivery
    assert counts == [2, 3, 4]


async def test_claim_respects_count(broker: Broker) -> None:
    # Given five pending entries
    await publish_n(broker, 5)
    await read_all(broker, "c1")
    # When claiming two; Then two come, the oldest first
    claimed = await broker.claim(GROUP, "c2", STREAM, min_idle_ms=0, count=2)
    assert [e.data for e in claimed] == [b"0", b"1"]


async def test_claim_drops_pending_entries_that_were_deleted(broker: Broker) -> None:
    # Given two pending entries, one deleted from the stream
    ids = await publish_n(broker, 2)
    await read_all(broker, "c1")
    await broker.delete_entries(STREAM, ids[:1])
    # When claimed
    claimed = await broker.claim(GROUP, "c2", STREAM, min_idle_ms=0, count=10)
    # Then only the surviving one comes back, and the deleted one is no longer pending
    assert [e.id for e in claimed] == ids[1:]
    assert (await broker.stats(STREAM)).group(GROUP).pending == 1


async def test_entry_failing_max_deliveries_is_dead_lettered_with_reason(broker: Broker) -> None:
    # Given an entry that fails on every delivery until it reaches max_deliveries
    entry_id = await broker.publish(STREAM, b"poison")
    (entry,) = await read_all(broker, "c1")
    while entry.deliveries < broker.settings.max_deliveries:
        (entry,) = await broker.claim(GROUP, "c2", STREAM, min_idle_ms=0, count=1)
    # When the runtime dead-letters it
    await broker.dead_letter(GROUP, entry, "ValueError: boom", consumer="c2")
    # Then the dead-letter stream holds the reason and the raw entry, and it is acked
    (letter_entry,) = await broker.range(broker.dead_letter_stream)
    letter = codec.decode(letter_entry.data, DeadLetter)
    assert (letter.error, letter.raw, letter.entry_id) == ("ValueError: boom", b"poison", entry_id)
    assert (letter.stream, letter.group, letter.deliveries) == (STREAM, GROUP, broker.settings.max_deliveries)
    assert (await broker.stats(STREAM)).group(GROUP).pending == 0


async def test_dead_lettering_twice_leaves_one_dead_letter(broker: Broker) -> None:
    # Given an entry dead-lettered once (a crash then redelivered it)
    await broker.publish(STREAM, b"poison")
    (entry,) = await read_all(broker)
    first = await broker.dead_letter(GROUP, entry, "boom")
    # When it is dead-lettered again
    second = await broker.dead_letter(GROUP, entry, "boom")
    # Then there is still one dead letter
    assert first == second
    assert len(await broker.range(broker.dead_letter_stream)) == 1


# -- idempotent publish -------------------------------------------------------------------


async def test_same_dedupe_key_twice_leaves_one_entry_with_same_id(broker: Broker) -> None:
    # Given an output published under a dedupe key
    first = await broker.publish(STREAM, b"out", dedupe_key="detect:abc")
    # When it is published again (after a crash), also within one batch
    batch = [Publish(STREAM, b"out", "detect:abc"), Publish(STREAM, b"x", "detect:def")]
    again = await broker.publish_many(batch)
    # Then the second copy gets the first id and the stream holds one entry per key
    assert again[0] == first
    assert [e.data for e in await broker.range(STREAM)] == [b"out", b"x"]


async def test_dedupe_keys_are_per_stream(broker: Broker) -> None:
    # Given the same key on two streams; When both are published
    for stream in (STREAM, OTHER):
        await broker.publish(stream, b"v", dedupe_key="k")
    # Then each stream has its entry
    assert [len(await broker.range(s)) for s in (STREAM, OTHER)] == [1, 1]


# -- touch -------------------------------------------------------------------------------


async def test_touch_keeps_an_entry_from_being_claimed(broker: Broker) -> None:
    # Given two entries being worked on by c1 for a while
    await publish_n(broker, 2)
    working, idle = await read_all(broker, "c1")
    await asyncio.sleep(0.3)
    # When c1 touches one, and c2 then claims idle entries
    await broker.touch(GROUP, "c1", [working])
    claimed = await broker.claim(GROUP, "c2", STREAM, min_idle_ms=250, count=10)
    # Then only the untouched one is taken over
    assert [e.id for e in claimed] == [idle.id]


async def test_touch_does_not_count_a_delivery(broker: Broker) -> None:
    # Given a delivered entry touched twice
    await publish_n(broker, 1)
    entries = await read_all(broker, "c1")
    await broker.touch(GROUP, "c1", entries)
    await broker.touch(GROUP, "c1", entries)
    # When it is claimed; Then this is its second delivery
    (entry,) = await broker.claim(GROUP, "c2", STREAM, min_idle_ms=0, count=1)
    assert entry.deliveries == 2


# -- trimming ----------------------------------------------------------------------------


async def test_trim_keeps_every_entry_some_group_has_not_acked(broker: Broker) -> None:
    # Given ten entries; group A acked six, group B read four and acked two
    ids = await publish_n(broker, 10)
    a = await read_all(broker, "a", group="A")
    await broker.ack("A", a[:6])
    b = await read_all(broker, "b", group="B", count=4)
    await broker.ack("B", b[:2])
    # When trimmed
    removed = await broker.trim(STREAM)
    # Then only the two entries both groups acked are gone
    assert removed == 2
    assert [e.id for e in await broker.range(STREAM)] == ids[2:]


async def test_trim_keeps_unread_entries(broker: Broker) -> None:
    # Given a group that acked all it read, and three entries it has not read yet
    await publish_n(broker, 2)
    await broker.ack(GROUP, await read_all(broker))
    later = await publish_n(broker, 3)
    # When trimmed; Then the unread entries stay
    assert await broker.trim(STREAM) == 2
    assert [e.id for e in await broker.range(STREAM)] == later


async def test_trim_removes_everything_when_all_groups_acked(broker: Broker) -> None:
    # Given every entry acked by the only group
    await publish_n(broker, 4)
    await broker.ack(GROUP, await read_all(broker))
    # When trimmed; Then the stream is empty but its group still works
    assert await broker.trim(STREAM) == 4
    (new_id,) = await publish_n(broker, 1)
    assert [e.id for e in await read_all(broker)] == [new_id]


async def test_a_stream_no_group_reads_is_capped_to_its_newest_entries(broker: Broker) -> None:
    # Given ten entries nobody consumes; When capped at four; Then the newest four stay
    ids = await publish_n(broker, 10)
    assert await broker.cap(STREAM, 4) == 6
    assert [e.id for e in await broker.range(STREAM)] == ids[6:]


async def test_a_stream_a_group_reads_is_never_capped(broker: Broker) -> None:
    # Given ten entries and a group that has read none; When capped; Then all stay
    await broker.ensure_group(STREAM, GROUP)
    await publish_n(broker, 10)
    assert await broker.cap(STREAM, 4) == 0
    assert (await broker.stats(STREAM)).length == 10


async def test_stream_without_group_is_not_trimmed(broker: Broker) -> None:
    # Given entries nobody consumes; When trimmed; Then none is removed
    await publish_n(broker, 3)
    assert await broker.trim(STREAM) == 0
    assert (await broker.stats(STREAM)).length == 3


# -- backpressure and stats --------------------------------------------------------------


async def test_wait_for_room_holds_producer_until_consumer_catches_up(broker: Broker) -> None:
    # Given a hop whose group has five entries to do, above a bound of three
    await broker.ensure_group(STREAM, GROUP)
    await publish_n(broker, 5)
    producer = asyncio.create_task(broker.wait_for_room(STREAM, GROUP, max_backlog=3, poll_s=0.01))
    await asyncio.sleep(0.1)
    held = not producer.done()
    # When the consumer reads and acks three of them
    await broker.ack(GROUP, await read_all(broker, count=3))
    # Then the producer was held and is now released
    await asyncio.wait_for(producer, 5)
    assert held


async def test_wait_for_room_counts_pending_entries_too(broker: Broker) -> None:
    # Given five entries all read but not acked (no lag, five pending)
    await publish_n(broker, 5)
    await read_all(broker)
    # When a producer waits with a bound of three and a short timeout
    await broker.wait_for_room(STREAM, GROUP, max_backlog=3, poll_s=0.01, timeout_s=0.05)
    # Then the backlog it saw is still above the bound
    assert (await broker.stats(STREAM)).backlog(GROUP) == 5


async def test_stats_report_length_lag_pending_and_consumers(broker: Broker) -> None:
    # Given six entries; c1 read three and acked one, c2 read one
    await publish_n(broker, 6)
    entries = await read_all(broker, "c1", count=3)
    await broker.ack(GROUP, entries[:1])
    await read_all(broker, "c2", count=1)
    # When stats are taken
    stats = await broker.stats(STREAM)
    group = stats.group(GROUP)
    # Then they count what each state holds
    assert stats.length == 6
    assert (group.consumers, group.pending, group.lag) == (2, 3, 2)
    assert stats.backlog(GROUP) == 5


async def test_stats_of_missing_stream_are_empty(broker: Broker) -> None:
    # Given no stream; When stats are taken; Then length is zero and no group shows
    stats = await broker.stats(STREAM)
    assert (stats.length, stats.groups, stats.backlog(GROUP)) == (0, [], 0)


async def test_lag_is_counted_after_entries_are_deleted(broker: Broker) -> None:
    # Given a group that read two of five entries, and one unread entry deleted
    ids = await publish_n(broker, 5)
    await read_all(broker, count=2)
    await broker.delete_entries(STREAM, ids[3:4])
    # When stats are taken; Then lag counts the two unread entries that remain
    assert (await broker.stats(STREAM)).group(GROUP).lag == 2


# -- names, ranges, values, leases, pools ------------------------------------------------


async def test_streams_lists_existing_streams_by_pattern(broker: Broker) -> None:
    # Given two frame streams and a small value
    await publish_n(broker, 1, STREAM)
    await publish_n(broker, 1, OTHER)
    await broker.put_value(f"{TEST_NAMESPACE}:frames:note", b"x")
    # When listed by pattern; Then only the streams come back
    assert await broker.streams(f"{TEST_NAMESPACE}:frames:*") == sorted([STREAM, OTHER])


async def test_range_honours_exclusive_start_and_count(broker: Broker) -> None:
    # Given five entries; When ranged after the first, two at most
    ids = await publish_n(broker, 5)
    entries = await broker.range(STREAM, start=f"({ids[0]}", count=2)
    # Then the second and third come back
    assert [e.id for e in entries] == ids[1:3]


async def test_values_expire_and_are_listed_by_pattern(broker: Broker) -> None:
    # Given a lasting value and one with a short TTL
    await broker.put_value(f"{TEST_NAMESPACE}:health:a", b"ok")
    await broker.put_value(f"{TEST_NAMESPACE}:health:b", b"ok", ttl_ms=50)
    await asyncio.sleep(0.1)
    # When read back; Then the short one is gone
    assert await broker.get_value(f"{TEST_NAMESPACE}:health:a") == b"ok"
    assert await broker.get_value(f"{TEST_NAMESPACE}:health:b") is None
    assert await broker.keys(f"{TEST_NAMESPACE}:health:*") == [f"{TEST_NAMESPACE}:health:a"]


async def test_lease_is_exclusive_until_released_by_its_owner(broker: Broker) -> None:
    # Given a lease taken by w1
    assert await broker.lease("L", "w1", 10_000)
    # When w2 tries to take or release it; Then it cannot
    assert not await broker.lease("L", "w2", 10_000)
    assert not await broker.release("L", "w2")
    # And once w1 renews and releases it, w2 can take it
    assert await broker.lease("L", "w1", 10_000)
    assert await broker.release("L", "w1")
    assert await broker.lease("L", "w2", 10_000)
    assert await broker.lease_owner("L") == "w2"


async def test_lease_expires_without_renewal(broker: Broker) -> None:
    # Given a short lease of w1 that is not renewed
    await broker.lease("L", "w1", 50)
    await asyncio.sleep(0.1)
    # When w2 asks; Then it is free and w2 takes it
    assert await broker.lease_owner("L") is None
    assert await broker.lease("L", "w2", 10_000)


async def test_pool_members_drop_out_after_their_ttl(broker: Broker) -> None:
    # Given two members, one with a short heartbeat and one that leaves
    await broker.join("P", "b", 10_000)
    await broker.join("P", "a", 50)
    await broker.join("P", "c", 10_000)
    await broker.leave("P", "c")
    await asyncio.sleep(0.1)
    # When listed; Then only the live one remains
    assert await broker.members("P") == ["b"]


# -- implementation-specific edges -------------------------------------------------------


async def test_redis_read_recreates_group_when_stream_was_deleted(any_redis_url: str) -> None:
    # Given a group in use whose stream is then deleted
    broker = RedisBroker(url=any_redis_url, namespace=TEST_NAMESPACE)
    await publish_n(broker, 1)
    await read_all(broker)
    await broker.client.delete(STREAM)
    # When the consumer reads again after a new publish
    (entry_id,) = await publish_n(broker, 1)
    entries = await read_all(broker)
    await broker.close()
    # Then the group is recreated and delivers the new entry
    assert [e.id for e in entries] == [entry_id]


async def test_redis_dedupe_publish_survives_a_flushed_script_cache(any_redis_url: str) -> None:
    # Given a dedupe publish, then the server forgets its scripts (as after a restart)
    broker = RedisBroker(url=any_redis_url, namespace=TEST_NAMESPACE)
    first = await broker.publish(STREAM, b"out", dedupe_key="k")
    await broker.client.script_flush()
    # When the same output and a new one are published
    again = await broker.publish_many([Publish(STREAM, b"out", "k"), Publish(STREAM, b"new", "k2")])
    await broker.close()
    # Then the script is loaded again and dedupe still holds
    assert again[0] == first
    assert len(set(again)) == 2


async def test_redis_connection_failure_is_a_broker_connection_error() -> None:
    # Given a broker pointed at a port nobody listens on
    broker = RedisBroker(url="redis://127.0.0.1:1/0", socket_connect_timeout=1)
    # When it is used; Then the error is roadstream's, not redis's
    with pytest.raises(BrokerConnectionError):
        await broker.stats(STREAM)
    await broker.close()


async def test_connect_accepts_acl_and_tls_urls_without_connecting() -> None:
    # Given URLs with ACL credentials and TLS options
    broker, blobs = connect("rediss://alice:s3cret@example.invalid:6380/2", ssl_cert_reqs="none")
    # When opened (lazily); Then the credentials and TLS reach the client
    kwargs = broker.client.connection_pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("alice", "s3cret", 2)
    assert broker.client.connection_pool.connection_class.__name__ == "SSLConnection"
    await broker.close()
    await blobs.close()


async def test_connect_memory_urls_share_state_per_name() -> None:
    # Given two brokers connected to the same memory name and one to another
    first, _ = connect("memory://shared", namespace=TEST_NAMESPACE)
    second, _ = connect("memory://shared", namespace=TEST_NAMESPACE)
    other, _ = connect("memory://elsewhere", namespace=TEST_NAMESPACE)
    # When one publishes
    await first.publish(STREAM, b"x")
    # Then the other of the same name sees it, the third does not
    assert isinstance(second, MemoryBroker)
    assert [len(await b.range(STREAM)) for b in (second, other)] == [1, 0]
    forget_memory()


def test_connect_rejects_unknown_schemes() -> None:
    # Given a URL of no known scheme; When connected; Then a ConfigError names it
    with pytest.raises(ConfigError, match="kafka://"):
        connect("kafka://localhost")


async def test_a_takeover_claim_leaves_the_delivery_count_alone(broker: Broker) -> None:
    # Given an entry delivered once to a consumer that went away
    stream = stream_name("handover", ns=broker.namespace)
    await broker.ensure_group(stream, "g")
    await broker.publish(stream, b"x")
    (first,) = await broker.read("g", "old-owner", [stream], count=1, block_ms=0)

    # When a new owner takes it over without counting a delivery
    (taken,) = await broker.claim("g", "new-owner", stream, min_idle_ms=0, count=10, count_delivery=False)

    # Then it keeps its data and its count, and a counted claim afterwards adds one
    assert (taken.id, taken.data, taken.deliveries) == (first.id, b"x", 1)
    (again,) = await broker.claim("g", "third", stream, min_idle_ms=0, count=10)
    assert again.deliveries == 2


@pytest.mark.parametrize("count_delivery", [True, False])
async def test_claim_all_takes_every_page_of_a_takeover(broker: Broker, count_delivery: bool) -> None:
    # Given seven entries pending with a consumer that went away
    stream = stream_name("pages", ns=broker.namespace)
    await broker.ensure_group(stream, "g")
    ids = await broker.publish_many([Publish(stream, b"%d" % i) for i in range(7)])
    await broker.read("g", "old-owner", [stream], count=10, block_ms=0)

    # When a new owner claims them all at once (idle 0: each claimed one is claimable again)
    claimed = await broker.claim_all("g", "new-owner", stream, min_idle_ms=0, count_delivery=count_delivery, page=3)

    # Then it has every one, in order, each once
    assert [e.id for e in claimed] == ids
    assert [e.order for e in claimed] == sorted(e.order for e in claimed)


async def test_a_failing_entrys_last_error_is_kept_by_the_broker(broker: Broker) -> None:
    # Given an entry a group failed on
    entry = Entry(STREAM, "5-1", b"x")
    assert await broker.last_error(GROUP, entry) is None

    # When the error is recorded
    await broker.record_error(GROUP, entry, "ValueError: bad")

    # Then the broker gives it back for that entry only
    assert await broker.last_error(GROUP, entry) == "ValueError: bad"
    assert await broker.last_error(GROUP, Entry(STREAM, "5-2", b"x")) is None

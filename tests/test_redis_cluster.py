"""What only a Redis Cluster asks of the broker and the blob store (the rest of their
behaviour is the conformance suites', which run on the cluster too)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter

import pytest
import redis
from redis.asyncio.cluster import ClusterNode
from redis.crc import key_slot

from brokers.base import Publish
from brokers.connect import connect
from brokers.redis import RedisBlobStore, RedisBroker, is_cluster_url
from stream.errors import ConfigError
from stream.names import blob_name, dead_letter_name, stream_name
from stream.settings import BrokerSettings

pytestmark = pytest.mark.redis

NS = "rstest"
NON_PARTITIONED = ("jobs", "segments", "escalations", "verdicts", "drives")


def test_cluster_urls_are_told_apart_by_scheme() -> None:
    # Given URLs of each kind; When asked; Then only the +cluster schemes are a cluster
    assert is_cluster_url("redis+cluster://h:7000") and is_cluster_url("rediss+cluster://u:p@h:7000/0")
    assert not any(is_cluster_url(u) for u in ("redis://h:6379/0", "rediss://h", "unix:///s.sock"))


async def test_connect_opens_a_cluster_client_with_acl_and_tls_without_connecting() -> None:
    # Given a TLS cluster URL with ACL credentials; When opened (lazily)
    broker, blobs = connect("rediss+cluster://alice:s3cret@example.invalid:7000", ssl_cert_reqs="none")
    # Then both are cluster clients that carry the credentials and TLS
    kwargs = broker.client.get_connection_kwargs()
    assert broker.cluster and blobs.cluster
    assert (kwargs["username"], kwargs["password"]) == ("alice", "s3cret")
    assert kwargs["connection_class"].__name__ == "SSLConnection"
    await broker.close()
    await blobs.close()


def test_a_cluster_url_naming_a_database_is_a_config_error_naming_the_url_without_its_password() -> None:
    # Given a cluster URL with a database other than 0 (a cluster has only database 0)
    url = "redis+cluster://alice:s3cret@example.invalid:7000/2"
    # When opened; Then the error is roadstream's configuration error, password masked
    with pytest.raises(ConfigError, match="must be 0") as caught:
        connect(url)
    assert "s3cret" not in str(caught.value) and "example.invalid:7000" in str(caught.value)


def test_non_partitioned_streams_spread_over_slots() -> None:
    # Given the streams of the hops that are not partitioned, and the dead letters
    streams = [stream_name(hop) for hop in NON_PARTITIONED] + [dead_letter_name()]
    # When hashed; Then each has a slot of its own
    assert len({key_slot(s.encode()) for s in streams}) == len(streams)


def test_a_blob_and_its_version_key_share_a_slot_and_drive_cameras_spread() -> None:
    # Given blob names: a checkpoint's, and frames of many drives and cameras
    name = blob_name("fuse-checkpoint:d0123")
    frames = [blob_name(f"d{d}:{cam}:{seq}") for d in range(20) for cam in ("front", "back") for seq in range(3)]
    # Then a blob's version key is in its slot, a camera's frames share one, and the
    # drives' cameras spread over the slots
    assert key_slot(name.encode()) == key_slot(f"{name}:version".encode())
    assert len({key_slot(f.encode()) for f in frames[:3]}) == 1
    assert len({key_slot(f.encode()) for f in frames}) == 40


async def test_a_read_over_slots_on_several_nodes_wakes_up_on_publish(redis_cluster_url: str) -> None:
    # Given a consumer blocked on streams whose slots are spread over the primaries
    broker = RedisBroker(url=redis_cluster_url, namespace=NS)
    streams = [stream_name("frames", p, NS) for p in range(8)]
    await broker.read("g", "c", streams, count=10, block_ms=0)
    nodes = {broker.reader.get_node_from_key(s).name for s in streams}

    async def publish_later() -> None:
        await asyncio.sleep(0.2)
        await broker.publish(streams[5], b"x")

    # When an entry is published to one of them
    started = time.monotonic()
    entries, _ = await asyncio.gather(broker.read("g", "c", streams, count=10, block_ms=3000), publish_later())
    waited = time.monotonic() - started
    await broker.close()
    # Then the read returns it well before its block ends
    assert len(nodes) > 1
    assert [e.data for e in entries] == [b"x"]
    assert waited < 1.0


async def test_a_blob_batch_is_one_round_trip_per_node_all_at_once(
    redis_cluster_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 200 blobs of 20 drives spread over the cluster
    store = RedisBlobStore(redis_cluster_url, namespace=NS, fetch_keys=16)
    keys = [f"d{i % 20}:front:{i}" for i in range(200)]
    await store.put_many({k: k.encode() for k in keys})
    calls: Counter = Counter()
    original = ClusterNode.execute_pipeline

    async def counted(node: ClusterNode, commands: list) -> bool:
        calls[node.name] += 1
        return await original(node, commands)

    monkeypatch.setattr(ClusterNode, "execute_pipeline", counted)
    # When fetched in one batch (with two that are missing)
    got = await store.get_many([*keys, "gone", keys[3]])
    await store.close()
    # Then every blob comes back in order, from one pipeline to each primary
    assert got == [k.encode() for k in keys] + [None, keys[3].encode()]
    assert len(calls) == 3 and set(calls.values()) == {1}


async def test_a_publish_batch_to_partitions_on_every_node_keeps_dedupe(redis_cluster_url: str) -> None:
    # Given a batch of outputs to partitions on several nodes, published twice
    broker = RedisBroker(url=redis_cluster_url, namespace=NS)
    items = [Publish(stream_name("detections", p % 6, NS), b"%d" % p, f"k{p}") for p in range(24)]
    first = await broker.publish_many(items)
    again = await broker.publish_many(items)
    lengths = [(await broker.stats(stream_name("detections", p, NS))).length for p in range(6)]
    await broker.close()
    # Then the second publish returns the first's ids and adds nothing
    assert again == first
    assert lengths == [4] * 6


async def test_used_memory_is_the_fullest_primarys(redis_cluster_url: str) -> None:
    # Given a broker on the cluster; When asked for used memory; Then one positive figure
    broker = RedisBroker(url=redis_cluster_url, namespace=NS)
    used = await broker.used_memory()
    await broker.close()
    assert isinstance(used, int) and used > 0


async def test_replica_acks_put_the_outputs_on_each_written_nodes_replica(redis_cluster_url: str) -> None:
    # Given a broker that waits for one replica, and streams on every primary
    settings = BrokerSettings(replica_acks=1, replica_ack_timeout_ms=2000)
    broker = RedisBroker(url=redis_cluster_url, namespace=NS, settings=settings)
    streams = [stream_name("detections", p, NS) for p in range(6)]
    # When a batch is published to them
    await broker.publish_many([Publish(s, b"x", f"k{s}") for s in streams])
    # Then, as soon as it returns, each stream's replica already holds its entry
    lengths = []
    for stream in streams:
        replica = broker.client.nodes_manager.slots_cache[broker.client.keyslot(stream)][1]
        with redis.Redis(host=replica.host, port=replica.port) as client:
            client.execute_command("READONLY")
            lengths.append(client.xlen(stream))
    await broker.close()
    assert lengths == [1] * 6


async def test_replica_acks_on_a_server_without_replicas_wait_out_the_timeout(redis_url: str) -> None:
    # Given a single server (no replica) and a broker that asks for one
    settings = BrokerSettings(replica_acks=1, replica_ack_timeout_ms=50)
    broker = RedisBroker(url=redis_url, namespace=NS, settings=settings)
    # When it publishes; Then the entry is there after the wait, with its id
    started = time.monotonic()
    (entry_id,) = await broker.publish_many([Publish(stream_name("jobs", ns=NS), b"x", "k")])
    waited = time.monotonic() - started
    assert [e.id for e in await broker.range(stream_name("jobs", ns=NS))] == [entry_id]
    await broker.close()
    assert waited >= 0.05


async def test_replica_acks_put_blobs_and_checkpoints_on_the_replica(redis_cluster_url: str) -> None:
    # Given a blob store that waits for one replica
    store = RedisBlobStore(redis_cluster_url, namespace=NS, replica_acks=1, replica_ack_timeout_ms=2000)
    # When a frame blob and a checkpoint are stored
    await store.put_many({"d1:front:0": b"jpeg"})
    await store.put_versioned("fuse-checkpoint:d1", b"state", 3, ttl_s=60)
    # Then each one's replica holds it as soon as the call returns
    held = []
    for key in ("d1:front:0", "fuse-checkpoint:d1"):
        name = blob_name(key, NS)
        replica = store.client.nodes_manager.slots_cache[store.client.keyslot(name)][1]
        with redis.Redis(host=replica.host, port=replica.port) as client:
            client.execute_command("READONLY")
            held.append(client.get(name))
    await store.close()
    assert held == [b"jpeg", b"state"]


async def test_a_read_over_slots_hands_over_one_slots_entries_when_anothers_stream_was_deleted(
    redis_cluster_url: str,
) -> None:
    # Given a group on two streams of different slots, an entry waiting on the first and
    # the second stream deleted under the group
    broker = RedisBroker(url=redis_cluster_url, namespace=NS)
    first, second = stream_name("frames", 0, NS), stream_name("frames", 1, NS)
    await broker.read("g", "c", [first, second], count=10, block_ms=0)
    entry_id = await broker.publish(first, b"x")
    await broker.client.delete(second)
    # When the consumer reads both
    entries = await broker.read("g", "c", [first, second], count=10, block_ms=0)
    entries += await broker.read("g", "c", [first, second], count=10, block_ms=0)
    pending = (await broker.stats(first)).groups[0].pending
    await broker.close()
    # Then the first stream's entry is handed over, not left pending unseen
    assert [e.id for e in entries] == [entry_id]
    assert pending == 1


async def test_a_failing_slot_in_a_blocking_read_over_slots_strands_no_other_slots_entry(
    redis_cluster_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a consumer blocked on two streams of different slots, one of whose nodes
    # fails its next blocking call (a failover) while an entry arrives on the other
    broker = RedisBroker(url=redis_cluster_url, namespace=NS)
    first, second = stream_name("frames", 0, NS), stream_name("frames", 1, NS)
    await broker.read("g", "c", [first, second], count=10, block_ms=0)
    failing_slot = broker.client.keyslot(second)
    fail = asyncio.Event()
    original = RedisBroker._read_slot

    async def read_slot(self, slot, group, consumer, streams, count, block_ms):  # noqa: ANN001, ANN202
        reply = await original(self, slot, group, consumer, streams, count, block_ms)
        if slot == failing_slot and block_ms and fail.is_set():
            fail.clear()
            message = "node went away"
            raise redis.ConnectionError(message)
        return reply

    monkeypatch.setattr(RedisBroker, "_read_slot", read_slot)

    async def publish_later() -> str:
        await asyncio.sleep(0.2)
        fail.set()
        return await broker.publish(first, b"x")

    # When the entry is published and the consumer reads on after any error
    async def read() -> list:
        try:
            return await broker.read("g", "c", [first, second], count=10, block_ms=1000)
        except Exception:  # noqa: BLE001
            return []

    got, entry_id = await asyncio.gather(read(), publish_later())
    got += await broker.read("g", "c", [first, second], count=10, block_ms=0)
    await broker.close()
    # Then the entry is handed over, not left in the consumer's pending list unseen
    assert [e.id for e in got] == [entry_id]


async def test_replica_acks_of_a_checkpoint_wait_for_its_own_write(redis_cluster_url: str) -> None:
    # Given a blob store that waits for one replica, whose client holds two connections
    # to the checkpoint's primary, and that primary's replica stopped
    store = RedisBlobStore(redis_cluster_url, namespace=NS, replica_acks=1, replica_ack_timeout_ms=300)
    name = blob_name("fuse-checkpoint:d1", NS)
    await store.put_versioned("fuse-checkpoint:d1", b"state", 1, ttl_s=60)
    await asyncio.gather(store.client.get(name), store.client.get(name))
    primary, replica = store.client.nodes_manager.slots_cache[store.client.keyslot(name)][:2]
    with redis.Redis(host=primary.host, port=primary.port) as client:
        client.execute_command("WAIT", 1, 5000)  # the replica has everything so far
    with redis.Redis(host=replica.host, port=replica.port) as client:
        pid = int(client.info("server")["process_id"])
    os.kill(pid, signal.SIGSTOP)
    waited = []
    try:
        # When checkpoints are stored
        for version in (2, 3, 4):
            started = time.monotonic()
            await store.put_versioned("fuse-checkpoint:d1", b"state", version, ttl_s=60)
            waited.append(time.monotonic() - started)
    finally:
        os.kill(pid, signal.SIGCONT)
    await store.close()
    # Then each call waited for the replica (in vain, up to the timeout) before returning
    assert min(waited) >= 0.3, waited


async def test_replica_acks_cover_small_values_such_as_a_split_drives_camera_records(redis_cluster_url: str) -> None:
    # Given a broker that waits for one replica, and the replica of a record's primary stopped
    # once it holds everything so far
    settings = BrokerSettings(replica_acks=1, replica_ack_timeout_ms=300)
    broker = RedisBroker(url=redis_cluster_url, namespace=NS, settings=settings)
    key = f"{NS}:ingest-record:d1:front"
    await broker.put_value(key, b"before", ttl_ms=60_000)
    primary, replica = broker.client.nodes_manager.slots_cache[broker.client.keyslot(key)][:2]
    with redis.Redis(host=primary.host, port=primary.port) as client:
        client.execute_command("WAIT", 1, 5000)
    with redis.Redis(host=replica.host, port=replica.port) as client:
        pid = int(client.info("server")["process_id"])
    os.kill(pid, signal.SIGSTOP)
    try:
        # When a camera's record is stored (its job is acked right after)
        started = time.monotonic()
        await broker.put_value(key, b"record", ttl_ms=60_000)
        waited = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    stored = await broker.get_value(key)
    await broker.close()
    # Then the call waited for the replica (in vain, up to the timeout), and the value is there
    assert waited >= 0.3
    assert stored == b"record"


async def test_a_node_unreachable_in_a_read_over_nodes_strands_no_other_nodes_entry(
    redis_cluster_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a group on streams of two nodes, an entry waiting on the first, and the
    # second node refusing connections (its primary just died)
    broker = RedisBroker(url=redis_cluster_url, namespace=NS)
    streams = [stream_name("frames", p, NS) for p in range(8)]
    await broker.read("g", "c", streams, count=10, block_ms=0)
    node_of = {s: broker.reader.get_node_from_key(s).name for s in streams}
    first = streams[0]
    second = next(s for s in streams if node_of[s] != node_of[first])
    entry_id = await broker.publish(first, b"x")
    pipeline, command = ClusterNode.execute_pipeline, ClusterNode.execute_command

    def refusing(original):  # noqa: ANN001, ANN202
        async def call(node: ClusterNode, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if node.name == node_of[second]:
                message = "Connection refused"
                raise redis.ConnectionError(message)
            return await original(node, *args, **kwargs)

        return call

    monkeypatch.setattr(ClusterNode, "execute_pipeline", refusing(pipeline))
    monkeypatch.setattr(ClusterNode, "execute_command", refusing(command))
    # When the consumer reads both, and again once the node is back
    got = []
    try:
        got += await broker.read("g", "c", [first, second], count=10, block_ms=0)
    except Exception:  # noqa: BLE001
        pass
    monkeypatch.setattr(ClusterNode, "execute_pipeline", pipeline)
    monkeypatch.setattr(ClusterNode, "execute_command", command)
    got += await broker.read("g", "c", [first, second], count=10, block_ms=0)
    await broker.close()
    # Then the entry is handed over, not left in the consumer's pending list unseen
    assert [e.id for e in got] == [entry_id]


async def test_a_stream_deleted_under_its_group_is_read_again_while_other_slots_stay_busy(redis_cluster_url: str) -> None:
    # Given a group on two streams of different slots, the second deleted under it and
    # written again, and the first busy
    broker = RedisBroker(url=redis_cluster_url, namespace=NS)
    first, second = stream_name("frames", 0, NS), stream_name("frames", 1, NS)
    await broker.read("g", "c", [first, second], count=10, block_ms=0)
    await broker.client.delete(second)
    again = await broker.publish(second, b"again")
    # When the consumer reads on while the first stream always has an entry waiting
    got = []
    for i in range(3):
        await broker.publish(first, b"%d" % i)
        got += await broker.read("g", "c", [first, second], count=10, block_ms=0)
    await broker.close()
    # Then the second stream's new entry is read too
    assert (second, again) in [(e.stream, e.id) for e in got]

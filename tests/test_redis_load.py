"""Redis under full load: timeouts from the settings, a pool for blocking reads, split blob fetches."""

from __future__ import annotations

import pytest

from brokers.connect import connect
from brokers.redis import MAX_BLOCK_S, RedisBlobStore, RedisBroker
from stream.settings import BrokerSettings

pytestmark = pytest.mark.redis


async def test_connections_take_their_timeouts_from_the_settings(redis_url: str) -> None:
    # Given settings with a 12 s command timeout
    settings = BrokerSettings(socket_timeout_s=12.0, socket_connect_timeout_s=3.0, blob_fetch_keys=7)
    # When a broker and a blob store are opened
    broker, blobs = connect(redis_url, namespace="rsload", settings=settings)
    try:
        # Then commands time out after 12 s, blocking reads after 12 s plus the longest block,
        # and the two use different connection pools
        options = broker.client.connection_pool.connection_kwargs
        assert (options["socket_timeout"], options["socket_connect_timeout"]) == (12.0, 3.0)
        assert broker.reader.connection_pool is not broker.client.connection_pool
        assert broker.reader.connection_pool.connection_kwargs["socket_timeout"] == 12.0 + MAX_BLOCK_S
        assert isinstance(blobs, RedisBlobStore) and blobs.fetch_keys == 7
        # and a blocking read on an empty stream returns empty after its block
        await broker.ensure_group("rsload:s", "g")
        assert await broker.read("g", "c", ["rsload:s"], count=1, block_ms=50) == []
    finally:
        await broker.close()
        await blobs.close()


async def test_a_large_blob_fetch_is_split_and_keeps_its_order(redis_url: str) -> None:
    # Given 150 blobs and a store that fetches 64 per MGET
    blobs = RedisBlobStore(redis_url, namespace="rsload", fetch_keys=64)
    try:
        data = {f"k{i}": f"blob-{i}".encode() for i in range(150)}
        await blobs.put_many(data, ttl_s=60)
        # When 151 keys are fetched, one of them missing
        keys = [*list(data)[:100], "missing", *list(data)[100:]]
        fetched = await blobs.get_many(keys)
        # Then every blob comes back in key order, None for the missing one
        assert fetched == [data.get(k) for k in keys]
        assert fetched[100] is None
    finally:
        await blobs.close()


async def test_a_broker_given_a_client_reads_through_it(redis_url: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url)
    broker = RedisBroker(client=client, namespace="rsload")
    assert broker.reader is client
    await broker.close()
    await client.aclose()

"""Shared fixtures: the real Redis server, and brokers and blob stores of every kind.

``broker`` and ``blobs`` are parametrised over the in-memory and the Redis
implementations, so one conformance suite holds both to the same behaviour. Redis tests
use a private ``redis-server`` that the test session starts on a free loopback port (never
the one on 127.0.0.1:6379, which may hold somebody's data), or the database that
``ROADSTREAM_TEST_REDIS_URL`` names; that database is flushed (never FLUSHALL) before and
after each test. Without ``redis-server`` and without the variable they are skipped,
except in CI, where they fail.

The conformance suites (brokers, blobs) and the failure tests also run on a local Redis
Cluster (``redis_cluster_url``: three primaries and three replicas on free loopback
ports, started once per session, emptied before and after each test), or on the one
``ROADSTREAM_TEST_REDIS_CLUSTER_URL`` names (``redis+cluster://host:port``, flushed).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from brokers.base import Broker
from brokers.blobs import BlobStore
from brokers.memory import MemoryBlobStore, MemoryBroker
from brokers.redis import RedisBlobStore, RedisBroker
from stream.settings import BrokerSettings

REDIS_URL_ENV = "ROADSTREAM_TEST_REDIS_URL"
CLUSTER_URL_ENV = "ROADSTREAM_TEST_REDIS_CLUSTER_URL"
#: Namespace of the keys tests write.
TEST_NAMESPACE = "rstest"

#: Short bounds so that claim, expiry and takeover happen within a test's patience.
FAST_SETTINGS = BrokerSettings(
    claim_idle_ms=100, lease_ttl_ms=300, max_deliveries=3, dedupe_ttl_s=60, max_lag=100
)


def _redis_answers(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=1) as client:
            return bool(client.ping())
    except redis.exceptions.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The test Redis URL: ``ROADSTREAM_TEST_REDIS_URL``, else a private server started for
    the session (skip when neither answers; fail in CI)."""
    url = os.environ.get(REDIS_URL_ENV)
    if url:
        if not _redis_answers(url):
            _no_redis(f"no Redis server answers at {url} ({REDIS_URL_ENV})")
        yield url
        return
    from redis_servers import REDIS_SERVER, RedisServers

    if REDIS_SERVER is None:
        _no_redis(f"redis-server is not installed (install it, or set {REDIS_URL_ENV})")
    with RedisServers(tmp_path_factory.mktemp("redis")) as servers:
        yield servers.start().url(db=9)


@pytest.fixture(scope="session")
def redis_cluster_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The test cluster's URL: ``ROADSTREAM_TEST_REDIS_CLUSTER_URL``, else a private local
    cluster (3 primaries, 3 replicas) started once for the session (about 2 s)."""
    url = os.environ.get(CLUSTER_URL_ENV)
    if url:
        yield url
        return
    from redis_servers import REDIS_CLI, REDIS_SERVER, RedisClusterServers

    if REDIS_SERVER is None or REDIS_CLI is None:
        _no_redis(f"redis-server and redis-cli are needed for a local cluster (or set {CLUSTER_URL_ENV})")
    with RedisClusterServers(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster.start().url()


@pytest.fixture
def redis_cluster_url(redis_cluster_server_url: str) -> Iterator[str]:
    """The test cluster, every primary flushed before and after the test."""
    from redis_servers import sync_client

    with sync_client(redis_cluster_server_url) as client:
        client.flushdb(target_nodes=redis.RedisCluster.PRIMARIES)
        yield redis_cluster_server_url
        client.flushdb(target_nodes=redis.RedisCluster.PRIMARIES)


#: Which URL fixture each Redis kind of ``broker``/``blobs`` uses.
REDIS_URL_FIXTURES = {"redis": "redis_url", "cluster": "redis_cluster_url"}
#: Params of fixtures over every implementation: in process, one server, a cluster.
ALL_KINDS = ["memory", pytest.param("redis", marks=pytest.mark.redis), pytest.param("cluster", marks=pytest.mark.redis)]


def make_broker(request: pytest.FixtureRequest, kind: str, settings: BrokerSettings) -> Broker:
    """A broker of ``kind`` (``memory``, ``redis``, ``cluster``) on the test namespace."""
    if kind == "memory":
        return MemoryBroker(namespace=TEST_NAMESPACE, settings=settings)
    url = request.getfixturevalue(REDIS_URL_FIXTURES[kind])
    return RedisBroker(url=url, namespace=TEST_NAMESPACE, settings=settings)


def make_blobs(request: pytest.FixtureRequest, kind: str) -> BlobStore:
    """A blob store of ``kind`` on the test namespace."""
    if kind == "memory":
        return MemoryBlobStore()
    return RedisBlobStore(request.getfixturevalue(REDIS_URL_FIXTURES[kind]), namespace=TEST_NAMESPACE)


def _no_redis(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def redis_url(redis_server_url: str) -> Iterator[str]:
    """The test Redis database, flushed before and after the test."""
    with redis.Redis.from_url(redis_server_url) as client:
        client.flushdb()
        yield redis_server_url
        client.flushdb()


@pytest.fixture
def broker_settings() -> BrokerSettings:
    """Fast transport bounds for tests."""
    return FAST_SETTINGS.model_copy()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def broker(request: pytest.FixtureRequest, broker_settings: BrokerSettings) -> AsyncIterator[Broker]:
    """A broker of each implementation, closed after the test (the conformance suite's
    own ``broker`` adds the cluster)."""
    made = make_broker(request, request.param, broker_settings)
    yield made
    await made.close()


@pytest.fixture(params=ALL_KINDS)
async def blobs(request: pytest.FixtureRequest) -> AsyncIterator[BlobStore]:
    """A blob store of each implementation, the cluster's too, closed after the test."""
    made = make_blobs(request, request.param)
    yield made
    await made.close()


@pytest.fixture(scope="session")
def tiny_vlm_path(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random Qwen2-VL model folder (``tests/vlm_tiny.py``), built once per session."""
    from vlm_tiny import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"))

"""Security: Redis with an ACL user and password, Redis over TLS, no pickle, footage roots.

Every test here runs its own ``redis-server`` (``tests/redis_servers.py``) on a free
loopback port, configured the way a locked-down deployment would be: the ``default``
user off and a password-protected user limited to the roadstream namespace, or a TLS-only
port with certificates made by the test. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis_servers import REDIS_SERVER, RedisServer, RedisServers, redis_supports_tls

from brokers.memory import MemoryBlobStore
from brokers.redis import RedisBroker
from stream import codec
from stream.errors import (
    BrokerAuthError,
    BrokerConnectionError,
    BrokerError,
    BrokerPermissionError,
    DecodeError,
    InputError,
)
from stream.names import JOBS, stream_name
from stream.schemas import ClipRef, Job
from stream.settings import IngestSettings, Settings
from workers.handlers.ingest import build as build_ingest

pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed"),
]
needs_tls = pytest.mark.skipif(
    REDIS_SERVER is not None and not redis_supports_tls(),
    reason="this redis-server was built without TLS (--tls-port not accepted)",
)

#: Namespace of the keys written here; the ACL user may touch only these.
NAMESPACE = "sec"
#: The user may read and write its namespace's keys and nothing else.
NAMESPACE_ONLY = f"~{NAMESPACE}:* &* +@all"
#: Bound on an operation that must fail: a broker that retries forever fails the test.
FAIL_WITHIN_S = 20.0
GROUP = "ingest"
PASSWORD = "s3cret:@/pass"  # URL-special characters, which the URL must escape


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[RedisServers]:
    """Starts private redis-server processes; kills them after the test."""
    with RedisServers(tmp_path) as pool:
        yield pool


@pytest.fixture
def acl_server(servers: RedisServers) -> RedisServer:
    """A server whose ``default`` user is off; one user with a password, namespace only."""
    return servers.start(password=PASSWORD, acl_rules=NAMESPACE_ONLY)


@pytest.fixture
def tls_server(servers: RedisServers) -> RedisServer:
    """A server that speaks only TLS, with a certificate signed by a test CA."""
    return servers.start(tls=True)


async def round_trip(url: str) -> None:
    """Publish, read and ack one entry through a ``RedisBroker`` on ``url``; assert each step."""
    stream = stream_name(JOBS, ns=NAMESPACE)
    async with RedisBroker(url=url, namespace=NAMESPACE) as broker:
        await broker.ensure_group(stream, GROUP)
        entry_id = await broker.publish(stream, b"payload", dedupe_key="job-1")
        entries = await broker.read(GROUP, "worker-1", [stream], count=10, block_ms=100)
        assert [(e.id, e.data) for e in entries] == [(entry_id, b"payload")]
        assert await broker.ack(GROUP, entries) == 1
        stats = await broker.stats(stream)
        assert stats.group(GROUP).pending == 0  # type: ignore[union-attr]


async def first_call_error(url: str) -> BaseException:
    """The error a broker on ``url`` raises on its first call (within ``FAIL_WITHIN_S``)."""
    broker = RedisBroker(url=url, namespace=NAMESPACE)
    try:
        with pytest.raises(BrokerError) as caught:
            await asyncio.wait_for(broker.ensure_group(stream_name(JOBS, ns=NAMESPACE), GROUP), FAIL_WITHIN_S)
        return caught.value
    finally:
        await broker.close()


# -- ACL user and password -------------------------------------------------------------


def test_acl_server_refuses_clients_without_credentials(acl_server: RedisServer) -> None:
    """Guard for the tests below: without credentials this server really answers nothing."""
    # Given the ACL server; When a client without a password pings; Then it is refused
    no_retry = Retry(NoBackoff(), 0)  # redis-py would retry an auth failure with backoff
    with (
        pytest.raises(redis.AuthenticationError),
        redis.Redis(port=acl_server.port, retry=no_retry) as client,
    ):
        client.ping()


async def test_broker_with_acl_user_publishes_reads_and_acks(acl_server: RedisServer) -> None:
    """A user limited to its namespace is enough for the whole publish/read/ack cycle."""
    # Given a URL with the user and its (escaped) password
    url = acl_server.url()
    assert url.startswith("redis://roadstream:s3cret%3A%40%2Fpass@")
    # When / Then the round trip works, touching no key outside the namespace
    await round_trip(url)
    with acl_server.client() as client:
        assert client.exists(stream_name(JOBS, ns=NAMESPACE)) == 1


async def test_broker_with_wrong_password_raises_an_authentication_error(acl_server: RedisServer) -> None:
    """A wrong password surfaces as ``BrokerAuthError`` (not "unreachable"), naming it."""
    # Given the right user with a wrong password
    url = acl_server.url(password="wrong")
    # When the broker makes its first call; Then it fails clearly
    error = await first_call_error(url)
    assert isinstance(error, BrokerAuthError) and not isinstance(error, BrokerConnectionError)
    assert "authentication failed" in str(error) and "invalid username-password pair" in str(error)
    assert "unreachable" not in str(error)


async def test_broker_without_credentials_raises_an_authentication_error(acl_server: RedisServer) -> None:
    """No password where one is needed (NOAUTH) is an authentication error too."""
    error = await first_call_error(acl_server.url(username="", password=""))
    assert isinstance(error, BrokerAuthError), error
    assert "authentication failed" in str(error)


async def test_broker_outside_its_acl_key_pattern_is_refused(acl_server: RedisServer) -> None:
    """The key pattern holds: the same user cannot write another namespace's streams."""
    # Given the user limited to "sec:*"
    broker = RedisBroker(url=acl_server.url(), namespace="other")
    try:
        # When it publishes to another namespace; Then Redis refuses (NOPERM), named as such
        with pytest.raises(BrokerPermissionError, match="denied permission \\(ACL\\)"):
            await broker.publish(stream_name(JOBS, ns="other"), b"x")
        with pytest.raises(BrokerPermissionError, match="denied permission \\(ACL\\)"):
            await broker.ensure_group(stream_name(JOBS, ns="other"), GROUP)
    finally:
        await broker.close()


# -- TLS -------------------------------------------------------------------------------


@needs_tls
async def test_broker_over_tls_with_test_ca_publishes_reads_and_acks(tls_server: RedisServer) -> None:
    """``rediss://`` with the test CA as ``ssl_ca_certs`` works end to end."""
    # Given a rediss:// URL that names the test CA
    url = tls_server.url()
    assert url.startswith("rediss://") and "ssl_ca_certs=" in url
    # When / Then
    await round_trip(url)


@needs_tls
async def test_plain_redis_url_to_tls_port_fails_clearly(tls_server: RedisServer) -> None:
    """Plaintext to a TLS-only port is a connection error, not a hang or garbage."""
    # Given redis:// (no TLS) to the TLS port; When the first call runs; Then it fails
    error = await first_call_error(tls_server.url(scheme="redis"))
    assert isinstance(error, BrokerConnectionError)


@needs_tls
async def test_tls_without_the_ca_rejects_the_server_certificate(tls_server: RedisServer) -> None:
    """The client verifies the server: an untrusted CA fails instead of connecting."""
    # Given rediss:// without the test CA (only the system CAs are trusted)
    error = await first_call_error(tls_server.url(ca=False))
    # Then the handshake fails on verification
    assert isinstance(error, BrokerConnectionError)
    assert "CERTIFICATE_VERIFY_FAILED" in str(error) or "certificate" in str(error).lower()


@needs_tls
async def test_mutual_tls_with_client_certificate_and_password(servers: RedisServers) -> None:
    """TLS with a client certificate and an ACL user together: both travel in the URL."""
    # Given a server that demands a client certificate and a password
    server = servers.start(tls=True, tls_auth_clients=True, password=PASSWORD, acl_rules=NAMESPACE_ONLY)
    # When / Then the URL with CA, client cert and user works end to end
    await round_trip(server.url())


@needs_tls
async def test_mutual_tls_refuses_client_without_certificate(servers: RedisServers) -> None:
    """Without a client certificate the server ends the handshake."""
    # Given a server that demands a client certificate
    server = servers.start(tls=True, tls_auth_clients=True)
    # When the broker connects with the CA but no client certificate; Then it fails
    error = await first_call_error(server.url(client_cert=False))
    assert isinstance(error, BrokerConnectionError)


# -- payloads --------------------------------------------------------------------------


class _Tripwire:
    """Unpickling this object creates a file: proof that a pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def test_pickled_entry_is_refused_without_being_unpickled(tmp_path: Path) -> None:
    """A pickle arriving on a stream is a ``DecodeError``; its code never runs."""
    # Given a pickle whose loading would create a file (the tripwire works: see the control)
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Tripwire(control))).close()
    assert control.exists()
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Tripwire(marker))
    # When a worker decodes it as an entry
    with pytest.raises(DecodeError) as caught:
        codec.decode(payload)
    # Then it is refused, the raw bytes are kept for the dead letter, and nothing ran
    assert caught.value.raw == payload
    assert not marker.exists()


# -- footage paths ---------------------------------------------------------------------


def _job(path: Path) -> Job:
    clip = ClipRef(start="2024-05-01_10-11-12", files={"front": str(path)})
    return Job(drive_id="d1", root=str(path.parent), clips=[clip])


def _escapes(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "footage"
    (root / "drive").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "front.mp4").write_bytes(b"")
    (root / "drive" / "link").symlink_to(outside, target_is_directory=True)
    return {
        "dot-dot": root / "drive" / ".." / ".." / "secret" / "front.mp4",
        "symlink": root / "drive" / "link" / "front.mp4",
        "absolute": outside / "front.mp4",
        "sibling prefix": tmp_path / "footage-evil" / "front.mp4",
    }


@pytest.mark.parametrize("kind", ["dot-dot", "symlink", "absolute", "sibling prefix"])
def test_job_footage_escaping_the_roots_is_refused(tmp_path: Path, kind: str) -> None:
    """A job path that leaves the footage root (``..``, a symlink, a look-alike prefix) is an InputError."""
    # Given ingest allowed to read only <tmp>/footage
    settings = Settings(ingest=IngestSettings(roots=[str(tmp_path / "footage")]))
    handler = build_ingest(settings, MemoryBlobStore())
    # When a job names a path that escapes it; Then it is refused, naming the path
    with pytest.raises(InputError, match="outside the allowed footage roots"):
        handler.check_roots(_job(_escapes(tmp_path)[kind]))


def test_job_footage_under_the_roots_is_accepted(tmp_path: Path) -> None:
    """Control for the test above: a path inside the root passes the same check."""
    settings = Settings(ingest=IngestSettings(roots=[str(tmp_path / "footage")]))
    handler = build_ingest(settings, MemoryBlobStore())
    _escapes(tmp_path)
    handler.check_roots(_job(tmp_path / "footage" / "drive" / "front.mp4"))


def test_a_worker_without_roots_takes_footage_under_the_current_folder_only(tmp_path: Path, monkeypatch) -> None:
    """No ``ingest.roots``: not "anywhere" but the current folder, and the refusal says so."""
    # Given an ingest handler with no roots, run from <tmp>/footage
    _escapes(tmp_path)
    monkeypatch.chdir(tmp_path / "footage")
    handler = build_ingest(Settings(), MemoryBlobStore())
    # When jobs name footage below it, and /etc/passwd; Then only the first passes
    handler.check_roots(_job(tmp_path / "footage" / "drive" / "front.mp4"))
    with pytest.raises(InputError, match=r"/etc/passwd: outside the allowed footage roots \(none configured: only the current folder"):
        handler.check_roots(_job(Path("/etc/passwd")))
    with pytest.raises(InputError, match="set ingest.roots"):
        handler.check_roots(_job(_escapes_again(tmp_path)))


def _escapes_again(tmp_path: Path) -> Path:
    return tmp_path / "footage" / ".." / "secret" / "front.mp4"


def test_run_confines_ingest_to_the_footage_folder_it_was_given(tmp_path: Path) -> None:
    """``roadstream run FOOTAGE`` sets ``ingest.roots`` to FOOTAGE unless roots were configured."""
    from workers.run import footage_roots

    assert footage_roots(Settings(), tmp_path).ingest.roots == [str(tmp_path.resolve())]
    configured = Settings(ingest=IngestSettings(roots=["/data"]))
    assert footage_roots(configured, tmp_path).ingest.roots == ["/data"]


def test_run_holds_producers_back_below_its_private_servers_maxmemory() -> None:
    """``run``'s private redis-server has a ``maxmemory``; producers wait before reaching it."""
    from workers.run import REDIS_BASE_BYTES, memory_bound, private_maxmemory

    settings = memory_bound(Settings())
    assert 0 < settings.broker.max_used_memory < private_maxmemory(settings.broker)
    assert private_maxmemory(settings.broker) - settings.broker.max_used_memory == REDIS_BASE_BYTES // 2
    configured = Settings.model_validate({"broker": {"max_used_memory": 123}})
    assert memory_bound(configured).broker.max_used_memory == 123


def test_runs_private_server_grows_to_a_quarter_of_the_machines_memory_unless_told() -> None:
    """Spent blobs stay 120 s after their window, so the private server's bound follows the
    machine's memory: a quarter of what is available, never less than the defaults, and
    what the settings name wins."""
    from workers.run import RUN_MAX_BLOB_BYTES, private_maxmemory, private_redis_args, sized_for_machine

    gib = 1024**3
    default = Settings().broker.max_blob_bytes
    big = sized_for_machine(Settings(), available=64 * gib).broker
    assert private_maxmemory(big) == 16 * gib  # a quarter of 64 GiB
    assert f"{16 * gib}" in private_redis_args(Path("/tmp/s.sock"), Path("/tmp"), big)
    assert sized_for_machine(Settings(), available=1024 * gib).broker.max_blob_bytes == RUN_MAX_BLOB_BYTES
    assert sized_for_machine(Settings(), available=2 * gib).broker.max_blob_bytes == default  # small box: the floor
    assert sized_for_machine(Settings(), available=0).broker.max_blob_bytes == default  # memory unknown
    told = Settings.model_validate({"broker": {"max_blob_bytes": 5 * 2**20}})
    assert sized_for_machine(told, available=64 * gib).broker.max_blob_bytes == 5 * 2**20
    bounded = Settings.model_validate({"broker": {"max_used_memory": 123}})
    assert sized_for_machine(bounded, available=64 * gib).broker.max_blob_bytes == default


def test_available_memory_is_read_from_the_machine() -> None:
    from workers.run import available_memory_bytes

    found = available_memory_bytes()
    if Path("/proc/meminfo").exists():  # Linux: MemAvailable is there
        assert found is not None and 2**20 < found < 2**50
    else:
        assert found is None or found > 0

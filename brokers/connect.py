"""One entry point from a URL to a broker and its blob store.

``redis://``, ``rediss://`` (TLS, ACL ``user:password@`` allowed) and ``unix://`` open
Redis; ``redis+cluster://`` and ``rediss+cluster://`` open a Redis Cluster through any one
of its nodes; ``memory://NAME`` returns brokers that share one process-wide in-memory state per
name, so that several workers of ``roadstream run`` in one process see the same streams
without a server. Each call gets its own broker object (its own settings and namespace)
over the shared state, so closing one worker's broker never pulls the floor from another.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from brokers.base import Broker
from brokers.blobs import BlobStore
from brokers.memory import MemoryBlobStore, MemoryBroker, MemoryState
from brokers.redis import CLUSTER_SCHEMES, RedisBlobStore, RedisBroker, client_kwargs_for
from stream.errors import ConfigError
from stream.names import DEFAULT_NAMESPACE
from stream.settings import BrokerSettings
from stream.urls import masked

REDIS_SCHEMES = ("redis", "rediss", "unix", *CLUSTER_SCHEMES)
MEMORY_SCHEME = "memory"

_memory_states: dict[str, MemoryState] = {}
_memory_blobs: dict[tuple[str, str], MemoryBlobStore] = {}


def connect(
    url: str,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    settings: BrokerSettings | None = None,
    **client_kwargs: Any,
) -> tuple[Broker, BlobStore]:
    """Open a broker and a blob store for ``url``.

    Parameters:
        url: ``redis://[user:password@]host:port/db``, ``rediss://…``, ``unix:///path?db=N``,
            ``redis+cluster://[user:password@]host:port`` (any node of a cluster; TLS:
            ``rediss+cluster://``) or ``memory://NAME`` (``memory://`` alone is the name ``default``).
        namespace: key prefix of everything written.
        settings: transport bounds.
        **client_kwargs: passed to ``redis.asyncio.from_url`` (``ssl_ca_certs``, …).

    Returns:
        The broker and the blob store; close both when done.

    Raises:
        ConfigError: the URL's scheme is none of the above.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme in REDIS_SCHEMES:
        # Separate connection pools: blocking reads never queue behind large blob fetches.
        bounds = settings or BrokerSettings()
        client_kwargs = {**client_kwargs_for(bounds), **client_kwargs}
        broker = RedisBroker(url=url, namespace=namespace, settings=settings, **client_kwargs)
        blobs = RedisBlobStore(url, namespace=namespace, fetch_keys=bounds.blob_fetch_keys, replica_acks=bounds.replica_acks,
                               replica_ack_timeout_ms=bounds.replica_ack_timeout_ms, **client_kwargs)  # fmt: skip
        return broker, blobs
    if scheme == MEMORY_SCHEME:
        return memory_pair(memory_name(url), namespace=namespace, settings=settings)
    message = f"broker URL {masked(url)!r}: scheme must be one of redis, rediss, unix, redis+cluster, rediss+cluster, memory"
    raise ConfigError(message)


def memory_name(url: str) -> str:
    """The shared-state name of a ``memory://NAME`` URL."""
    parts = urlsplit(url)
    return (parts.netloc + parts.path).strip("/") or "default"


def memory_pair(
    name: str, *, namespace: str = DEFAULT_NAMESPACE, settings: BrokerSettings | None = None
) -> tuple[MemoryBroker, MemoryBlobStore]:
    """A broker over the process-wide memory state ``name``, and its blob store."""
    state = _memory_states.setdefault(name, MemoryState())
    blobs = _memory_blobs.setdefault((name, namespace), MemoryBlobStore())
    return MemoryBroker(namespace=namespace, settings=settings, state=state), blobs


def forget_memory(name: str | None = None) -> None:
    """Drop one named memory state (or all of them): its streams and blobs are gone."""
    for key in [k for k in _memory_states if name in (None, k)]:
        del _memory_states[key]
    for key in [k for k in _memory_blobs if name in (None, k[0])]:
        del _memory_blobs[key]

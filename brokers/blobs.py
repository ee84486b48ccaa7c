"""The frame blob store: pixels travel by reference (the claim-check pattern).

Ingest puts a frame's encoded pixels under a key with a TTL and publishes only the key;
detect fetches a whole batch of keys in one round trip. ``bytes_in_flight`` is the
producer's backpressure signal: producers add to it on ``put_many`` and consumers take
off what they finished with ``release``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

#: Default time-to-live of a frame blob, in seconds.
DEFAULT_BLOB_TTL_S = 3600


class BlobStore(ABC):
    """Keyed byte blobs with a TTL; batch operations are one round trip."""

    @abstractmethod
    async def put_many(self, blobs: Mapping[str, bytes], *, ttl_s: int = DEFAULT_BLOB_TTL_S) -> None:
        """Store blobs under their keys, each expiring after ``ttl_s``."""

    @abstractmethod
    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Fetch blobs in key order; ``None`` for a key that expired or never was."""

    @abstractmethod
    async def delete_many(self, keys: Sequence[str]) -> int:
        """Delete blobs; returns how many existed."""

    @abstractmethod
    async def expire_many(self, keys: Sequence[str], ttl_s: int) -> int:
        """Make blobs expire within ``ttl_s`` (never later than they already would);
        returns how many exist."""

    @abstractmethod
    async def put_versioned(self, key: str, blob: bytes, version: int, *, ttl_s: int) -> bool:
        """Store ``blob`` under ``key`` unless the key holds one put with a higher ``version``
        (optimistic concurrency: a writer that fell behind cannot overwrite newer state).
        Not counted in the bytes in flight. Returns whether it was stored."""

    @abstractmethod
    async def bytes_in_flight(self) -> int:
        """Bytes put and not yet released."""

    @abstractmethod
    async def release(self, nbytes: int) -> None:
        """Take ``nbytes`` off the in-flight count (a consumer finished with them)."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""

    async def put(self, key: str, blob: bytes, *, ttl_s: int = DEFAULT_BLOB_TTL_S) -> None:
        """Store one blob."""
        await self.put_many({key: blob}, ttl_s=ttl_s)

    async def get(self, key: str) -> bytes | None:
        """Fetch one blob."""
        (blob,) = await self.get_many([key])
        return blob
